"""Loading a model to generate with: a dsjax Orbax checkpoint or a HF checkpoint directory, with its
tokenizer; and the command-line flags `dsjax.generate` and `dsjax.chat` share."""
import dataclasses
import pathlib

from absl import flags
import numpy as np

from dsjax import config as config_lib
from dsjax.config import ModelConfig
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.infer import decode
from dsjax.infer import speculative as speculative_lib
from dsjax.infer.sampling import SamplingConfig
from dsjax.interop import hf, hf_files, hub
from dsjax.train import checkpoint


@dataclasses.dataclass
class Loaded:
    """A model ready to generate: its config, variables (params, moe_bias) and tokenizer."""
    cfg: ModelConfig
    variables: dict
    tokenizer: tokenizer_lib.Tokenizer


def load_orbax(path, *, step: int | None = None, dtype=None, mesh=None, tokenizer: str | None = None,
               what: str = '--model') -> Loaded:
    """A dsjax checkpoint (a run's workdir or checkpoint dir, read by checkpoint.read_run): params, the
    routing bias and the tokenizer of the saved config (or `tokenizer`, a path)."""
    run = checkpoint.read_run(path, step, what=what, dtype=dtype, mesh=mesh)
    tok = tokenizer_lib.from_path(tokenizer) if tokenizer else tokenizer_lib.get_tokenizer(run.config.data)
    return Loaded(run.model_cfg, run.variables, tok)


def load(path, *, step: int | None = None, dtype=None, mesh=None, tokenizer: str | None = None,
         what: str = '--model', **model_overrides) -> Loaded:
    """A HF checkpoint directory or Hub id (through dsjax.interop.hf) or a dsjax Orbax checkpoint; `dtype`
    by name or as a jnp/np dtype; errors name the argument `path` came from (`what`)."""
    path = hub.resolve(path, what)
    if hf.is_hf_checkpoint(path):
        model, variables = hf.load(path, dtype, mesh=mesh, **model_overrides)
        return Loaded(model.cfg, variables, tokenizer_lib.from_path(tokenizer or str(path)))
    if not pathlib.Path(path).exists():
        raise FileNotFoundError(f'{what}={str(path)!r} does not exist (give a dsjax run directory, its '
                                'checkpoints/ directory, a HF checkpoint directory or a Hub id owner/name)')
    loaded = load_orbax(path, step=step, dtype=dtype, mesh=mesh, tokenizer=tokenizer, what=what)
    if model_overrides:
        loaded.cfg = dataclasses.replace(loaded.cfg, **model_overrides)
    return loaded


def encode_prompt(tokenizer, text: str) -> list[int]:
    """[bos] + tokens, as the training pipeline frames a document's start."""
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def complete(loaded: Loaded, texts, *, sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 128,
             speculative: bool = False, key=None, cache_length: int | None = None) -> tuple[list[dict], dict | None]:
    """Continues each text ([bos] + its tokens) until EOS or `max_new_tokens`.

    Returns one {'prompt', 'completion', 'tokens', 'logprobs'} per text, and the speculative decoding
    statistics (None without `speculative`, which drafts with the MTP module and decodes greedily).
    """
    tok = loaded.tokenizer
    prompts = [encode_prompt(tok, t) for t in texts]
    kwargs = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, cache_length=cache_length)
    stats = None
    if speculative:
        if not sampling.greedy:
            raise ValueError(f'speculative decoding is greedy: temperature={sampling.temperature} must be 0')
        out, stats = speculative_lib.generate_speculative(loaded.cfg, loaded.variables, prompts, **kwargs)
    else:
        out = decode.generate(loaded.cfg, loaded.variables, prompts, key, sampling=sampling, **kwargs)
    rows = []
    for text, tokens, mask, logprobs in zip(texts, *(np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))):
        ids = tokens[mask].tolist()
        rows.append({'prompt': text, 'completion': tok.decode(ids), 'tokens': ids,
                     'logprobs': [round(float(x), 5) for x in logprobs[mask]]})
    return rows, stats


def define_flags():
    """The model, checkpoint and sampling flags of the generation CLIs (adopt them as key flags, so the
    CLI's --help lists them). Unset sampling flags take the checkpoint's generation_config.json."""
    return dict(
        model=flags.DEFINE_string('model', None, 'dsjax run / checkpoint directory, HF checkpoint directory, or Hub '
                                  'id owner/name[@revision].'),
        step=flags.DEFINE_integer('step', None, 'Checkpoint step of a dsjax run (default: the newest).'),
        dtype=flags.DEFINE_enum('dtype', None, list(config_lib.DTYPES), 'Parameter and compute dtype.'),
        tokenizer=flags.DEFINE_string('tokenizer', None, 'Tokenizer (.model or tokenizer.json) to use instead.'),
        temperature=flags.DEFINE_float('temperature', None, 'Sampling temperature; 0 is greedy (default: the '
                                       "checkpoint's generation_config.json, else greedy)."),
        top_k=flags.DEFINE_integer('top_k', None, 'Keep the k most likely tokens; 0 keeps all (default: '
                                   'generation_config.json).'),
        top_p=flags.DEFINE_float('top_p', None, 'Nucleus sampling mass in (0, 1]; 1 keeps all (default: '
                                 'generation_config.json).'),
        seed=flags.DEFINE_integer('seed', 0, 'PRNG seed for sampling.'),
    )


def sampling_for(path, temperature=None, top_k=None, top_p=None) -> SamplingConfig:
    """The sampling of the checkpoint at `path` (its generation_config.json; greedy without one), each
    field overridden where given."""
    fields = dict(temperature=0.0, top_k=0, top_p=1.0)
    if path is not None and pathlib.Path(path).is_dir():
        fields.update(hf_files.read_sampling(path) or {})
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    fields.update({k: v for k, v in given.items() if v is not None})
    return SamplingConfig(**fields)


def load_from_flags(f) -> tuple[Loaded, SamplingConfig]:
    """The model and sampling settings the flags of `define_flags` name; errors name the flag."""
    if not f['model'].value:
        raise ValueError('--model is required: a dsjax run / checkpoint directory, a HF checkpoint directory or a '
                         'Hub id')
    path = hub.resolve(f['model'].value, '--model')
    loaded = load(path, step=f['step'].value, dtype=f['dtype'].value, tokenizer=f['tokenizer'].value)
    sampling = sampling_for(path, f['temperature'].value, f['top_k'].value, f['top_p'].value)
    return loaded, sampling
