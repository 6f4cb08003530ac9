"""A FLOP model of what the decoder actually computes per token (activated experts only)."""
from dsjax.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    d, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention_type == 'mha':
        k, g = cfg.attn_head_dim, cfg.num_key_value_heads
        return d * n * k + 2 * d * g * k + n * k * d
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * n * qk if cfg.q_lora_rank else d * n * qk
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + n * cfg.v_head_dim * d


def _ffn_params(cfg: ModelConfig, moe: bool) -> int:
    """Matmul weights one token passes through in the FFN: top-k routed + shared + router."""
    d = cfg.hidden_size
    if not moe:
        return 3 * d * cfg.intermediate_size
    f = cfg.moe_intermediate_size
    return d * cfg.n_routed_experts + 3 * d * f * (cfg.num_experts_per_tok + cfg.n_shared_experts)


def activated_matmul_params(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """Weights multiplied per token: every layer, the head, MTP (optional); not the embedding lookup.

    Without MTP this is what DeepSeek reports as "activated parameters" (V3: 36.6B, quoted as 37B).
    """
    attn = _attention_params(cfg)
    layers = cfg.num_dense_layers * (attn + _ffn_params(cfg, False))
    layers += cfg.num_moe_layers * (attn + _ffn_params(cfg, True))
    head = cfg.hidden_size * cfg.vocab_size
    mtp = include_mtp * cfg.num_nextn_predict_layers * (
        2 * cfg.hidden_size ** 2 + attn + _ffn_params(cfg, cfg.num_moe_layers > 0) + head)
    return layers + head + mtp


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of scores and weighted values per token, causal (half the keys on average)."""
    if cfg.attention_type == 'mha':
        qk, v = cfg.attn_head_dim, cfg.attn_head_dim
    else:
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return blocks * 2 * cfg.num_attention_heads * (qk + v) * (seq_len + 1) / 2


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward = 3 x forward, forward = 2 x params + attention."""
    return 3 * (2 * activated_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len))


def measured_matmul_peak(dtype: str = 'float32', size: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul FLOP/s on the default device (best of `repeats`), for MFU."""
    import time

    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
