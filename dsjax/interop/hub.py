"""Hub repository ids wherever a HF checkpoint directory is taken (hf.load, --model, init.checkpoint,
dsjax.convert): 'owner/name' or 'owner/name@revision'.

A path that exists locally is used as it is; otherwise an id is downloaded once by huggingface_hub
(its cache, its login for gated or private repositories, its HF_HUB_OFFLINE and HF_ENDPOINT), only the
files dsjax reads. On several hosts each host downloads into its own cache.
"""
import pathlib
import re

import huggingface_hub
from huggingface_hub import errors as hub_errors

# What dsjax reads of a checkpoint repository; pickled weights, remote code and the rest are never fetched.
ALLOW_PATTERNS = ('config.json', 'generation_config.json', '*.safetensors', '*.safetensors.index.json',
                  'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model')
# A tokenizer alone (data.tokenizer_path of an R1-Distill repository): never its weights.
TOKENIZER_PATTERNS = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?')


class HubError(FileNotFoundError):
    """A path that is not a local directory names no Hub repository that could be downloaded."""


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a Hub id, 'owner/name[@revision]'."""
    return bool(_REPO_ID.fullmatch(text))


def resolve(path, what: str = 'path', patterns=ALLOW_PATTERNS):
    """`path` itself when it exists here (or is not of the form of a Hub id), else the local snapshot of
    the Hub repository it names (the files matching `patterns`); `what` names the argument in errors (e.g.
    '--model')."""
    text = str(path)
    if pathlib.Path(text).exists() or not is_repo_id(text):
        return path
    repo_id, _, revision = text.partition('@')
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                              allow_patterns=list(patterns)))
    except hub_errors.GatedRepoError as e:
        raise HubError(f'{what}={text!r}: the Hub repository {repo_id} is gated; accept its terms on its page and '
                       'log in (`hf auth login`), or pass a local directory') from e
    except hub_errors.RepositoryNotFoundError as e:
        raise HubError(f'{what}={text!r} is neither a local path nor a Hub repository you can read (a private one '
                       'needs `hf auth login`)') from e
    except hub_errors.RevisionNotFoundError as e:
        raise HubError(f'{what}={text!r}: the Hub repository {repo_id} has no revision {revision!r}') from e
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as e:
        # Offline (HF_HUB_OFFLINE=1), unreachable, or a download cut short, with no complete copy cached.
        reason = str(e).splitlines()[0].split('. ')[0] if str(e) else type(e).__name__
        raise HubError(f'{what}={text!r} is not a local path and the Hub could not provide it ({reason}); '
                       f'download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) and '
                       'pass the local directory') from e
