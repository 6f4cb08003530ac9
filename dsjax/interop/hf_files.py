"""The files beside a HF checkpoint's weights: the tokenizer's and generation_config.json.

generation_config.json holds the sampling a checkpoint is meant to be used with (DeepSeek-R1: do_sample,
temperature 0.6, top-p 0.95); it is read with transformers' defaults for what it leaves out (greedy
unless do_sample; when sampling, temperature 1, top-k 50, top-p 1).
"""
import json
import pathlib
import shutil

from dsjax.data import tokenizer as tokenizer_lib

GENERATION_CONFIG = 'generation_config.json'
# The HF tokenizer files dsjax reads (dsjax/data/hf_tokenizer.py) and a sentencepiece model's name.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
SENTENCEPIECE_FILE = tokenizer_lib.SENTENCEPIECE_FILE
_HF_SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=50, top_p=1.0)


def read_sampling(directory) -> dict | None:
    """{'temperature', 'top_k', 'top_p'} from DIR/generation_config.json (temperature 0 = greedy), or None
    when there is no such file."""
    file = pathlib.Path(directory) / GENERATION_CONFIG
    if not file.is_file():
        return None
    try:
        gen = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{file} is not valid JSON: {e}') from e
    if not gen.get('do_sample'):
        return dict(temperature=0.0, top_k=0, top_p=1.0)
    out = {k: gen[k] if gen.get(k) is not None else v for k, v in _HF_SAMPLING_DEFAULTS.items()}
    return dict(temperature=float(out['temperature']), top_k=int(out['top_k']), top_p=float(out['top_p']))


def write_generation_config(directory, tokenizer=None, sampling=None) -> None:
    """DIR/generation_config.json: bos/eos/pad ids of `tokenizer` and the sampling of `sampling` (a
    dsjax.infer.sampling.SamplingConfig; None or temperature 0: greedy), as transformers reads them."""
    gen = {}
    if tokenizer is not None:
        gen.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if sampling is not None and sampling.temperature > 0:
        gen.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    else:
        gen['do_sample'] = False
    (pathlib.Path(directory) / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + '\n')


def write_tokenizer(directory, tokenizer) -> None:
    """Writes `tokenizer`'s files into DIR, where transformers' AutoTokenizer and dsjax read them.

    `tokenizer`: a dsjax HFTokenizer or a path to a HF tokenizer.json or its directory (its files are
    copied), or a dsjax SentencePieceTokenizer (written as tokenizer.model with a LlamaTokenizer
    tokenizer_config.json that encodes as sentencepiece does: no prefix space, no legacy handling,
    a bos token first as dsjax frames prompts).
    """
    directory = pathlib.Path(directory)
    model_path = getattr(tokenizer, 'model_path', None)
    if model_path is not None:
        shutil.copyfile(model_path, directory / SENTENCEPIECE_FILE)
        piece = tokenizer.piece
        config = dict(tokenizer_class='LlamaTokenizer', bos_token=piece(tokenizer.bos_id),
                      eos_token=piece(tokenizer.eos_id), pad_token=piece(tokenizer.pad_id), add_bos_token=True,
                      add_eos_token=False, legacy=False, add_prefix_space=False)
        (directory / TOKENIZER_FILES[1]).write_text(json.dumps(config, indent=2) + '\n')
        return
    source = pathlib.Path(getattr(tokenizer, 'path', tokenizer))
    source = source if source.is_dir() else source.parent
    if not (source / TOKENIZER_FILES[0]).is_file():
        raise FileNotFoundError(f'{source} holds no {TOKENIZER_FILES[0]}: give a HF tokenizer directory')
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
