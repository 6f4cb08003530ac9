"""Run directories wherever etils.epath reaches: local paths, gs:// (with gcsfs installed), s3:// (s3fs),
az:// (adlfs). The loop, its checkpoints, metrics and config.json, and the report all go through here."""
from etils import epath

# The fsspec package each remote scheme needs (epath reads remote paths through fsspec).
PACKAGES = {'gs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs', 'hf': 'huggingface_hub'}


class WorkdirError(ValueError):
    """A run directory on a filesystem dsjax cannot reach from here."""


def is_remote(path) -> bool:
    return '://' in str(path)


def resolve(path, what: str = '--workdir') -> epath.Path:
    """`path` as an epath.Path: a local one absolute (Orbax needs that), a remote one checked for its
    filesystem package, so a missing package fails here with one line rather than deep inside a save."""
    text = str(path)
    if not is_remote(text):
        return epath.Path(text).expanduser().resolve()
    scheme = text.split('://', 1)[0]
    try:
        resolved = epath.Path(text)
        resolved.exists()
    except KeyError as e:
        raise WorkdirError(f'{what}={text!r}: etils.epath knows no {scheme}:// filesystem (local paths, '
                           f'{", ".join(f"{s}://" for s in PACKAGES)})') from e
    except ImportError as e:
        raise WorkdirError(f'{what}={text!r}: the {scheme}:// filesystem needs its package: pip install '
                           f'{PACKAGES.get(scheme, "its fsspec implementation")} ({e})') from e
    return resolved
