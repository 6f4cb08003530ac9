"""Attention: MHA/GQA (DeepSeek-LLM) and Multi-head Latent Attention (DeepSeek-V2/V3).

Axis legend: B batch, L query length, S key length, D model width, N query heads, G kv heads,
Q = N/G queries per kv head, K qk head width, U value head width,
C query latent rank (q_lora_rank), R kv latent rank (kv_lora_rank), P rope width, J = P/2.

Cached decoding: a layer's cache is a dict of [B, S, ...] arrays whose slot s holds the entry of the
token at position s (`cache_entry_shapes`). A cached call writes its L new entries at their positions,
then attends over all S slots, seeing slot s from position p iff s <= p. Slots past a row's position
may hold stale entries (padding, rejected drafts); they are masked until overwritten.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # MLA widths (fused_attention)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from dsjax.config import FUSED_ATTENTION_DTYPES, ModelConfig
from dsjax.model import rope
from dsjax.model.layers import RMSNorm, constrain, dense, param, weight
from dsjax.sharding import BATCH_AXES

# A large negative instead of -inf keeps fully-masked rows (padding) finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# checkpoint_name()s of what recomputed_attention's backward needs beyond q, k, v: the remat policy
# 'save_attention' keeps them, so a rematted layer recomputes its projections but not its attention.
ATTENTION_RESIDUALS = ('attention_out', 'attention_lse')
# Query and key block of the splash kernel: the TPU's 128 lanes.
SPLASH_BLOCK = 128


def attention_mask(segment_ids_BxL) -> jax.Array:
    """[B, L, L] True where query t may see key s: s <= t and both in the same document."""
    length = segment_ids_BxL.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_LxL[None] & same_doc_BxLxL


def cache_entry_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per token per layer cache entries: K and V per kv head (MHA/GQA); MLA only the normed latent
    and the roped shared key."""
    if cfg.attention_type == 'mla':
        return {'latent': (cfg.kv_lora_rank,), 'rope_key': (cfg.qk_rope_head_dim,)}
    return {'k': (cfg.num_key_value_heads, cfg.attn_head_dim), 'v': (cfg.num_key_value_heads, cfg.attn_head_dim)}


def cache_entry_axes(cfg: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of the per-token entries (after [B, S]); the MLA latent has no head axis to split."""
    if cfg.attention_type == 'mla':
        return {'latent': (None,), 'rope_key': (None,)}
    return {'k': ('act_kv_heads', None), 'v': ('act_kv_heads', None)}


def cache_mask(positions_BxL, length: int) -> jax.Array:
    """[B, L, S] True where a query at position p may see cache slot s: s <= p."""
    return jnp.arange(length)[None, None, :] <= positions_BxL[:, :, None]


def write_cache(cache_BxSxX, new_BxLxX, positions_BxL) -> jax.Array:
    """Writes each row's L new entries into the slots of their positions (out-of-range writes drop)."""
    rows_Bx1 = jnp.arange(new_BxLxX.shape[0])[:, None]
    return cache_BxSxX.at[rows_Bx1, positions_BxL].set(new_BxLxX.astype(cache_BxSxX.dtype), mode='drop')


def resolve_impl(cfg: ModelConfig, qk_dim: int, v_dim: int, backend: str | None = None, length: int = 0) -> str:
    """The kernel behind `cfg.attention_impl` for (uncached) self-attention of `length` tokens: 'auto' picks
    cudnn on a GPU for bf16/fp16 compute where cuDNN's flash kernel takes the head widths (`cudnn_takes`),
    splash on a TPU when the length fills its blocks, blocked on the CPU (measured: README, Performance),
    else xla."""
    if cfg.attention_impl != 'auto':
        return cfg.attention_impl
    backend = backend or jax.default_backend()
    if backend == 'gpu' and cfg.dtype in FUSED_ATTENTION_DTYPES and cudnn_takes(qk_dim, v_dim):
        return 'cudnn'
    if backend == 'tpu':
        return 'splash' if length and length % SPLASH_BLOCK == 0 else 'xla'
    return 'blocked' if backend == 'cpu' else 'xla'


def cudnn_takes(qk_dim: int, v_dim: int, compute_capability: str | None = None) -> bool:
    """Whether cuDNN's flash attention takes these head widths on this GPU (`compute_capability`, default
    the first device's): equal widths up to 128 anywhere; up to 256 and values narrower than the keys
    (MLA's 192 / 128) from Hopper (9.0) on, with cuDNN >= 9.10 (jax's check at trace time)."""
    if qk_dim == v_dim <= 128:
        return True
    if compute_capability is None:
        compute_capability = getattr(jax.devices()[0], 'compute_capability', '0')
    return float(compute_capability) >= 9.0 and qk_dim <= 256 and qk_dim % 8 == 0 and v_dim % 8 == 0


def self_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, segment_ids_BxL, scale: float, impl: str = 'xla'):
    """Causal self-attention within documents: query t sees key s iff s <= t and both carry the same
    segment id (attention_mask; 0 marks padding). impl 'blocked' runs causal query blocks that never
    build the [B, L, L] mask (causal_block_attention), 'splash' runs the TPU flash kernel
    (splash_attention); the others go through dot_product_attention."""
    if impl == 'blocked':
        return causal_block_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, segment_ids_BxL, scale)
    if impl == 'splash':
        return splash_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, segment_ids_BxL, scale)
    return dot_product_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, attention_mask(segment_ids_BxL), scale, impl,
                                 causal=True)


def dot_product_attention(q_BxLxGxQxK, k_BxSxGxK, v_BxSxGxU, mask_BxLxS, scale: float, impl: str = 'xla',
                          causal: bool = False):
    """Softmax attention under an explicit mask, grouped so kv heads are shared by Q query heads.
    impl 'xla': einsums and a float32 softmax; otherwise the fused kernel `impl` (fused_attention), told
    by `causal` that the mask hides every key after its query, so it can skip those blocks."""
    if impl != 'xla':
        return fused_attention(q_BxLxGxQxK, k_BxSxGxK, v_BxSxGxU, mask_BxLxS, scale, impl, causal)
    logits = jnp.einsum('BLGQK,BSGK->BGQLS', q_BxLxGxQxK, k_BxSxGxK, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask_BxLxS[:, None, None], logits, _MASK_VALUE), axis=-1)
    return jnp.einsum('BGQLS,BSGU->BLGQU', probs.astype(v_BxSxGxU.dtype), v_BxSxGxU)


def _block_logits(q_XxRxK, k_XxSxK, seg_q_XxR, seg_k_XxS, pos_R, scale):
    """Masked float32 logits [X, R, S] of one query block: row r (at position pos_R[r]) sees key s iff
    s <= pos_R[r] and their segments match (so every row sees at least itself, padding included)."""
    logits = jnp.einsum('XRK,XSK->XRS', q_XxRxK, k_XxSxK, preferred_element_type=jnp.float32) * scale
    keys_S = jnp.arange(k_XxSxK.shape[1])
    visible = (keys_S[None, None, :] <= pos_R[None, :, None]) & (seg_q_XxR[:, :, None] == seg_k_XxS[:, None, :])
    return jnp.where(visible, logits, _MASK_VALUE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def recomputed_attention(q_XxRxK, k_XxSxK, v_XxSxU, seg_q_XxR, seg_k_XxS, pos_R, scale):
    """One query block's attention over X = batch x kv-head rows (_block_logits' mask) with a
    flash-style backward: the forward keeps only the output and the rows' logsumexp, the backward
    recomputes the probabilities from them, so no [R, S] array is saved between the passes (one more
    q @ k^T in the backward)."""
    return _recomputed_attention_fwd(q_XxRxK, k_XxSxK, v_XxSxU, seg_q_XxR, seg_k_XxS, pos_R, scale)[0]


def _recomputed_attention_fwd(q_XxRxK, k_XxSxK, v_XxSxU, seg_q_XxR, seg_k_XxS, pos_R, scale):
    logits = _block_logits(q_XxRxK, k_XxSxK, seg_q_XxR, seg_k_XxS, pos_R, scale)
    top = logits.max(axis=-1, keepdims=True)
    unnormed = jnp.exp(logits - top)
    total = unnormed.sum(axis=-1, keepdims=True)
    out = (jnp.einsum('XRS,XSU->XRU', unnormed.astype(v_XxSxU.dtype), v_XxSxU,
                      preferred_element_type=jnp.float32) / total).astype(v_XxSxU.dtype)
    out = checkpoint_name(out, ATTENTION_RESIDUALS[0])
    lse = checkpoint_name(top + jnp.log(total), ATTENTION_RESIDUALS[1])
    return out, (q_XxRxK, k_XxSxK, v_XxSxU, seg_q_XxR, seg_k_XxS, pos_R, out, lse)


def _recomputed_attention_bwd(scale, res, dout):
    q, k, v, seg_q, seg_k, pos, out, lse = res
    probs = jnp.exp(_block_logits(q, k, seg_q, seg_k, pos, scale) - lse)
    dv = jnp.einsum('XRS,XRU->XSU', probs.astype(v.dtype), dout)
    dprobs = jnp.einsum('XRU,XSU->XRS', dout, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum('XRU,XRU->XR', dout, out, preferred_element_type=jnp.float32)[..., None]
    dlogits = (probs * (dprobs - delta) * scale).astype(q.dtype)
    dq = jnp.einsum('XRS,XSK->XRK', dlogits, k)
    dk = jnp.einsum('XRS,XRK->XSK', dlogits, q)
    return dq, dk, dv, None, None, None


recomputed_attention.defvjp(_recomputed_attention_fwd, _recomputed_attention_bwd)


def query_block(length: int) -> int:
    """causal_block_attention's block: 64 queries (their [64, S] scores stay small enough for a CPU's
    caches), or L / 8 for long sequences (at most 8 blocks: 7/16 of the scores skipped)."""
    return max(64, -(-length // 8))


def causal_block_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, segment_ids_BxL, scale: float):
    """self_attention one block of queries at a time: queries [start, end) attend to keys [0, end)
    only, so the blocks above the diagonal are never computed (4 blocks at L = 256: 3/8 of the
    scores), and the mask comes from positions and segment ids inside each block. Each kv head's
    rows are laid out [B x G, Q x block, K], so every product is one plain batched matmul (the
    [B, L, G, Q, K] einsums cost layout copies per block on the CPU), and no block saves its
    probabilities for the backward (recomputed_attention)."""
    b, length, g, nq, kd = q_BxLxGxQxK.shape
    u = v_BxLxGxU.shape[-1]
    q_XxQxLxK = jnp.moveaxis(q_BxLxGxQxK, 1, 3).reshape(b * g, nq, length, kd)
    k_XxSxK = jnp.moveaxis(k_BxLxGxK, 1, 2).reshape(b * g, length, kd)
    v_XxSxU = jnp.moveaxis(v_BxLxGxU, 1, 2).reshape(b * g, length, u)
    seg_XxS = jnp.repeat(segment_ids_BxL, g, axis=0)
    block = query_block(length)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        rows = nq * (end - start)
        out = recomputed_attention(
            q_XxQxLxK[:, :, start:end].reshape(b * g, rows, kd), k_XxSxK[:, :end], v_XxSxU[:, :end],
            jnp.tile(seg_XxS[:, start:end], (1, nq)), seg_XxS[:, :end], jnp.tile(jnp.arange(start, end), nq), scale)
        outs.append(out.reshape(b * g, nq, end - start, u))
    out_BxGxQxLxU = jnp.concatenate(outs, axis=2).reshape(b, g, nq, length, u)
    return jnp.moveaxis(out_BxGxQxLxU, 3, 1)


def splash_attention(q_BxLxGxQxK, k_BxLxGxK, v_BxLxGxU, segment_ids_BxL, scale: float, interpret: bool = False):
    """self_attention through Pallas' TPU splash kernel (flash attention over causal blocks: the [L, L]
    scores never exist, the blocks above the diagonal are skipped), per device under shard_map: rows
    over the batch axes (or, for fewer rows, kv heads over them), kv heads over `tensor`. `interpret` runs
    the kernel on the CPU (tests)."""
    b, length, g, nq, kd = q_BxLxGxQxK.shape
    q_BxNxLxK = jnp.moveaxis(q_BxLxGxQxK * jnp.asarray(scale, q_BxLxGxQxK.dtype), 1, 3).reshape(b, g * nq, length, kd)
    k_BxGxLxK, v_BxGxLxU = jnp.moveaxis(k_BxLxGxK, 1, 2), jnp.moveaxis(v_BxLxGxU, 1, 2)

    def local(q_BxNxLxK, k_BxGxLxK, v_BxGxLxU, segment_ids_BxL):
        heads = q_BxNxLxK.shape[1]
        mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * heads)
        n = min(SPLASH_BLOCK, length)
        blocks = splash_kernel.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                                          block_kv_dkv_compute=n, block_q_dq=n, block_kv_dq=n)
        kernel = splash_kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                               interpret=interpret)
        per_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(q=seg, kv=seg))
        return jax.vmap(per_row)(q_BxNxLxK, k_BxGxLxK, v_BxGxLxU, segment_ids_BxL)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        tensor = ('tensor',) if 'tensor' in mesh.axis_names else ()
        ways = lambda axes: math.prod(mesh.shape[a] for a in axes)
        rows, head_axes = (batch, tensor) if b % ways(batch) == 0 else (None, batch + tensor)
        # Rows that do not split over the batch axes (batch-1 serving, the init's one row) split their kv
        # heads over those axes too, where the heads divide.
        head_axes = head_axes if g % ways(head_axes) == 0 else tensor
        spec = P(rows, head_axes or None)
        # The kernel's outputs carry no varying-axes annotation, so shard_map cannot check them.
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(rows)), out_specs=spec,
                              check_vma=False)
    out_BxNxLxU = local(q_BxNxLxK, k_BxGxLxK, v_BxGxLxU, segment_ids_BxL)
    return jnp.moveaxis(out_BxNxLxU.reshape(b, g, nq, length, -1), 3, 1)


def fused_attention(q_BxLxGxQxK, k_BxSxGxK, v_BxSxGxU, mask_BxLxS, scale: float, implementation: str,
                    causal: bool = False):
    """The same attention through jax.nn.dot_product_attention (cudnn: a flash kernel that never holds
    the [L, S] scores); with `causal` (queries and keys aligned, the mask causal) the kernel skips the
    blocks above the diagonal. Values narrower than the keys (MLA) go to cuDNN as they are, through the
    binding under jax.nn's wrapper, which insists on equal widths (padding 128 -> 192 cost a third more
    value reads, products and output)."""
    b, length, g, q, k = q_BxLxGxQxK.shape
    u = v_BxSxGxU.shape[-1]
    q_BxLxNxK = q_BxLxGxQxK.reshape(b, length, g * q, k)
    if u == k:
        out_BxLxNxU = jax.nn.dot_product_attention(q_BxLxNxK, k_BxSxGxK, v_BxSxGxU, mask=mask_BxLxS[:, None],
                                                   scale=scale, is_causal=causal, implementation=implementation)
    elif implementation == 'cudnn':
        out_BxLxNxU = cudnn_attention.dot_product_attention(
            q_BxLxNxK, k_BxSxGxK, v_BxSxGxU, mask=mask_BxLxS[:, None], scale=scale,
            mask_type=cudnn_attention.MaskType.CAUSAL if causal else cudnn_attention.MaskType.NO_MASK)
    else:
        raise ValueError(f'fused attention {implementation!r} needs equal key and value widths, not {k} / {u}')
    return out_BxLxNxU.reshape(b, length, g, q, u)


class MHA(nn.Module):
    """Multi-head attention with optional grouped kv heads (GQA) and q/k/v biases (Qwen2's
    `qkv_bias`); RoPE over the whole head. `fresh_cache`: see MLA."""
    cfg: ModelConfig
    fresh_cache: bool = False

    def project(self, x_BxLxD, name: str, heads: int, axis: str):
        """x @ W_name [D, heads, K] (+ the bias [heads, K] with qkv_bias): [B, L, heads, K]."""
        cfg = self.cfg
        d, k = cfg.hidden_size, cfg.attn_head_dim
        y_BxLxHxK = dense(x_BxLxD, weight(self, name, (d, heads, k), ('embed', axis, 'head_dim'), cfg), fp8=cfg.fp8)
        if cfg.qkv_bias:
            y_BxLxHxK = y_BxLxHxK + weight(self, f'{name}_bias', (heads, k), (axis, 'head_dim'), cfg,
                                           nn.initializers.zeros)
        return y_BxLxHxK

    @nn.compact
    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, cache=None, positions_BxL=None):
        """Causal self-attention over x within its documents (`segment_ids`); with `cache` ({'k', 'v'}
        [B, S, G, K]) over the cache instead, masked by position, and returned updated with x's entries
        at `positions`: (out, cache)."""
        cfg = self.cfg
        d, n, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        b, length = x_BxLxD.shape[:2]
        q_BxLxNxK = self.project(x_BxLxD, 'q', n, 'heads')
        k_BxLxGxK = self.project(x_BxLxD, 'k', g, 'kv_heads')
        v_BxLxGxK = self.project(x_BxLxD, 'v', g, 'kv_heads')
        q_BxLxNxK = rope.apply_rope(q_BxLxNxK, cos, sin, cfg.rope_interleave)
        k_BxLxGxK = rope.apply_rope(k_BxLxGxK, cos, sin, cfg.rope_interleave)
        q_BxLxNxK = constrain(q_BxLxNxK, ('batch', 'act_len', 'act_heads', None))
        k_BxSxGxK = constrain(k_BxLxGxK, ('batch', 'act_len', 'act_kv_heads', None))
        v_BxSxGxK = v_BxLxGxK
        q_BxLxGxQxK = q_BxLxNxK.reshape(b, length, g, n // g, k)
        scale = rope.softmax_scale(k, cfg.rope_scaling)
        if cache is None or self.fresh_cache:
            impl = resolve_impl(cfg, k, k, length=length)
            out = self_attention(q_BxLxGxQxK, k_BxSxGxK, v_BxSxGxK, segment_ids_BxL, scale, impl)
        if cache is not None:
            cache = {'k': write_cache(cache['k'], k_BxSxGxK, positions_BxL),
                     'v': write_cache(cache['v'], v_BxSxGxK, positions_BxL)}
            if not self.fresh_cache:
                out = dot_product_attention(q_BxLxGxQxK, cache['k'], cache['v'],
                                            cache_mask(positions_BxL, cache['k'].shape[1]), scale)
        out_BxLxNxK = out.reshape(b, length, n, k)
        o_NxKxD = weight(self, 'o', (n, k, d), ('heads', 'head_dim', 'embed'), cfg)
        out_BxLxD = dense(out_BxLxNxK, o_NxKxD, contract=2, fp8=cfg.fp8)
        return out_BxLxD if cache is None else (out_BxLxD, cache)


class MLA(nn.Module):
    """Multi-head Latent Attention: low-rank queries, one shared kv latent plus a shared RoPE key.

    The rope slices use the checkpoint's pair convention (`rope_interleave`), so HF weights load
    unpermuted. Training uses the naive path (keys and values expanded from the latent per head);
    cached decoding defaults to the absorbed path (`absorb`), which never expands them. With
    `fresh_cache` (a prompt prefilled from position 0: no earlier entries) a cached call attends over its
    own tokens with the training kernels (`self_attention`: flash on GPU and TPU, no [L, S] scores) and
    only writes the cache.
    """
    cfg: ModelConfig
    absorb: bool = True
    fresh_cache: bool = False

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
            c_BxLxC = self.q_a_norm(dense(x_BxLxD, self.w(self.q_a), fp8=cfg.fp8))
            q_BxLxNxK = dense(c_BxLxC, self.w(self.q_b), fp8=cfg.fp8)
        else:
            q_BxLxNxK = dense(x_BxLxD, self.w(self.q), fp8=cfg.fp8)
        q_BxLxNxK = constrain(q_BxLxNxK, ('batch', 'act_len', 'act_heads', None))
        q_nope, q_rope = jnp.split(q_BxLxNxK, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, rope.apply_rope(q_rope, cos, sin, cfg.rope_interleave)

    def latent(self, x_BxLxD, cos, sin):
        """What the MLA cache holds: the normed kv latent [B, L, R] and the roped shared key [B, L, P]."""
        cfg = self.cfg
        kv_BxLxRP = dense(x_BxLxD, self.w(self.kv_a), fp8=cfg.fp8)
        c_BxLxR, k_rope_BxLxP = jnp.split(kv_BxLxRP, [cfg.kv_lora_rank], axis=-1)
        k_rope_BxLxP = rope.apply_rope(k_rope_BxLxP[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0]
        return self.kv_a_norm(c_BxLxR), k_rope_BxLxP

    def scale(self):
        return rope.softmax_scale(self.cfg.qk_nope_head_dim + self.cfg.qk_rope_head_dim, self.cfg.rope_scaling)

    def expanded_attention(self, q_nope, q_rope, c_BxSxR, k_rope_BxSxP, kernel):
        """Naive MLA: per-head keys and values expanded from the latent [B, S, R], attended by
        `kernel(q, k, v, scale)` (self_attention or dot_product_attention); returns [B, L, N, U]."""
        cfg = self.cfg
        kv_BxSxNxK = dense(c_BxSxR, self.w(self.kv_b), fp8=cfg.fp8)
        k_nope, v_BxSxNxU = jnp.split(kv_BxSxNxK, [cfg.qk_nope_head_dim], axis=-1)
        k_rope_BxSxNxP = jnp.broadcast_to(k_rope_BxSxP[:, :, None, :], k_nope.shape[:3] + (cfg.qk_rope_head_dim,))
        q_BxLxNxK = jnp.concatenate([q_nope, q_rope], axis=-1)
        k_BxSxNxK = constrain(jnp.concatenate([k_nope, k_rope_BxSxNxP], axis=-1),
                              ('batch', 'act_len', 'act_heads', None))
        # Every query head has its own key head: grouped attention with N groups of one query.
        return kernel(q_BxLxNxK[:, :, :, None, :], k_BxSxNxK, v_BxSxNxU, self.scale())[:, :, :, 0, :]

    def absorbed_attention(self, q_nope, q_rope, c_BxSxR, k_rope_BxSxP, mask_BxLxS):
        """MLA attending in latent space: W_UK folded into the query, W_UV applied to the attended
        latent, so the cost per cached token is R + P per head instead of expanding K and V."""
        cfg = self.cfg
        w_uk_RxNxK, w_uv_RxNxU = jnp.split(self.w(self.kv_b), [cfg.qk_nope_head_dim], axis=-1)
        q_lat_BxLxNxR = jnp.einsum('BLNK,RNK->BLNR', q_nope, w_uk_RxNxK)
        logits_BxNxLxS = (
            jnp.einsum('BLNR,BSR->BNLS', q_lat_BxLxNxR, c_BxSxR, preferred_element_type=jnp.float32)
            + jnp.einsum('BLNP,BSP->BNLS', q_rope, k_rope_BxSxP, preferred_element_type=jnp.float32)
        ) * self.scale()
        logits_BxNxLxS = jnp.where(mask_BxLxS[:, None], logits_BxNxLxS, _MASK_VALUE)
        probs_BxNxLxS = jax.nn.softmax(logits_BxNxLxS, axis=-1).astype(c_BxSxR.dtype)
        o_lat_BxLxNxR = jnp.einsum('BNLS,BSR->BLNR', probs_BxNxLxS, c_BxSxR)
        return jnp.einsum('BLNR,RNU->BLNU', o_lat_BxLxNxR, w_uv_RxNxU)

    def __call__(self, x_BxLxD, cos, sin, segment_ids_BxL, cache=None, positions_BxL=None):
        """Causal self-attention over x within its documents (`segment_ids`); with `cache` ({'latent'
        [B, S, R], 'rope_key' [B, S, P]}) over the cache instead, masked by position, and returned
        updated with x's entries at `positions`: (out, cache)."""
        q_nope, q_rope = self.queries(x_BxLxD, cos, sin)
        c_BxSxR, k_rope_BxSxP = self.latent(x_BxLxD, cos, sin)
        cfg = self.cfg
        if cache is None or self.fresh_cache:
            impl = resolve_impl(cfg, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim,
                                length=x_BxLxD.shape[1])
            out_BxLxNxU = self.expanded_attention(
                q_nope, q_rope, c_BxSxR, k_rope_BxSxP,
                lambda q, k, v, scale: self_attention(q, k, v, segment_ids_BxL, scale, impl))
        if cache is not None:
            cache = {'latent': write_cache(cache['latent'], c_BxSxR, positions_BxL),
                     'rope_key': write_cache(cache['rope_key'], k_rope_BxSxP, positions_BxL)}
        if cache is not None and not self.fresh_cache:
            c_BxSxR, k_rope_BxSxP = cache['latent'], cache['rope_key']
            mask_BxLxS = cache_mask(positions_BxL, c_BxSxR.shape[1])
            if self.absorb:
                out_BxLxNxU = self.absorbed_attention(q_nope, q_rope, c_BxSxR, k_rope_BxSxP, mask_BxLxS)
            else:
                out_BxLxNxU = self.expanded_attention(
                    q_nope, q_rope, c_BxSxR, k_rope_BxSxP,
                    lambda q, k, v, scale: dot_product_attention(q, k, v, mask_BxLxS, scale))
        out_BxLxD = dense(out_BxLxNxU, self.w(self.o), contract=2, fp8=cfg.fp8)
        return out_BxLxD if cache is None else (out_BxLxD, cache)
