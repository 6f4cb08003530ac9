"""The batch-size ramp of V3's pre-training: sequences per step grow with the tokens trained.

V3 grew its batch from 3,072 to 15,360 sequences over the first 469B tokens (paper 4.2). Here the size at
step s is `start + (end - start) * T_s / tokens`, T_s the tokens trained before step s, rounded down to a
whole number of `granule` rows (a micro-batch: the step computes only the micro-batches that hold data)
and reaching `end` once T_s >= `tokens`. Tokens trained by a step are what the learning-rate phases
(optim's schedule 'phases') are measured in.
"""
import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Sequences per step from `start` to `end` over the first `tokens` tokens (no ramp: start == end)."""
    start: int
    end: int
    tokens: float
    granule: int
    seq_len: int

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Sequences of each step of the ramp, up to the first step at `end` (empty without a ramp)."""
        sizes, trained = [], 0
        while self.start < self.end and trained < self.tokens:
            size = self.start + (self.end - self.start) * trained / self.tokens
            sizes.append(min(self.end, max(self.start, int(size // self.granule) * self.granule)))
            trained += sizes[-1] * self.seq_len
        return np.asarray(sizes, np.int64)

    @functools.cached_property
    def _trained(self) -> np.ndarray:
        """Tokens trained before each step of the ramp and after its last: [len(sizes) + 1]."""
        return np.concatenate([[0], np.cumsum(self.sizes * self.seq_len)])

    def batch_size(self, step: int) -> int:
        """Sequences step `step` trains on."""
        return int(self.sizes[step]) if step < len(self.sizes) else self.end

    def tokens_before(self, step: int) -> int:
        """Tokens trained by steps 0 .. step-1 (exact, on the host)."""
        n = len(self.sizes)
        return int(self._trained[min(step, n)]) + max(0, step - n) * self.end * self.seq_len

    def steps_for(self, tokens: float) -> int:
        """The number of steps that trains at least `tokens` tokens."""
        n = len(self.sizes)
        if tokens <= self._trained[-1]:
            return int(np.searchsorted(self._trained, tokens))
        return n + int(-(-(tokens - self._trained[-1]) // (self.end * self.seq_len)))

    def tokens_before_traced(self, step):
        """`tokens_before` of a traced step, in float32 (the learning-rate schedule's clock)."""
        n = len(self.sizes)
        table = jnp.asarray(self._trained, jnp.float32)
        after = table[-1] + jnp.maximum(step - n, 0).astype(jnp.float32) * float(self.end * self.seq_len)
        return jnp.where(step < n, table[jnp.clip(step, 0, n)], after)


def from_config(data_cfg, micro_batches: int = 1) -> BatchRamp:
    """The ramp of `config.data` (batch_ramp_start -> batch_size over batch_ramp_tokens; none when the start
    is 0), growing by whole micro-batches of batch_size / micro_batches rows."""
    return BatchRamp(start=data_cfg.batch_ramp_start or data_cfg.batch_size, end=data_cfg.batch_size,
                     tokens=float(data_cfg.batch_ramp_tokens), granule=data_cfg.batch_size // micro_batches,
                     seq_len=data_cfg.seq_len)
