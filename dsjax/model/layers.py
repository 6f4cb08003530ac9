"""Building blocks: RMSNorm, embeddings, logically-partitioned weights and the SwiGLU MLP.

Axis legend: B batch, L length, D model width, F ffn width, V vocab.
Weights are stored [in, out] (Flax kernels), the transpose of HF's torch layout.
"""
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import fp8 as fp8_lib


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], cfg: ModelConfig,
          init=None) -> jax.Array:
    """A parameter in param_dtype, annotated with logical axis names (normal(initializer_range) init)."""
    init = init or nn.initializers.normal(stddev=cfg.initializer_range)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        jnp.dtype(cfg.param_dtype))


def weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], cfg: ModelConfig,
           init=None) -> jax.Array:
    """`param`, cast to the compute dtype."""
    return param(module, name, shape, axes, cfg, init).astype(cfg.dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (a no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, tuple(axes))


def dense(x, w, contract: int = 1, fp8: bool = False, **dot_kwargs) -> jax.Array:
    """x [..., *in] @ w [*in, *out] -> [..., *out] for the `contract` trailing axes of x (w's leading
    ones), as one 2-D matmul over the flattened rows. The same product as an einsum like 'BLD,DF->BLF',
    but its weight gradient is then [T, D]^T @ [T, F] rather than a contraction over both B and L, which
    XLA on the CPU runs only after a transposed copy of the [B, L, F] activation (llm_small's MLP
    forward + backward: 49 -> 18 ms on 2 cores). `fp8`: the matmul and its two backward GEMMs in FP8
    (fp8.fp8_dot; the weight's 128 x 128 blocks tile the flattened [in, out] matrix, as in V3's checkpoints)."""
    lead, inner = x.shape[:x.ndim - contract], math.prod(w.shape[:contract])
    x2, w2 = x.reshape(-1, inner), w.reshape(inner, -1)
    y = fp8_lib.fp8_dot(x2, w2) if fp8 else jnp.matmul(x2, w2, **dot_kwargs)
    return y.reshape(*lead, *w.shape[contract:])


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as HF does)."""
    cfg: ModelConfig
    eps: float | None = None

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        scale = param(self, 'scale', (dim,), ('norm',), self.cfg, nn.initializers.ones)
        eps = self.cfg.rms_norm_eps if self.eps is None else self.eps
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


class Embed(nn.Module):
    """Token embedding [V, D] (its transpose is the head when tied)."""
    cfg: ModelConfig

    def setup(self):
        self.embedding = param(self, 'embedding', (self.cfg.vocab_size, self.cfg.hidden_size),
                               ('vocab', 'embed'), self.cfg)

    def __call__(self, tokens_BxL):
        x_BxLxD = jnp.take(self.embedding, tokens_BxL, axis=0).astype(self.cfg.dtype)
        return constrain(x_BxLxD, ('batch', 'act_len', 'act_embed'))


def swiglu(gate, up):
    """silu(gate) * up. Written out rather than jax.nn.silu, which is a nested jit: its call boundary kept
    XLA from fusing the backward of silu with the product's, costing an extra transposed copy of [T, F]
    per layer (llm_small's MLP forward + backward alone: 33 -> 21 ms on 2 CPU cores)."""
    return gate * jax.nn.sigmoid(gate) * up


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); `width` overrides intermediate_size (MoE shared experts)."""
    cfg: ModelConfig
    width: int | None = None

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        f = self.width or cfg.intermediate_size
        d = cfg.hidden_size
        gate_DxF = weight(self, 'gate', (d, f), ('embed', 'mlp'), cfg)
        up_DxF = weight(self, 'up', (d, f), ('embed', 'mlp'), cfg)
        down_FxD = weight(self, 'down', (f, d), ('mlp', 'embed'), cfg)
        h_BxLxF = swiglu(dense(x_BxLxD, gate_DxF, fp8=cfg.fp8), dense(x_BxLxD, up_DxF, fp8=cfg.fp8))
        h_BxLxF = constrain(h_BxLxF, ('batch', 'act_len', 'act_mlp'))
        return dense(h_BxLxF, down_FxD, fp8=cfg.fp8)
