"""Rotary position embeddings: plain RoPE, YaRN and Llama-3 frequencies, and both pair conventions.

Axis legend: B batch, L length, N heads, K rotated width (rope_dim), J = K/2 frequency pairs.
Conventions: `interleaved` rotates (x[2j], x[2j+1]) as DeepSeek-V2/V3 checkpoints do
(DeepSeek's reference uses complex pairs); half-split rotates (x[j], x[j+K/2]) as Llama does.
"""
import math

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, RopeScaling


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude correction m = 0.1 * mscale * ln(factor) + 1 (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The pair index whose wavelength fits `rotations` times into `max_pos` tokens."""
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def llama3_frequencies(inv_freq_J: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama-3.1's scaling: pairs whose wavelength exceeds original / low_freq_factor are divided by
    `factor`, those shorter than original / high_freq_factor kept, and the ones between blended
    linearly in original / wavelength."""
    orig = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength_J = 2 * math.pi / inv_freq_J
    smooth_J = np.clip((orig / wavelength_J - low) / (high - low), 0.0, 1.0)
    return inv_freq_J * ((1 - smooth_J) / scaling.factor + smooth_J)


def inv_frequencies(dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies [J], YaRN- or llama3-interpolated as `scaling.type` says."""
    inv_freq_J = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling.type == 'llama3':
        return llama3_frequencies(inv_freq_J, scaling).astype(np.float32)
    if scaling.type != 'yarn':
        return inv_freq_J.astype(np.float32)
    orig = scaling.original_max_position_embeddings
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, theta, orig)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, theta, orig)), dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty range
    # ramp 0 keeps the original frequency (high-frequency pairs), 1 divides it by the factor.
    ramp_J = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    return (inv_freq_J / scaling.factor * ramp_J + inv_freq_J * (1 - ramp_J)).astype(np.float32)


def cos_sin_scale(scaling: RopeScaling) -> float:
    """Factor on cos and sin (HF's `attention_factor`); 1.0 for every DeepSeek config."""
    if scaling.type != 'yarn':
        return 1.0
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor, 1.0)


def softmax_scale(head_dim: int, scaling: RopeScaling) -> float:
    """1/sqrt(head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3)."""
    scale = head_dim ** -0.5
    if scaling.type == 'yarn' and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def cos_sin(positions_BxL, cfg: ModelConfig):
    """cos and sin [B, L, J] in float32 for integer positions."""
    inv_freq_J = jnp.asarray(inv_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling))
    angles_BxLxJ = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_J
    s = cos_sin_scale(cfg.rope_scaling)
    return jnp.cos(angles_BxLxJ) * s, jnp.sin(angles_BxLxJ) * s


def apply_rope(x_BxLxNxK, cos_BxLxJ, sin_BxLxJ, interleaved: bool):
    """Rotates the last axis of x by the given angles, in float32, in the chosen pair convention."""
    dtype = x_BxLxNxK.dtype
    x = x_BxLxNxK.astype(jnp.float32)
    cos, sin = cos_BxLxJ[:, :, None, :], sin_BxLxJ[:, :, None, :]
    if interleaved:
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
        return out.reshape(x.shape).astype(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)
