"""A chat session over the KV cache: the conversation stays cached between turns.

Each turn renders the whole conversation with the chat template (or DeepSeek-LLM's plain
User/Assistant format when the tokenizer has none) and prefills only the tokens past the longest
prefix already in the cache; the reply is then decoded one jitted step per token, so it can stream.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.data import chat as chat_template
from dsjax.infer import cache as cache_lib
from dsjax.infer import decode
from dsjax.infer.loading import Loaded
from dsjax.infer.sampling import SamplingConfig, sample

# Prefill widths are rounded up to a power of two, so a conversation compiles a handful of shapes.
_MIN_PREFILL_WIDTH = 16


def render_plain(tokenizer, messages) -> list[int]:
    """DeepSeek-LLM's chat format for tokenizers without a template (the SFT stage's template, see
    dsjax/data/chat.py): it ends ready for the next assistant reply."""
    return chat_template.render_plain(tokenizer, messages)[0]


def conversation_tokens(tokenizer, messages) -> list[int]:
    """The conversation through the checkpoint's chat template (or `render_plain`), awaiting a reply."""
    return chat_template.prompt_tokens(tokenizer, messages)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """One conversation with a loaded model; `reply` answers a user message, streaming its text."""

    def __init__(self, loaded: Loaded, *, sampling: SamplingConfig = SamplingConfig(),
                 max_new_tokens: int = 512, cache_length: int | None = None, system: str | None = None,
                 seed: int = 0):
        self.cfg, self.variables, self.tokenizer = loaded.cfg, loaded.variables, loaded.tokenizer
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.cache_length = cache_length or min(self.cfg.max_position_embeddings, 4096)
        self.system = system
        self.key = jax.random.PRNGKey(seed)
        self._prefill = jax.jit(functools.partial(decode.prefill, self.cfg), donate_argnames=('cache',))
        self._step = jax.jit(functools.partial(decode.decode_step, self.cfg, sampling=sampling),
                             donate_argnames=('cache',))
        self._sample = jax.jit(functools.partial(sample, cfg=sampling))
        self.reset()

    def reset(self):
        """Forgets the conversation (the cache is reused, its stale slots are masked by position)."""
        self.messages = [{'role': 'system', 'content': self.system}] if self.system else []
        self.cached: list[int] = []  # the tokens whose entries fill cache slots 0 .. len-1
        self.cache = cache_lib.init_cache(self.cfg, 1, self.cache_length)

    def _next_key(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def _prefill_from(self, tokens: list[int], start: int):
        """Runs tokens[start:] into the cache at their positions; logits for the token after the last."""
        suffix = tokens[start:]
        width = max(_MIN_PREFILL_WIDTH, 1 << (len(suffix) - 1).bit_length())
        prompt = np.zeros((1, width), np.int32)
        prompt[0, :len(suffix)] = suffix
        logits, _, self.cache = self._prefill(self.variables, jnp.asarray(prompt), jnp.array([len(suffix)]),
                                              self.cache, jnp.array([start]))
        self.cached = list(tokens)
        return logits

    def reply(self, text: str, emit: Callable[[str], None] = lambda s: None) -> str:
        """Answers `text`, calling `emit` with each new piece of the reply as it is decoded."""
        self.messages.append({'role': 'user', 'content': text})
        tokens = conversation_tokens(self.tokenizer, self.messages)
        room = self.cache_length - len(tokens)
        if room < 1:
            self.messages.pop()
            raise ValueError(f'the conversation ({len(tokens)} tokens) no longer fits the cache '
                             f'(cache_length={self.cache_length}): /reset, or restart with a larger --cache_length')
        # At least one token is prefilled: its logits choose the first reply token.
        start = min(common_prefix(self.cached, tokens), len(tokens) - 1)
        logits = self._prefill_from(tokens, start)
        token, _ = self._sample(logits, self._next_key())
        reply, shown = [], ''
        for _ in range(min(self.max_new_tokens, room)):
            t = int(token[0])
            if t == self.tokenizer.eos_id:
                break
            reply.append(t)
            decoded = self.tokenizer.decode(reply)
            if not decoded.endswith('\ufffd'):  # hold back a partly decoded character
                emit(decoded[len(shown):])
                shown = decoded
            position = len(self.cached)
            self.cached.append(t)
            token, _, self.cache = self._step(self.variables, token, jnp.array([position]), jnp.array([True]),
                                              self.cache, self._next_key())
        answer = self.tokenizer.decode(reply)
        if len(answer) > len(shown):
            emit(answer[len(shown):])
        self.messages.append({'role': 'assistant', 'content': answer})
        return answer
