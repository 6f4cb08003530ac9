"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions.

Axis legend: B batch, V vocab.
The order is HF's: divide by the temperature, then keep the top-k, then the top-p nucleus, then draw.
Log-probs are log_softmax(logits / T) of the chosen token over the whole vocabulary (no truncation):
what a GRPO step recomputes from the policy's logits at the sampling temperature T.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each token. temperature 0 is greedy (top_k and top_p then do nothing)."""
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f'temperature={self.temperature!r} is invalid: must be >= 0 (0 is greedy)')
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f'top_k={self.top_k!r} is invalid: must be an integer >= 0 (0 keeps every token)')
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f'top_p={self.top_p!r} is invalid: must be in (0, 1] (1 keeps every token)')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_mask(logits_BxV, k: int):
    """True for the k highest logits of each row (ties at the k-th value are all kept)."""
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return logits_BxV >= kth_Bx1


def top_p_mask(logits_BxV, p: float):
    """True for the smallest set of highest-probability tokens whose mass reaches p (at least one)."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is in the nucleus if the mass strictly above it is still short of p.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    threshold_Bx1 = jnp.min(jnp.where(before_BxV < p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return logits_BxV >= threshold_Bx1


def support(logits_BxV, cfg: SamplingConfig):
    """The tokens that can be drawn under `cfg` (bool [B, V]); logits are already divided by T."""
    keep_BxV = jnp.ones(logits_BxV.shape, bool)
    if cfg.top_k and cfg.top_k < logits_BxV.shape[-1]:
        keep_BxV = top_k_mask(logits_BxV, cfg.top_k)
    if cfg.top_p < 1:
        # The nucleus of the distribution top-k left (HF's order), renormalised over those tokens.
        keep_BxV &= top_p_mask(jnp.where(keep_BxV, logits_BxV, -jnp.inf), cfg.top_p)
    return keep_BxV


def sample(logits_BxV, key, cfg: SamplingConfig):
    """One token per row and its log-prob: (tokens [B] int32, logprobs [B] float32).

    Greedy rows report log_softmax(logits) (temperature 1), the model's own log-prob of its argmax.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.greedy:
        tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled_BxV = logits_BxV / cfg.temperature
        drawable_BxV = jnp.where(support(scaled_BxV, cfg), scaled_BxV, -jnp.inf)
        tokens_B = jax.random.categorical(key, drawable_BxV, axis=-1).astype(jnp.int32)
        logprobs_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    return tokens_B, jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
