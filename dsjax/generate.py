"""Generate text from a trained run or a HF checkpoint.

    python -m dsjax.generate --model=runs/v3_small --prompt='def fibonacci(n):' --max_new_tokens=64
    python -m dsjax.generate --model=/ckpt/DeepSeek-V2-Lite --prompt=a --prompt=b --temperature=0.6 --top_p=0.95
    python -m dsjax.generate --model=runs/v3_small --prompt='import os' --speculative   # MTP drafts

--model is a dsjax run directory (or its checkpoints/ directory) written by `dsjax.main`, or a HF
checkpoint directory (config.json + safetensors + tokenizer.json), or a Hub id (owner/name[@revision]).
Each prompt is framed like the training documents ([bos] + tokens) and continued until EOS or
--max_new_tokens. Sampling follows the checkpoint's generation_config.json (greedy without one); the
sampling flags override it.
"""
import json
import sys
import time

from absl import flags
import jax

from dsjax import cli
from dsjax.infer import loading

_FLAGS = loading.define_flags()
flags.adopt_module_key_flags(loading)
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for a batch.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file with one prompt per line.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens generated per prompt.')
_SPECULATIVE = flags.DEFINE_bool('speculative', False, 'Greedy decoding with the MTP module drafting (V3).')
_CACHE_LENGTH = flags.DEFINE_integer('cache_length', None, 'KV cache slots (default: prompt + new tokens).')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per prompt (text, tokens, logprobs).')


def _prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        try:
            with open(_PROMPTS_FILE.value, encoding='utf-8') as f:
                prompts += [line.rstrip('\n') for line in f if line.strip()]
        except OSError as e:
            raise FileNotFoundError(f'--prompts_file={_PROMPTS_FILE.value!r}: {e.strerror}') from e
    if not prompts:
        raise ValueError('give --prompt=TEXT (repeatable) or --prompts_file=FILE')
    return prompts


def main():
    prompts = _prompts()
    loaded, sampling = loading.load_from_flags(_FLAGS)
    start = time.perf_counter()
    rows, stats = loading.complete(loaded, prompts, sampling=sampling, max_new_tokens=_MAX_NEW.value,
                                   speculative=_SPECULATIVE.value, key=jax.random.PRNGKey(_FLAGS['seed'].value),
                                   cache_length=_CACHE_LENGTH.value)
    seconds = time.perf_counter() - start
    for row in rows:
        print(json.dumps(row) if _JSON.value else f"{row['prompt']}{row['completion']}\n")
    summary = f"{sum(len(r['tokens']) for r in rows)} tokens in {seconds:.2f} s (compile included)"
    if stats:
        summary += f"; MTP drafts accepted {stats['acceptance_rate']:.0%}, {stats['tokens_per_step']:.2f} tokens/step"
    print(summary, file=sys.stderr)


if __name__ == '__main__':
    cli.run(main)
