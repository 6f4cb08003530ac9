"""KV caches for decoding: layout, allocation, sharding and size.

Axis legend: B batch, S cache slots (one per position), M layers of a stack.
A cache is {stack name: {entry: [M, B, S, ...]}} for the scanned stacks ('dense_layers', 'moe_layers'),
plus {'mtp_0': {entry: [B, S, ...]}} when the MTP module drafts (speculative decoding). The entries
per token per layer come from `attention.cache_entry_shapes`: K and V for MHA/GQA, and for MLA only
the normed kv latent (kv_lora_rank) and the roped shared key (qk_rope_head_dim).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax import sharding
from dsjax.config import ModelConfig
from dsjax.model.attention import cache_entry_axes, cache_entry_shapes


def stacks(cfg: ModelConfig, mtp: bool = False) -> dict[str, int | None]:
    """Cached stacks and their layer counts (None: a single unscanned layer, the MTP module)."""
    out = {name: n for name, n in (('dense_layers', cfg.num_dense_layers), ('moe_layers', cfg.num_moe_layers))
           if n}
    if mtp:
        if not cfg.num_nextn_predict_layers:
            raise ValueError('a draft (MTP) cache needs model.num_nextn_predict_layers >= 1')
        out['mtp_0'] = None
    return out


def init_cache(cfg: ModelConfig, batch: int, length: int, mtp: bool = False) -> dict:
    """A zero cache of `length` slots per row, in the compute dtype."""
    entries = cache_entry_shapes(cfg)
    out = {}
    for name, layers in stacks(cfg, mtp).items():
        lead = (batch, length) if layers is None else (layers, batch, length)
        out[name] = {e: jnp.zeros(lead + shape, cfg.dtype) for e, shape in entries.items()}
    return out


def cache_shardings(cfg: ModelConfig, mesh, mtp: bool = False, rules=sharding.DEFAULT_RULES) -> dict:
    """NamedShardings of `init_cache`'s arrays by the logical rules: rows over the batch axes, MHA kv
    heads over `tensor`; the MLA latent has no head axis, so it is only split by rows."""
    specs = {}
    for name, layers in stacks(cfg, mtp).items():
        lead = ('batch', 'act_len') if layers is None else ('layers', 'batch', 'act_len')
        specs[name] = {e: P(*lead, *axes) for e, axes in cache_entry_axes(cfg).items()}
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def values_per_token_per_layer(cfg: ModelConfig) -> int:
    """Cached values one token adds to one layer."""
    return sum(math.prod(shape) for shape in cache_entry_shapes(cfg).values())


def bytes_per_token_per_layer(cfg: ModelConfig) -> int:
    """MLA: (kv_lora_rank + qk_rope_head_dim) x dtype bytes; MHA/GQA: 2 x kv heads x head dim x bytes."""
    return values_per_token_per_layer(cfg) * jnp.dtype(cfg.dtype).itemsize


def mha_values_per_token_per_layer(cfg: ModelConfig) -> int:
    """What full multi-head attention with MLA's heads would cache: K and V, n_h x d_h each."""
    head = cfg.qk_nope_head_dim if cfg.attention_type == 'mla' else cfg.attn_head_dim
    return 2 * cfg.num_attention_heads * head


def cache_bytes(cache) -> int:
    """Bytes held by a cache pytree (or its shapes)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
