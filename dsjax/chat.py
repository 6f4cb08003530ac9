"""Interactive chat that streams each reply token by token.

    python -m dsjax.chat --model=/ckpt/DeepSeek-V2-Lite-Chat --temperature=0.6 --top_p=0.95
    python -m dsjax.chat --model=runs/v3_small          # no chat template: a plain User/Assistant one
    python -m dsjax.chat --model=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B   # a Hub id, downloaded once

Sampling follows the checkpoint's generation_config.json (greedy without one); the flags override it.

Commands at the prompt: /reset (new conversation), /exit (or end of input). The conversation stays in
the KV cache between turns (dsjax/infer/chat.py).
"""
import sys

from absl import flags

from dsjax import cli
from dsjax.infer import chat, loading

_FLAGS = loading.define_flags()
flags.adopt_module_key_flags(loading)
_SYSTEM = flags.DEFINE_string('system', None, 'A system prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 512, 'Most tokens per reply.')
_CACHE_LENGTH = flags.DEFINE_integer('cache_length', None, 'KV cache slots for the whole conversation '
                                     '(default: min(max_position_embeddings, 4096)).')


def main():
    loaded, sampling = loading.load_from_flags(_FLAGS)
    session = chat.ChatSession(loaded, sampling=sampling, max_new_tokens=_MAX_NEW.value,
                               cache_length=_CACHE_LENGTH.value, system=_SYSTEM.value, seed=_FLAGS['seed'].value)
    print('Chat: /reset starts over, /exit (or Ctrl-D) quits.', file=sys.stderr)
    while True:
        try:
            text = input('\n>>> ')
        except EOFError:
            break
        if text.strip() == '/exit':
            break
        if text.strip() == '/reset':
            session.reset()
            continue
        try:
            session.reply(text, emit=lambda s: print(s, end='', flush=True))
        except ValueError as e:
            print(f'\n[{e}]', file=sys.stderr)
        print()


if __name__ == '__main__':
    cli.run(main)
