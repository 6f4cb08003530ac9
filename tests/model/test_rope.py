"""RoPE against a plain-numpy rotation, YaRN against HF's rope utilities and the spec's numbers."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import RopeScaling
from dsjax.model import rope


def _numpy_rope(x, positions, theta, interleaved):
    """Rotate each pair (a, b) by angle pos * theta^(-2j/K) with explicit 2x2 matrices."""
    k = x.shape[-1]
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(k // 2):
                angle = positions[b, t] * theta ** (-2 * j / k)
                c, s = math.cos(angle), math.sin(angle)
                ia, ib = (2 * j, 2 * j + 1) if interleaved else (j, j + k // 2)
                a, bb = x[b, t, :, ia], x[b, t, :, ib]
                out[b, t, :, ia] = c * a - s * bb
                out[b, t, :, ib] = s * a + c * bb
    return out


@pytest.mark.parametrize('interleaved', [False, True])
def test_rope_matches_numpy_rotation(interleaved):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 100]])
    inv = jnp.asarray(rope.inv_frequencies(8, 10000.0, RopeScaling()))
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv
    got = rope.apply_rope(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles), interleaved)
    np.testing.assert_allclose(np.asarray(got), _numpy_rope(x, positions, 10000.0, interleaved), atol=1e-5)


def test_rope_preserves_relative_dot_products():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    inv = jnp.asarray(rope.inv_frequencies(16, 10000.0, RopeScaling()))

    def rot(x, p):
        a = jnp.full((1, 1), p, jnp.float32)[..., None] * inv
        return rope.apply_rope(jnp.asarray(x), jnp.cos(a), jnp.sin(a), True)

    d1 = float(jnp.sum(rot(q, 10) * rot(k, 7)))
    d2 = float(jnp.sum(rot(q, 103) * rot(k, 100)))
    assert abs(d1 - d2) < 1e-4


V3_YARN = RopeScaling(type='yarn', factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def test_yarn_v3_numbers_from_spec():
    inv = rope.inv_frequencies(64, 10000.0, V3_YARN)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    # Pairs 0..10 keep their frequency, pairs >= 23 are divided by 40 (low=10, high=23).
    np.testing.assert_allclose(inv[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(inv[23:], base[23:] / 40, rtol=1e-6)
    assert np.all((inv[11:23] < base[11:23]) & (inv[11:23] > base[11:23] / 40))
    m = rope.yarn_mscale(40, 1.0)
    assert abs(m - 1.3689) < 1e-4
    assert abs(rope.softmax_scale(192, V3_YARN) - 0.13523) < 1e-5
    v2 = RopeScaling(type='yarn', factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    assert abs(rope.softmax_scale(192, v2) - 0.11472) < 1e-5
    assert rope.cos_sin_scale(V3_YARN) == 1.0


@pytest.mark.parametrize('scaling', [
    V3_YARN,
    RopeScaling(type='yarn', factor=4.0, original_max_position_embeddings=512, beta_fast=16.0, beta_slow=2.0,
                mscale=0.707, mscale_all_dim=0.707),
    RopeScaling(type='yarn', factor=8.0, original_max_position_embeddings=1024, mscale=1.0, mscale_all_dim=0.0),
])
def test_yarn_matches_hf_rope_utils(scaling):
    import transformers  # parity with HF is part of the suite, never skipped
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': scaling.factor,
              'original_max_position_embeddings': scaling.original_max_position_embeddings,
              'beta_fast': scaling.beta_fast, 'beta_slow': scaling.beta_slow,
              'mscale': scaling.mscale, 'mscale_all_dim': scaling.mscale_all_dim}
    hf = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=params,
                                       max_position_embeddings=4096 * 40)
    inv_hf, attention_factor = ROPE_INIT_FUNCTIONS['yarn'](hf)
    np.testing.assert_allclose(rope.inv_frequencies(64, 10000.0, scaling), inv_hf.numpy(), rtol=1e-6)
    assert abs(rope.cos_sin_scale(scaling) - attention_factor) < 1e-7


LLAMA31 = RopeScaling(type='llama3', factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
                      high_freq_factor=4.0)


def test_llama3_scaling_by_hand():
    """Llama-3.1 (theta 5e5, 128-wide heads): wavelengths under 8192/4 = 2048 tokens keep their frequency,
    those over 8192 are divided by 8, and pair j in between is blended by s = (8192 / wavelength - 1) / 3."""
    inv = rope.inv_frequencies(128, 500000.0, LLAMA31)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    wavelength = 2 * math.pi / base
    short, long_ = wavelength < 2048, wavelength > 8192
    assert short.sum() and long_.sum() and (~short & ~long_).sum()  # all three regimes are present
    np.testing.assert_allclose(inv[short], base[short], rtol=1e-6)
    np.testing.assert_allclose(inv[long_], base[long_] / 8, rtol=1e-6)
    j = int(np.flatnonzero(~short & ~long_)[0])
    s = (8192 / wavelength[j] - 1) / 3
    assert inv[j] == pytest.approx(base[j] * ((1 - s) / 8 + s), rel=1e-6)
    assert rope.cos_sin_scale(LLAMA31) == 1.0 and rope.softmax_scale(128, LLAMA31) == 128 ** -0.5


def test_llama3_matches_hf_rope_utils():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
              'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params,
                                  max_position_embeddings=131072)
    inv_hf, attention_factor = ROPE_INIT_FUNCTIONS['llama3'](hf)
    np.testing.assert_allclose(rope.inv_frequencies(128, 500000.0, LLAMA31), inv_hf.numpy(), rtol=1e-6)
    assert attention_factor == rope.cos_sin_scale(LLAMA31)
