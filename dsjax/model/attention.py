"""Attention: MHA/GQA (DeepSeek-LLM) and Multi-head Latent Attention (DeepSeek-V2/V3).

Axis legend: B batch, L query length, S key length, D model width, N query heads, G kv heads,
Q = N/G queries per kv head, K qk head width, U value head width,
C query latent rank (q_lora_rank), R kv latent rank (kv_lora_rank), P rope width, J = P/2.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model import rope
from dsjax.model.layers import RMSNorm, constrain, param, weight

# A large negative instead of -inf keeps fully-masked rows (padding) finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(segment_ids_BxL) -> jax.Array:
    """[B, L, L] True where query t may see key s: s <= t and both in the same document."""
    length = segment_ids_BxL.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_LxL[None] & same_doc_BxLxL


def dot_product_attention(q_BxLxGxQxK, k_BxSxGxK, v_BxSxGxU, mask_BxLxS, scale: float):
    """Softmax attention in float32, grouped so kv heads are shared by Q query heads."""
    logits = jnp.einsum('BLGQK,BSGK->BGQLS', q_BxLxGxQxK, k_BxSxGxK,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_BxLxS[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxU.dtype)
    return jnp.einsum('BGQLS,BSGU->BLGQU', probs, v_BxSxGxU)


class MHA(nn.Module):
    """Multi-head attention with optional grouped kv heads (GQA); RoPE over the whole head."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, mask_BxLxS):
        cfg = self.cfg
        d, n, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        b, length = x_BxLxD.shape[:2]
        q_BxLxNxK = jnp.einsum('BLD,DNK->BLNK', x_BxLxD, weight(self, 'q', (d, n, k), ('embed', 'heads', 'head_dim'), cfg))
        k_BxLxGxK = jnp.einsum('BLD,DGK->BLGK', x_BxLxD, weight(self, 'k', (d, g, k), ('embed', 'kv_heads', 'head_dim'), cfg))
        v_BxLxGxK = jnp.einsum('BLD,DGK->BLGK', x_BxLxD, weight(self, 'v', (d, g, k), ('embed', 'kv_heads', 'head_dim'), cfg))
        q_BxLxNxK = rope.apply_rope(q_BxLxNxK, cos, sin, cfg.rope_interleave)
        k_BxLxGxK = rope.apply_rope(k_BxLxGxK, cos, sin, cfg.rope_interleave)
        q_BxLxNxK = constrain(q_BxLxNxK, ('batch', 'act_len', 'act_heads', None))
        k_BxLxGxK = constrain(k_BxLxGxK, ('batch', 'act_len', 'act_kv_heads', None))
        scale = rope.softmax_scale(k, cfg.rope_scaling)
        out = dot_product_attention(q_BxLxNxK.reshape(b, length, g, n // g, k), k_BxLxGxK, v_BxLxGxK,
                                    mask_BxLxS, scale)
        out_BxLxNxK = out.reshape(b, length, n, k)
        o_NxKxD = weight(self, 'o', (n, k, d), ('heads', 'head_dim', 'embed'), cfg)
        return jnp.einsum('BLNK,NKD->BLD', out_BxLxNxK, o_NxKxD)


class MLA(nn.Module):
    """Multi-head Latent Attention: low-rank queries, one shared kv latent plus a shared RoPE key.

    The rope slices use the checkpoint's pair convention (`rope_interleave`), so HF weights load
    unpermuted. The naive path is used here (training, prefill): keys and values are expanded
    from the latent per head.
    """
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        d, n = cfg.hidden_size, cfg.num_attention_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a = param(self, 'q_a', (d, cfg.q_lora_rank), ('embed', 'q_lora'), cfg)
            self.q_a_norm = RMSNorm(cfg, eps=1e-6)
            self.q_b = param(self, 'q_b', (cfg.q_lora_rank, n, qk), ('q_lora', 'heads', 'head_dim'), cfg)
        else:
            self.q = param(self, 'q', (d, n, qk), ('embed', 'heads', 'head_dim'), cfg)
        self.kv_a = param(self, 'kv_a', (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim), ('embed', 'kv_lora'), cfg)
        self.kv_a_norm = RMSNorm(cfg, eps=1e-6)
        self.kv_b = param(self, 'kv_b', (cfg.kv_lora_rank, n, cfg.qk_nope_head_dim + cfg.v_head_dim),
                               ('kv_lora', 'heads', 'head_dim'), cfg)
        self.o = param(self, 'o', (n, cfg.v_head_dim, d), ('heads', 'head_dim', 'embed'), cfg)

    def w(self, p):
        return p.astype(self.cfg.dtype)

    def queries(self, x_BxLxD, cos, sin):
        """Per-head (nope, roped) query parts: [B, L, N, K-P] and [B, L, N, P]."""
        cfg = self.cfg
        if cfg.q_lora_rank:
            c_BxLxC = self.q_a_norm(jnp.einsum('BLD,DC->BLC', x_BxLxD, self.w(self.q_a)))
            q_BxLxNxK = jnp.einsum('BLC,CNK->BLNK', c_BxLxC, self.w(self.q_b))
        else:
            q_BxLxNxK = jnp.einsum('BLD,DNK->BLNK', x_BxLxD, self.w(self.q))
        q_BxLxNxK = constrain(q_BxLxNxK, ('batch', 'act_len', 'act_heads', None))
        q_nope, q_rope = jnp.split(q_BxLxNxK, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, rope.apply_rope(q_rope, cos, sin, cfg.rope_interleave)

    def latent(self, x_BxLxD, cos, sin):
        """What the MLA cache holds: the normed kv latent [B, L, R] and the roped shared key [B, L, P]."""
        cfg = self.cfg
        kv_BxLxRP = jnp.einsum('BLD,DR->BLR', x_BxLxD, self.w(self.kv_a))
        c_BxLxR, k_rope_BxLxP = jnp.split(kv_BxLxRP, [cfg.kv_lora_rank], axis=-1)
        k_rope_BxLxP = rope.apply_rope(k_rope_BxLxP[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0]
        return self.kv_a_norm(c_BxLxR), k_rope_BxLxP

    def scale(self):
        return rope.softmax_scale(self.cfg.qk_nope_head_dim + self.cfg.qk_rope_head_dim, self.cfg.rope_scaling)

    def __call__(self, x_BxLxD, cos, sin, mask_BxLxS):
        cfg = self.cfg
        n = cfg.num_attention_heads
        q_nope, q_rope = self.queries(x_BxLxD, cos, sin)
        c_BxSxR, k_rope_BxSxP = self.latent(x_BxLxD, cos, sin)
        kv_BxSxNxK = jnp.einsum('BSR,RNK->BSNK', c_BxSxR, self.w(self.kv_b))
        k_nope, v_BxSxNxU = jnp.split(kv_BxSxNxK, [cfg.qk_nope_head_dim], axis=-1)
        k_rope_BxSxNxP = jnp.broadcast_to(k_rope_BxSxP[:, :, None, :], k_nope.shape[:3] + (cfg.qk_rope_head_dim,))
        q_BxLxNxK = jnp.concatenate([q_nope, q_rope], axis=-1)
        k_BxSxNxK = constrain(jnp.concatenate([k_nope, k_rope_BxSxNxP], axis=-1),
                              ('batch', 'act_len', 'act_heads', None))
        # Every query head has its own key head: grouped attention with N groups of one query.
        out = dot_product_attention(q_BxLxNxK[:, :, :, None, :], k_BxSxNxK, v_BxSxNxU, mask_BxLxS, self.scale())
        out_BxLxNxU = out[:, :, :, 0, :]
        return jnp.einsum('BLNU,NUD->BLD', out_BxLxNxU, self.w(self.o))
