"""DeepSeekMoE: routers (V2 softmax / V3 sigmoid with a selection bias), balance losses, dispatch.

Axis legend: B batch, L length, T tokens (B*L), D model width, E routed experts, K experts per
token, F expert ffn width, G expert groups (devices / nodes), A assignments (T*K), C capacity;
expert parallel: N expert shards, S rows per destination buffer, R rows received (N*S).
All routing math runs in float32, as HF and DeepSeek's reference do.
"""
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P
import tokamax

from dsjax.config import ModelConfig
from dsjax.model import fp8 as fp8_lib
from dsjax.model.layers import MLP, constrain, param, swiglu, weight
from dsjax.sharding import BATCH_AXES


# ---------------------------------------------------------------- routing (pure functions)

def scores_from_logits(logits_TxE, scoring_func: str):
    """Affinities s: softmax over experts (V2) or an independent sigmoid per expert (V3)."""
    if scoring_func == 'softmax':
        return jax.nn.softmax(logits_TxE, axis=-1)
    return jax.nn.sigmoid(logits_TxE)


def _keep_top_groups(choice_TxE, group_score_TxG, topk_group: int):
    """Masks (to -inf) every expert outside the `topk_group` best groups."""
    t, e = choice_TxE.shape
    g = group_score_TxG.shape[-1]
    _, top_groups_TxM = jax.lax.top_k(group_score_TxG, topk_group)
    keep_TxG = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], top_groups_TxM].set(True)
    keep_TxE = jnp.repeat(keep_TxG, e // g, axis=-1)
    # -inf, not 0: biased V3 scores can be negative, and 0 would let masked experts win.
    return jnp.where(keep_TxE, choice_TxE, -jnp.inf)


def select_experts(scores_TxE, bias_E, cfg: ModelConfig):
    """Top-k routing. Returns gate weights [T, K] (float32) and expert indices [T, K].

    greedy: top-k of s. group_limited_greedy (V2): groups scored by their max s, keep topk_group.
    noaux_tc (V3): s + bias chooses (groups scored by the sum of their top-2), s weighs.
    """
    k, g = cfg.num_experts_per_tok, cfg.n_group
    t, e = scores_TxE.shape
    if cfg.topk_method == 'greedy':
        choice_TxE = scores_TxE
    elif cfg.topk_method == 'group_limited_greedy':
        group_score_TxG = scores_TxE.reshape(t, g, e // g).max(axis=-1)
        choice_TxE = _keep_top_groups(scores_TxE, group_score_TxG, cfg.topk_group)
    else:  # noaux_tc
        biased_TxE = scores_TxE + bias_E
        top2 = jax.lax.top_k(biased_TxE.reshape(t, g, e // g), 2)[0]
        choice_TxE = _keep_top_groups(biased_TxE, top2.sum(axis=-1), cfg.topk_group)
    _, idx_TxK = jax.lax.top_k(choice_TxE, k)
    weights_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
    if cfg.norm_topk_prob:
        weights_TxK = weights_TxK / (weights_TxK.sum(axis=-1, keepdims=True) + 1e-20)
    return weights_TxK * cfg.routed_scaling_factor, idx_TxK


def expert_counts(idx_TxK, mask_T, num_experts: int):
    """Tokens routed to each expert [E] (float32), counting only real (mask=1) tokens."""
    onehot_TxKxE = jax.nn.one_hot(idx_TxK, num_experts, dtype=jnp.float32)
    return jnp.einsum('TKE,T->E', onehot_TxKxE, mask_T.astype(jnp.float32))


def max_violation(load_E):
    """MaxVio = (max load - mean load) / mean load (the auxiliary-loss-free paper's metric)."""
    mean = load_E.mean(axis=-1)
    return (load_E.max(axis=-1) - mean) / jnp.maximum(mean, 1e-9)


def bias_update(bias_LxE, load_LxE, rate):
    """b += rate * sign(mean load - load): overloaded experts become less attractive."""
    mean_Lx1 = load_LxE.mean(axis=-1, keepdims=True)
    return bias_LxE + rate * jnp.sign(mean_Lx1 - load_LxE)


# ---------------------------------------------------------------- balance losses (per sequence)

def _frequencies(idx_BxLxK, mask_BxL, num_experts: int, k: int):
    """f_i = E / (K T) * number of tokens of the sequence routed to i: [B, E]."""
    onehot = jax.nn.one_hot(idx_BxLxK, num_experts, dtype=jnp.float32).sum(axis=2)  # [B, L, E]
    tokens_B = jnp.maximum(mask_BxL.sum(axis=1), 1.0)
    counts_BxE = jnp.einsum('BLE,BL->BE', onehot, mask_BxL)
    return counts_BxE * num_experts / (k * tokens_B[:, None])


def _mean_prob(probs_BxLxE, mask_BxL):
    """P_i = mean over the sequence's real tokens of the affinity: [B, E]."""
    tokens_B = jnp.maximum(mask_BxL.sum(axis=1), 1.0)
    return jnp.einsum('BLE,BL->BE', probs_BxLxE, mask_BxL) / tokens_B[:, None]


def expert_balance_loss(scores_BxLxE, idx_BxLxK, mask_BxL, k: int):
    """V2 expert-level loss sum_i f_i P_i (before alpha1), averaged over sequences."""
    e = scores_BxLxE.shape[-1]
    f_BxE = _frequencies(idx_BxLxK, mask_BxL, e, k)
    return (f_BxE * _mean_prob(scores_BxLxE, mask_BxL)).sum(axis=-1).mean()


def device_balance_loss(scores_BxLxE, idx_BxLxK, mask_BxL, k: int, groups: int):
    """V2 device-level loss sum_d f'_d P'_d: f' averages f over a group, P' sums P over it."""
    b, _, e = scores_BxLxE.shape
    f_BxGxE = _frequencies(idx_BxLxK, mask_BxL, e, k).reshape(b, groups, e // groups)
    p_BxGxE = _mean_prob(scores_BxLxE, mask_BxL).reshape(b, groups, e // groups)
    return (f_BxGxE.mean(axis=-1) * p_BxGxE.sum(axis=-1)).sum(axis=-1).mean()


def comm_balance_loss(scores_BxLxE, idx_BxLxK, mask_BxL, groups: int, topk_group: int):
    """V2 communication loss sum_d f''_d P''_d, f''_d = G/(M T) * tokens sent to group d."""
    b, _, e = scores_BxLxE.shape
    group_of_BxLxK = idx_BxLxK // (e // groups)
    sent_BxLxG = jax.nn.one_hot(group_of_BxLxK, groups, dtype=jnp.float32).max(axis=2)
    tokens_B = jnp.maximum(mask_BxL.sum(axis=1), 1.0)
    f_BxG = jnp.einsum('BLG,BL->BG', sent_BxLxG, mask_BxL) * groups / (topk_group * tokens_B[:, None])
    p_BxG = _mean_prob(scores_BxLxE, mask_BxL).reshape(b, groups, e // groups).sum(axis=-1)
    return (f_BxG * p_BxG).sum(axis=-1).mean()


def sequence_balance_loss(scores_BxLxE, mask_BxL, k: int):
    """V3 sequence-wise loss sum_i f_i P_i with s' = s / sum_j s_j.

    f counts the plain top-k of the unbiased scores, as the paper's eq. 18 writes it (whether
    DeepSeek counted the biased selection instead is unverified).
    """
    e = scores_BxLxE.shape[-1]
    _, top_BxLxK = jax.lax.top_k(scores_BxLxE, k)
    f_BxE = _frequencies(top_BxLxK, mask_BxL, e, k)
    normed = scores_BxLxE / (scores_BxLxE.sum(axis=-1, keepdims=True) + 1e-20)
    return (f_BxE * _mean_prob(normed, mask_BxL)).sum(axis=-1).mean()


# ---------------------------------------------------------------- dispatch strategies
# Each takes fp8: every expert GEMM (and its two backward GEMMs) in FP8 (dsjax/model/fp8.py).

def _per_group(spec: str, x, w, fp8: bool):
    """einsum(spec, x, w) for a product per group ('ECD,EDF->ECF'): fp8_lib.fp8_dot when `fp8`."""
    return fp8_lib.fp8_dot(x, w) if fp8 else jnp.einsum(spec, x, w)


def dispatch_dense(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False):
    """Reference: every expert on every token, combined with the (mostly zero) gate matrix."""
    del capacity
    e = gate_ExDxF.shape[0]
    gates_TxE = jnp.einsum('TK,TKE->TE', weights_TxK, jax.nn.one_hot(idx_TxK, e, dtype=weights_TxK.dtype))
    # fp8_dot takes one group of rows per expert: all the tokens, broadcast.
    x, spec = (jnp.broadcast_to(x_TxD, (e,) + x_TxD.shape), 'ETD,EDF->ETF') if fp8 else (x_TxD, 'TD,EDF->ETF')
    h_ExTxF = swiglu(_per_group(spec, x, gate_ExDxF, fp8), _per_group(spec, x, up_ExDxF, fp8))
    y_ExTxD = _per_group('ETF,EFD->ETD', h_ExTxF, down_ExFxD, fp8)
    return jnp.einsum('ETD,TE->TD', y_ExTxD, gates_TxE.astype(y_ExTxD.dtype)), jnp.zeros((), jnp.float32)


def _sort_by_expert(weights_TxK, idx_TxK, num_experts: int):
    """Assignments ordered by expert, highest gate weight first within an expert."""
    t, k = idx_TxK.shape
    expert_A, weight_A = idx_TxK.reshape(-1), weights_TxK.reshape(-1)
    by_weight_A = jnp.argsort(-weight_A)
    order_A = by_weight_A[jnp.argsort(expert_A[by_weight_A], stable=True)]
    sizes_E = jnp.bincount(expert_A, length=num_experts)
    token_A = order_A // k
    return order_A, token_A, expert_A[order_A], sizes_E


@jax.custom_vjp
def _permute_rows(x_NxD, order_N, inverse_N):
    """x[order] for a permutation `order` with inverse `inverse`; its backward is the inverse gather, where
    XLA's transpose of a gather is a scatter-add (atomics on a GPU) that does not know the rows are distinct."""
    return x_NxD[order_N]


def _permute_rows_fwd(x_NxD, order_N, inverse_N):
    return x_NxD[order_N], (order_N, inverse_N)


def _permute_rows_bwd(res, g_NxD):
    order_N, inverse_N = res
    return g_NxD[inverse_N], None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)

# tokamax kernels behind `dispatch_ragged`, first that applies: megablox (Pallas Mosaic TPU; dims >= 128) on
# TPU, Pallas Mosaic GPU (Hopper and later) then Triton on NVIDIA GPUs; XLA's own ragged_dot, the exact
# reference, where none applies (on the CPU a masked dot over every expert: 'grouped' is the CPU's choice).
RAGGED_KERNELS = {'tpu': ('mosaic', 'xla'), 'gpu': ('mosaic', 'triton', 'xla')}


def platform() -> str:
    """The platform being compiled for: the devices of the mesh set by `jax.set_mesh` (a TPU topology when
    compiling ahead of time on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


# Dimension numbers of ragged_dot, y = x [A, D] . w [E, D, F] over D in x's groups of rows, and of its
# gradients: dx = dy [A, F] . w over F in the same groups; dw = x . dy over A, one [D, F] per group.
_Y_DIMS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [1]), ([], [])),
                                            lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DX_DIMS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
_DW_DIMS = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
# checkpoint_name() of the routed experts' GEMM outputs: remat policy 'save_dots' keeps them.
EXPERT_RESIDUALS = ('expert_gemm',)


def _tokamax(lhs, rhs, sizes_E, dims, out_dtype):
    """tokamax.ragged_dot_general with the backend's kernel (RAGGED_KERNELS)."""
    # tokamax reads absl flags, parsing sys.argv for them when no absl app has: under pytest or in a
    # notebook those arguments are not flags, so it gets the defaults instead.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # The TPU kernel refuses HIGHEST for 16-bit operands, whose products are exact at DEFAULT anyway.
    precision = jax.lax.Precision.DEFAULT if jnp.dtype(lhs.dtype).itemsize == 2 else None
    return tokamax.ragged_dot_general(lhs, rhs, sizes_E, dims, precision=precision, preferred_element_type=out_dtype,
                                      implementation=RAGGED_KERNELS.get(platform(), ('xla',)))


def _saved(gemm_out):
    """A routed-expert GEMM's output, named for the remat policies (EXPERT_RESIDUALS): their einsums have
    an expert batch axis and tokamax's kernels are custom calls, so 'save_dots' would not keep them."""
    return checkpoint_name(gemm_out, EXPERT_RESIDUALS[0])


@jax.custom_vjp
def ragged_dot(x_AxD, w_ExDxF, sizes_E):
    """x's rows, in groups of `sizes_E` consecutive rows, each times its group's w [D, F], in x's dtype.

    tokamax's own VJP keeps the product as its residual, so under a remat policy the forward GEMM ran
    again in the backward (8 grouped GEMMs per MoE layer instead of 6, counted in the jaxpr); this one
    keeps only the operands, and `checkpoint_name` lets the policy keep the product.
    """
    return _tokamax(x_AxD, w_ExDxF, sizes_E, _Y_DIMS, x_AxD.dtype)


def _ragged_dot_fwd(x_AxD, w_ExDxF, sizes_E):
    return ragged_dot(x_AxD, w_ExDxF, sizes_E), (x_AxD, w_ExDxF, sizes_E)


def _ragged_dot_bwd(res, dy_AxF):
    x_AxD, w_ExDxF, sizes_E = res
    return (_tokamax(dy_AxF, w_ExDxF, sizes_E, _DX_DIMS, x_AxD.dtype),
            _tokamax(x_AxD, dy_AxF, sizes_E, _DW_DIMS, w_ExDxF.dtype), None)


ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def dispatch_ragged(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False):
    """Dropless grouped GEMMs (`ragged_dot`) over the assignments sorted by expert: only the routed
    rows are computed (T x K x D x F x 3 multiply-adds), whatever the number of experts.

    Rows move by permutations both ways (`_permute_rows`), gate and up run as one GEMM of width 2F.
    """
    del capacity
    t, k = idx_TxK.shape
    e, d, f = gate_ExDxF.shape
    with jax.named_scope('permute'):
        expert_A = idx_TxK.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)  # sorted row -> assignment (token t * k + slot)
        inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(t * k, dtype=order_A.dtype))
        sizes_E = jnp.bincount(expert_A, length=e).astype(jnp.int32)
        x_AxD = _permute_rows(jnp.repeat(x_TxD, k, axis=0), order_A, inverse_A)
    with jax.named_scope('experts'):
        if fp8:  # gate and up keep their own 128 x 128 blocks (concatenated, a block could straddle both)
            dot = fp8_lib.fp8_ragged_dot
            h_AxF = swiglu(_saved(dot(x_AxD, gate_ExDxF, sizes_E)), _saved(dot(x_AxD, up_ExDxF, sizes_E)))
        else:
            dot = ragged_dot
            gate_up_AxF2 = _saved(dot(x_AxD, jnp.concatenate([gate_ExDxF, up_ExDxF], axis=-1), sizes_E))
            h_AxF = swiglu(gate_up_AxF2[:, :f], gate_up_AxF2[:, f:])
        y_AxD = _saved(dot(h_AxF, down_ExFxD, sizes_E))
    with jax.named_scope('combine'):
        y_TxKxD = _permute_rows(y_AxD, inverse_A, order_A).reshape(t, k, d)
        y_TxD = jnp.einsum('TKD,TK->TD', y_TxKxD, weights_TxK.astype(y_TxKxD.dtype))
    return y_TxD, jnp.zeros((), jnp.float32)


def dispatch_gather(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False):
    """Each assignment through its own expert's gathered weights ([T, K, D, F]): reads and computes the
    selected experts only, T x K of them, for decoding, where T x K is at most E (`MoE` picks it then)."""
    del capacity
    if fp8:  # fp8_dot per assignment: groups of one row, each with its expert's blocks
        t, k = idx_TxK.shape
        x_Ax1xD, idx_A = jnp.repeat(x_TxD, k, axis=0)[:, None], idx_TxK.reshape(-1)
        h_Ax1xF = swiglu(fp8_lib.fp8_dot(x_Ax1xD, gate_ExDxF[idx_A]), fp8_lib.fp8_dot(x_Ax1xD, up_ExDxF[idx_A]))
        y_TxKxD = fp8_lib.fp8_dot(h_Ax1xF, down_ExFxD[idx_A]).reshape(t, k, -1)
    else:
        h_TxKxF = swiglu(jnp.einsum('TD,TKDF->TKF', x_TxD, gate_ExDxF[idx_TxK]),
                         jnp.einsum('TD,TKDF->TKF', x_TxD, up_ExDxF[idx_TxK]))
        y_TxKxD = jnp.einsum('TKF,TKFD->TKD', h_TxKxF, down_ExFxD[idx_TxK])
    return jnp.einsum('TKD,TK->TD', y_TxKxD, weights_TxK.astype(y_TxKxD.dtype)), jnp.zeros((), jnp.float32)


def _slots(group_A, priority_A, groups: int):
    """Each assignment's slot within its group (0, 1, ...), highest priority first."""
    order_A, _, group_sorted_A, sizes_G = _sort_by_expert(priority_A[:, None], group_A[:, None], groups)
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    return jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]) - starts_G[group_sorted_A])


def _capacity_experts(x_AxD, expert_A, priority_A, gate_ExDxF, up_ExDxF, down_ExFxD, capacity: int,
                      buffer_axes=('act_exp', None, 'act_embed'), fp8=False):
    """Each assignment through its expert in fixed [E, C, D] buffers, filled highest priority first.

    Returns y_AxD (zero for an assignment that found no slot) and kept_A.
    """
    d = x_AxD.shape[1]
    e = gate_ExDxF.shape[0]
    with jax.named_scope('permute'):
        slot_A = _slots(expert_A, priority_A, e)
        kept_A = slot_A < capacity
        # Overflow goes to a scratch slot (index `capacity`) that is sliced away, so it reads back as 0.
        slot_A = jnp.where(kept_A, slot_A, capacity)
        buf_ExCxD = jnp.zeros((e, capacity + 1, d), x_AxD.dtype).at[expert_A, slot_A].set(x_AxD)[:, :capacity]
        if buffer_axes:
            buf_ExCxD = constrain(buf_ExCxD, buffer_axes)
    with jax.named_scope('experts'):
        h_ExCxF = swiglu(_saved(_per_group('ECD,EDF->ECF', buf_ExCxD, gate_ExDxF, fp8)),
                         _saved(_per_group('ECD,EDF->ECF', buf_ExCxD, up_ExDxF, fp8)))
        y_ExCxD = _saved(_per_group('ECF,EFD->ECD', h_ExCxF, down_ExFxD, fp8))
    with jax.named_scope('combine'):
        return jnp.pad(y_ExCxD, ((0, 0), (0, 1), (0, 0)))[expert_A, slot_A], kept_A


def dispatch_capacity(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False,
                      priority_TxK=None):
    """Fixed per-expert buffers [E, C, D] and batched einsums; overflow (lowest priority: by default the
    gate) is dropped.

    Returns the output and the fraction of assignments dropped.
    """
    t, k = idx_TxK.shape
    priority_TxK = weights_TxK if priority_TxK is None else priority_TxK
    y_AxD, kept_A = _capacity_experts(jnp.repeat(x_TxD, k, axis=0), idx_TxK.reshape(-1), priority_TxK.reshape(-1),
                                      gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=fp8)
    y_TxD = jnp.einsum('TKD,TK->TD', y_AxD.reshape(t, k, -1), weights_TxK.astype(y_AxD.dtype))
    return y_TxD, 1.0 - kept_A.mean()


def expert_parallel_buffers(capacity: int, tokens: int, t: int, n: int, e_local: int, k: int) -> tuple[int, int]:
    """Per-device buffer sizes of `dispatch_expert_parallel`, from `capacity` (slots per expert for all
    `tokens`) scaled to one shard's t tokens, share = capacity * t / tokens:

    rows (S): assignments one shard sends one destination shard, its e_local experts' shares; at most
      t * min(K, e_local), the most it can be owed (an expert takes a token at most once), which is what
      a dropless `capacity` (= tokens) gives. With capacity_factor f that is f * t * K / N, the balanced
      load: this is V2's device-level capacity.
    slots (C): assignments one local expert takes from its N senders, N shares (at most the N x S received).
    """
    share = capacity * t / tokens
    rows = min(t * min(k, e_local), math.ceil(e_local * share))
    return rows, min(n * rows, math.ceil(n * share))


def dispatch_expert_parallel(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False,
                             priority_TxK=None):
    """Experts split over the mesh's `expert` axis (N shards); assignments travel by all_to_all.

    Uses the mesh set by `jax.set_mesh`; tokens stay split over the batch axes, so each shard routes
    its t local tokens into N per-destination buffers of S rows and each expert keeps C of the rows it
    receives (`expert_parallel_buffers`). Both stages drop the lowest gates first, as `dispatch_capacity`
    does, and `dropped` counts both. A dropless `capacity` (every token) sizes them for the worst case,
    N x the routed rows at V3's layout. Without a mesh, or with fewer tokens than batch shards (decoding
    a row or a few), this is `dispatch_capacity`, whose [E, C, D] buffers split over `expert` as the
    weights do.
    """
    mesh = jax.sharding.get_abstract_mesh()
    tokens, k = idx_TxK.shape
    e, d = gate_ExDxF.shape[:2]
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = 0 if mesh.empty else math.prod(mesh.shape[a] for a in batch_axes)
    if mesh.empty or 'expert' not in mesh.axis_names or tokens % shards:
        return dispatch_capacity(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8,
                                 priority_TxK)
    priority_TxK = weights_TxK if priority_TxK is None else priority_TxK
    n = mesh.shape['expert']
    if e % n:
        raise ValueError(f'expert_parallel needs mesh.expert={n} to divide the {e} experts')
    t, e_local = tokens // shards, e // n
    rows, slots = expert_parallel_buffers(capacity, tokens, t, n, e_local, k)

    def local(x_TxD, weights_TxK, priority_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD):
        dest_A, expert_A = jnp.divmod(idx_TxK.reshape(-1), e_local)
        priority_A = jax.lax.stop_gradient(priority_TxK.reshape(-1))
        slot_A = _slots(dest_A, priority_A, n)
        sent_A = slot_A < rows
        # What finds no row goes to a scratch row (index `rows`) that is never sent.
        slot_A = jnp.where(sent_A, slot_A, rows)

        def exchange(values_A, fill):
            """[A, ...] -> [N, S, ...] per-destination buffers, swapped along `expert`."""
            buf = jnp.full((n, rows + 1) + values_A.shape[1:], fill, values_A.dtype).at[dest_A, slot_A].set(values_A)
            return jax.lax.all_to_all(buf[:, :rows], 'expert', 0, 0).reshape((n * rows,) + values_A.shape[1:])

        x_RxD = exchange(jnp.repeat(x_TxD, k, axis=0), 0)
        expert_R = exchange(expert_A, 0)
        # Empty rows rank below every real assignment, so they never take a real one's slot.
        priority_R = exchange(priority_A, -jnp.inf)
        y_RxD, kept_R = _capacity_experts(x_RxD, expert_R, priority_R, gate_ExDxF, up_ExDxF, down_ExFxD,
                                          slots, buffer_axes=None, fp8=fp8)
        y_NxSxD = jax.lax.all_to_all(y_RxD.reshape(n, rows, d), 'expert', 0, 0)
        y_TxKxD = jnp.pad(y_NxSxD, ((0, 0), (0, 1), (0, 0)))[dest_A, slot_A].reshape(t, k, d)
        y_TxD = jnp.einsum('TKD,TK->TD', y_TxKxD, weights_TxK.astype(y_TxKxD.dtype))
        dropped = (jnp.sum(~sent_A, dtype=jnp.float32)
                   + jnp.sum(~kept_R & (priority_R > -jnp.inf), dtype=jnp.float32))
        return y_TxD, jax.lax.psum(dropped, batch_axes)

    tok, exp = P(batch_axes), P('expert')
    y_TxD, dropped = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, tok, exp, exp, exp),
                                   out_specs=(tok, P()))(x_TxD, weights_TxK, priority_TxK, idx_TxK, gate_ExDxF, up_ExDxF,
                                                         down_ExFxD)
    return y_TxD, dropped / (tokens * k)


def grouped_block_size(assignments: int, num_experts: int) -> int:
    """Rows per block of `dispatch_grouped`: the largest power of two (8..256) that keeps the padding
    under a quarter of the assignments (each non-empty expert pads at most block - 1 rows)."""
    block = 8
    while block < 256 and num_experts * (2 * block - 1) <= assignments // 4:
        block *= 2
    return block


def _grouped_rows(idx_TxK, num_experts: int, block: int):
    """The padded sorted layout of `dispatch_grouped`.

    Returns (row_A: the row of each assignment, src_R: the assignment of each row or A for padding,
    expert_N: the expert of each block); rows R = N * block, N a static bound on the blocks needed.
    """
    t, k = idx_TxK.shape
    a, e = t * k, num_experts
    expert_A = idx_TxK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)  # sorted position -> assignment
    expert_sorted_A = expert_A[order_A]
    sizes_E = jnp.bincount(expert_A, length=e)
    blocks_E = (sizes_E + block - 1) // block
    block_end_E = jnp.cumsum(blocks_E)
    start_E = jnp.cumsum(sizes_E) - sizes_E
    row_sorted_A = (block_end_E - blocks_E)[expert_sorted_A] * block + jnp.arange(a) - start_E[expert_sorted_A]
    # Each of at most min(E, A) non-empty experts pads fewer than `block` rows.
    n = (a + min(e, a) * (block - 1)) // block
    row_A = jnp.zeros((a,), jnp.int32).at[order_A].set(row_sorted_A.astype(jnp.int32))
    src_R = jnp.full((n * block,), a, jnp.int32).at[row_A].set(jnp.arange(a, dtype=jnp.int32))
    # Blocks past the last expert's are all padding; they borrow the last expert's weights.
    expert_N = jnp.minimum(jnp.searchsorted(block_end_E, jnp.arange(n), side='right'), e - 1)
    return row_A, src_R, expert_N


def dispatch_grouped(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, fp8=False,
                     block=None):
    """Dropless grouped matmul from dense ops: assignments sorted by expert into blocks of `block`
    rows, each block padded to one expert's; each block multiplies its own expert's weights (gathered
    per block, [N, D, F]).

    Cost: the activated FLOPs times at most 1.25 (padding, `grouped_block_size`) plus copies of the
    expert weights per block (about 5x the expert weights), so it follows the tokens, not E x tokens
    as `dispatch_dense` does, and never drops. The CPU stand-in for `ragged_dot`, which jax lowers on
    CPU to a masked dense dot over every expert.
    """
    del capacity
    t, d = x_TxD.shape
    k = idx_TxK.shape[1]
    e = gate_ExDxF.shape[0]
    block = block or grouped_block_size(t * k, e)
    with jax.named_scope('permute'):
        row_A, src_R, expert_N = _grouped_rows(idx_TxK, e, block)
        n = expert_N.shape[0]
        # Padding rows read a zero token (row t).
        token_R = jnp.where(src_R < t * k, src_R // k, t)
        x_NxBxD = jnp.concatenate([x_TxD, jnp.zeros((1, d), x_TxD.dtype)])[token_R].reshape(n, block, d)
    with jax.named_scope('experts'):
        # With fp8 each block quantises its gathered copy of the expert's weights: the same 128 x 128 blocks.
        h_NxBxF = swiglu(_saved(_per_group('NBD,NDF->NBF', x_NxBxD, gate_ExDxF[expert_N], fp8)),
                         _saved(_per_group('NBD,NDF->NBF', x_NxBxD, up_ExDxF[expert_N], fp8)))
        y_RxD = _saved(_per_group('NBF,NFD->NBD', h_NxBxF, down_ExFxD[expert_N], fp8)).reshape(n * block, d)
    with jax.named_scope('combine'):
        y_TxKxD = y_RxD[row_A].reshape(t, k, d)
        y_TxD = jnp.einsum('TKD,TK->TD', y_TxKxD, weights_TxK.astype(y_TxKxD.dtype))
    return y_TxD, jnp.zeros((), jnp.float32)


DISPATCH = {
    'dense': dispatch_dense,
    'ragged': dispatch_ragged,
    'grouped': dispatch_grouped,
    'gather': dispatch_gather,  # chosen by inference_dispatch, not by config: training would gather [T, K, D, F]
    'capacity': dispatch_capacity,
    'expert_parallel': dispatch_expert_parallel,
}


DROPPING = ('capacity', 'expert_parallel')  # the dispatches that drop over capacity (take `priority_TxK`)


def resolve_dispatch(name: str, capacity_factor: float, backend: str | None = None) -> str:
    """The DISPATCH entry behind `name`; 'auto' picks per backend (benchmarks/moe_dispatch.py, device.py).

    capacity_factor > 0 asks for V2-style drops: 'capacity' (cost follows T x K x factor). Dropless:
    'ragged' (tokamax's grouped GEMM kernels, routed rows only) on TPU and GPU; 'grouped' (dense blocks
    sorted by expert) on the CPU, where ragged_dot is a masked dot over every expert (as slow as 'dense').
    """
    if name != 'auto':
        return name
    if capacity_factor > 0:
        return 'capacity'
    return 'grouped' if (backend or platform()) == 'cpu' else 'ragged'


def inference_dispatch(name: str, assignments: int, num_experts: int, backend: str | None = None) -> str:
    """The dispatch where nothing may be dropped (evaluation, decoding): with at most one assignment per
    expert (T x K <= E, decoding a few rows) 'gather', which reads only the selected experts' weights;
    'capacity' (whose buffers would then hold every token for every expert) gives way to the backend's
    dropless choice. The dense reference stays dense, and experts split over a mesh's `expert` axis
    stay with `dispatch_expert_parallel`."""
    if name == 'dense' or (name == 'expert_parallel' and _experts_split()):
        return name
    if assignments <= num_experts:
        return 'gather'
    return resolve_dispatch('auto', 0.0, backend) if name in ('capacity', 'expert_parallel') else name


def _experts_split() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.shape.get('expert', 1) > 1


def drop_priority(gates_TxK, mask_BxL, cfg: ModelConfig):
    """Who keeps a slot when capacity runs out: the gate, raised above every gate (gates are at most
    routed_scaling_factor) for the real tokens of every round(1 / never_drop_fraction)-th row (V2's ~10% of
    sequences that are never dropped). float32, no gradient."""
    priority_TxK = jax.lax.stop_gradient(gates_TxK).astype(jnp.float32)
    if not cfg.never_drop_fraction:
        return priority_TxK
    b = mask_BxL.shape[0]
    period = max(1, round(1 / cfg.never_drop_fraction))
    protected_BxL = (jnp.arange(b) % period == 0)[:, None] & (mask_BxL > 0)
    return priority_TxK + protected_BxL.reshape(-1, 1) * (cfg.routed_scaling_factor + 1.0)


def capacity_per_expert(tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert: capacity_factor x the balanced share, or every token when the factor is 0."""
    if cfg.capacity_factor <= 0:
        return tokens
    return min(tokens, max(1, math.ceil(tokens * cfg.num_experts_per_tok / cfg.n_routed_experts * cfg.capacity_factor)))


# ---------------------------------------------------------------- the layer

class MoE(nn.Module):
    """Shared experts + fine-grained routed experts. Returns (output, aux) with aux holding
    `load` [E] (tokens per expert), `balance_loss` (alpha-weighted sum) and `dropped`."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool = True):
        cfg = self.cfg
        b, length, d = x_BxLxD.shape
        e, f, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        router_DxE = param(self, 'router', (d, e), ('embed', None), cfg)
        bias = self.variable('moe_bias', 'bias',
                             nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                             jax.random.PRNGKey(0), (e,), jnp.float32)
        bias_E = nn.meta.unbox(bias.value)
        with jax.named_scope('router'):
            logits_TxE = jnp.einsum('TD,DE->TE', x_BxLxD.reshape(-1, d).astype(jnp.float32),
                                    router_DxE.astype(jnp.float32))
            scores_TxE = scores_from_logits(logits_TxE, cfg.scoring_func)
            weights_TxK, idx_TxK = select_experts(scores_TxE, jax.lax.stop_gradient(bias_E), cfg)

        gate_ExDxF = weight(self, 'gate', (e, d, f), ('exp', 'embed', 'mlp'), cfg)
        up_ExDxF = weight(self, 'up', (e, d, f), ('exp', 'embed', 'mlp'), cfg)
        down_ExFxD = weight(self, 'down', (e, f, d), ('exp', 'mlp', 'embed'), cfg)
        name = resolve_dispatch(cfg.moe_dispatch, cfg.capacity_factor)
        if deterministic:  # evaluation and decoding: only what is routed is computed
            name = inference_dispatch(name, b * length * k, e)
        dispatch = DISPATCH[name]
        # V2 drops overflow only in training; evaluation never drops.
        capacity = capacity_per_expert(b * length, cfg) if not deterministic else b * length
        x_TxD = x_BxLxD.reshape(-1, d)
        # Padding gets zero gates: capacity is filled highest gate first, so padding can never push a
        # real token out of an expert (its output is unused anyway).
        gates_TxK = (weights_TxK * mask_BxL.reshape(-1, 1)).astype(x_TxD.dtype)
        prioritised = {'priority_TxK': drop_priority(gates_TxK, mask_BxL, cfg)} if name in DROPPING else {}
        y_TxD, dropped = dispatch(x_TxD, gates_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity, cfg.fp8,
                                  **prioritised)
        y_BxLxD = y_TxD.reshape(b, length, d)
        if cfg.n_shared_experts:
            y_BxLxD = y_BxLxD + MLP(cfg, width=cfg.n_shared_experts * f, name='shared')(x_BxLxD)

        with jax.named_scope('router'):  # its balance losses
            mask = mask_BxL.astype(jnp.float32)
            scores_BxLxE = scores_TxE.reshape(b, length, e)
            idx_BxLxK = idx_TxK.reshape(b, length, k)
            loss = jnp.zeros((), jnp.float32)
            if cfg.aux_loss_alpha:
                if cfg.seq_aux:
                    loss += cfg.aux_loss_alpha * sequence_balance_loss(scores_BxLxE, mask, k)
                else:
                    loss += cfg.aux_loss_alpha * expert_balance_loss(scores_BxLxE, idx_BxLxK, mask, k)
            if cfg.device_aux_alpha:
                loss += cfg.device_aux_alpha * device_balance_loss(scores_BxLxE, idx_BxLxK, mask, k, cfg.n_group)
            if cfg.comm_aux_alpha:
                loss += cfg.comm_aux_alpha * comm_balance_loss(scores_BxLxE, idx_BxLxK, mask, cfg.n_group,
                                                               cfg.topk_group)
        aux = {'load': expert_counts(idx_TxK, mask.reshape(-1), e), 'balance_loss': loss, 'dropped': dropped}
        return y_BxLxD, aux
