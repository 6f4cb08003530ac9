"""DeepSeekMoE: routing by hand, balance losses and MaxVio against numpy, every dispatch vs dense."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import aot
from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model import moe
from dsjax.model.transformer import Transformer
from tests.conftest import TINY_MLA_MOE

ROUTING = config_lib.ModelConfig(vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=1,
                                 num_attention_heads=1, num_key_value_heads=1, n_routed_experts=8)
STRATEGIES = ('ragged', 'capacity', 'grouped', 'gather', 'expert_parallel')


def _route(scores, bias=None, **fields):
    cfg = dataclasses.replace(ROUTING, **fields)
    scores = jnp.asarray(scores, jnp.float32)
    bias = jnp.zeros(scores.shape[-1]) if bias is None else jnp.asarray(bias, jnp.float32)
    weights, idx = moe.select_experts(scores, bias, cfg)
    return np.asarray(weights), np.asarray(idx)


def _as_sets(weights_TxK, idx_TxK):
    """Each token's {expert: weight}, so the tests do not depend on top_k's output order."""
    return [{int(i): pytest.approx(float(w), abs=1e-6) for w, i in zip(ws, ids)}
            for ws, ids in zip(weights_TxK, idx_TxK)]


# ---------------------------------------------------------------- routing

V3 = dict(scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2, num_experts_per_tok=2,
          norm_topk_prob=True, routed_scaling_factor=2.5)


def test_v3_noaux_tc_masks_groups_even_when_every_biased_score_is_negative():
    s = [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
         [0.9, 0.8, 0.1, 0.1, 0.5, 0.45, 0.1, 0.1]]
    bias = [-0.15, -2.2, -0.6, -0.75, -1.1, -1.1, -0.9, -1.2]
    # Token 0, biased: [-.05, -2, -.3, -.35, -.6, -.5, -.2, -.4]. Group scores (sum of top-2):
    # -2.05, -.65, -1.1, -.6 -> keep groups 3 and 1. Expert 0 has the best biased score but sits in a
    # masked group; masking to 0 instead of -inf would pick experts 0 and 1 (0 > every kept score).
    # Token 1, biased: [.75, -1.4, -.5, -.65, -.6, -.65, -.8, -1.1] -> groups 0 and 1 -> experts 0, 2;
    # the unbiased top-2 would be 0 and 1. Weights come from the unbiased s, normalised, x 2.5.
    weights, idx = _route(s, bias, **V3)
    assert _as_sets(weights, idx) == [{6: 0.7 / 1.0 * 2.5, 2: 0.3 / 1.0 * 2.5},
                                      {0: 0.9 / 1.0 * 2.5, 2: 0.1 / 1.0 * 2.5}]


def test_v3_weights_are_normalised_unbiased_scores():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=(16, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    weights, idx = _route(s, bias, **V3)
    picked = np.take_along_axis(s, idx, axis=1)
    np.testing.assert_allclose(weights, picked / picked.sum(1, keepdims=True) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(weights.sum(1), 2.5, rtol=1e-6)


V2_SCORES = [[0.30, 0.01, 0.12, 0.13, 0.02, 0.20, 0.11, 0.11]]


def test_v2_group_limited_greedy_scores_groups_by_their_max():
    # Group max: .30, .13, .20, .11 -> keep groups 0 and 2 (by group sum, group 1 would beat group 2).
    weights, idx = _route(V2_SCORES, topk_method='group_limited_greedy', n_group=4, topk_group=2,
                          num_experts_per_tok=3, routed_scaling_factor=16.0)
    assert _as_sets(weights, idx) == [{0: 0.30 * 16, 5: 0.20 * 16, 4: 0.02 * 16}]


def test_greedy_no_renormalisation_times_scaling():
    weights, idx = _route(V2_SCORES, num_experts_per_tok=3, routed_scaling_factor=2.0)
    assert _as_sets(weights, idx) == [{0: 0.30 * 2, 5: 0.20 * 2, 3: 0.13 * 2}]


def test_bias_update_sign_and_magnitude():
    load = jnp.array([[4.0, 2.0, 3.0, 3.0], [1.0, 1.0, 1.0, 5.0]])  # layer means 3 and 2
    bias = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    new = moe.bias_update(bias, load, 0.01)
    np.testing.assert_allclose(new - bias, [[-0.01, 0.01, 0.0, 0.0], [0.01, 0.01, 0.01, -0.01]], atol=1e-7)


def test_max_violation_against_numpy():
    load = np.random.default_rng(1).integers(0, 50, size=(3, 16)).astype(np.float32)
    want = (load.max(-1) - load.mean(-1)) / load.mean(-1)
    np.testing.assert_allclose(moe.max_violation(jnp.asarray(load)), want, rtol=1e-6)
    assert float(moe.max_violation(jnp.full((8,), 5.0))) == 0.0


# ---------------------------------------------------------------- balance losses vs numpy

B, L, E, K, G, M = 3, 10, 8, 2, 4, 2


@pytest.fixture(scope='module')
def routed():
    """Softmax scores, their top-k, and a padding mask with a different real length per sequence."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(B, L, E)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-scores, axis=-1)[..., :K]
    mask = (np.arange(L)[None] < np.array([L, 7, 3])[:, None]).astype(np.float32)
    return scores, idx, mask


def _np_f_p(scores, idx, mask, b):
    """Expert-level f_i = E/(K T) * #tokens routed to i and P_i = mean s_i over the T real tokens."""
    real = mask[b] > 0
    t = real.sum()
    f = np.zeros(E)
    for token in np.flatnonzero(real):
        for i in idx[b, token]:
            f[i] += E / (K * t)
    return f, scores[b][real].mean(0)


def test_expert_balance_loss(routed):
    scores, idx, mask = routed
    want = np.mean([np.sum(np.multiply(*_np_f_p(scores, idx, mask, b))) for b in range(B)])
    got = moe.expert_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), K)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_device_balance_loss(routed):
    scores, idx, mask = routed
    per_seq = []
    for b in range(B):
        f, p = _np_f_p(scores, idx, mask, b)
        devices = np.arange(E).reshape(G, E // G)
        per_seq.append(sum(f[d].mean() * p[d].sum() for d in devices))
    got = moe.device_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), K, G)
    np.testing.assert_allclose(got, np.mean(per_seq), rtol=1e-5)


def test_comm_balance_loss(routed):
    scores, idx, mask = routed
    per_seq = []
    for b in range(B):
        real = np.flatnonzero(mask[b])
        t = len(real)
        sent = np.zeros(G)
        for token in real:
            for d in set(idx[b, token] // (E // G)):
                sent[d] += 1
        f2 = G / (M * t) * sent
        p2 = scores[b][real].mean(0).reshape(G, E // G).sum(-1)
        per_seq.append(np.sum(f2 * p2))
    got = moe.comm_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), G, M)
    np.testing.assert_allclose(got, np.mean(per_seq), rtol=1e-5)


def test_sequence_balance_loss_uses_normalised_sigmoid_scores(routed):
    _, _, mask = routed
    s = np.random.default_rng(3).uniform(0.05, 0.95, size=(B, L, E)).astype(np.float32)
    top = np.argsort(-s, axis=-1)[..., :K]
    per_seq = []
    for b in range(B):
        real = mask[b] > 0
        f, _ = _np_f_p(s, top, mask, b)
        p = (s[b] / s[b].sum(-1, keepdims=True))[real].mean(0)
        per_seq.append(np.sum(f * p))
    got = moe.sequence_balance_loss(jnp.asarray(s), jnp.asarray(mask), K)
    np.testing.assert_allclose(got, np.mean(per_seq), rtol=1e-5)


# ---------------------------------------------------------------- dispatch strategies

def _dispatch_inputs(seed, tokens=32, d=16, e=8, f=8, k=2):
    """Random activations and expert weights; gates are top-k of softmax scores (all distinct)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    weights, idx = jax.lax.top_k(jax.nn.softmax(2 * jax.random.normal(keys[1], (tokens, e))), k)
    gate, up = (jax.random.normal(key, (e, d, f)) / d ** 0.5 for key in keys[2:4])
    down = jax.random.normal(keys[4], (e, f, d)) / f ** 0.5
    return x, weights, idx, gate, up, down


def _sum_sq(dispatch, capacity):
    """A scalar loss through `dispatch`, differentiable in x, gates and every expert weight."""
    def loss(x, weights, gate, up, down, idx):
        return jnp.sum(dispatch(x, weights, idx, gate, up, down, capacity)[0] ** 2)
    return loss


@pytest.mark.parametrize('strategy', STRATEGIES)
@pytest.mark.parametrize('e,k', [(8, 2), (16, 4)])
def test_dispatch_equals_dense_when_nothing_is_dropped(strategy, e, k):
    run = jax.jit(moe.DISPATCH[strategy], static_argnums=6)
    for seed in range(3):
        x, weights, idx, gate, up, down = _dispatch_inputs(seed, e=e, k=k)
        want, _ = moe.dispatch_dense(x, weights, idx, gate, up, down, None)
        got, dropped = run(x, weights, idx, gate, up, down, x.shape[0])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert float(dropped) == 0.0


@pytest.mark.parametrize('strategy', ['grouped', 'grouped_block8', 'ragged', 'gather'])
def test_dropless_equals_dense_values_and_grads_under_skewed_routing(strategy):
    """Dropless whatever the load: every token on expert 0 except a few, several experts empty (grouped
    blocks padded per expert; ragged_dot's groups of size 0)."""
    x, weights, _, gate, up, down = _dispatch_inputs(3, tokens=40, e=8, k=2)
    idx = jnp.zeros((40, 2), jnp.int32).at[:, 1].set(jnp.arange(40) % 3 + 1)
    dispatch = moe.DISPATCH.get(strategy, lambda *a: moe.dispatch_grouped(*a, block=8))  # grouped_block8
    got = jax.jit(jax.value_and_grad(_sum_sq(dispatch, None), argnums=(0, 1, 2, 3, 4)))(x, weights, gate, up, down, idx)
    want = jax.value_and_grad(_sum_sq(moe.dispatch_dense, None), argnums=(0, 1, 2, 3, 4))(
        x, weights, gate, up, down, idx)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('assignments,experts', [(16, 8), (8192, 32), (8192, 128), (1024, 128), (10 ** 6, 4)])
def test_grouped_block_size_bounds_the_padding(assignments, experts):
    block = moe.grouped_block_size(assignments, experts)
    assert 8 <= block <= 256 and block & (block - 1) == 0
    assert block == 8 or experts * (block - 1) <= assignments // 4


def test_auto_dispatch_picks_capacity_for_drops_and_grouped_or_ragged_for_dropless():
    assert moe.resolve_dispatch('auto', 1.25, 'cpu') == 'capacity'
    assert moe.resolve_dispatch('auto', 0.0, 'cpu') == 'grouped'
    assert moe.resolve_dispatch('auto', 0.0, 'gpu') == 'ragged'
    assert moe.resolve_dispatch('auto', 0.0, 'tpu') == 'ragged'
    assert moe.resolve_dispatch('dense', 1.25, 'cpu') == 'dense'


def test_inference_dispatch_gathers_few_assignments_and_never_uses_capacity_buffers():
    # Decoding 4 rows of a top-2 model with 8 experts: 8 assignments, the selected experts' weights only.
    assert moe.inference_dispatch('capacity', 8, 8, 'cpu') == 'gather'
    assert moe.inference_dispatch('grouped', 8, 8, 'cpu') == 'gather'
    # More assignments than experts: capacity's buffers would hold every token for every expert.
    assert moe.inference_dispatch('capacity', 64, 8, 'cpu') == 'grouped'
    assert moe.inference_dispatch('expert_parallel', 64, 8, 'gpu') == 'ragged'
    assert moe.inference_dispatch('grouped', 64, 8, 'gpu') == 'grouped'
    assert moe.inference_dispatch('dense', 8, 8, 'cpu') == 'dense'
    with jax.set_mesh(_mesh(4)):
        assert moe.inference_dispatch('expert_parallel', 8, 8, 'cpu') == 'expert_parallel'


def test_moe_layer_decoding_a_few_tokens_equals_the_training_forward():
    """At 3 x 1 tokens (6 assignments <= 8 experts) evaluation takes the gather path; training (capacity
    with room for everything) and the dense reference give the same output and load."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 32))
    mask = jnp.ones((3, 1))
    train = moe.MoE(_tiny_moe_config('capacity', capacity_factor=8.0))
    variables = _random_variables(train, x, mask)
    want, want_aux = jax.jit(lambda x: train.apply(variables, x, mask, deterministic=False))(x)
    assert abs(float(want_aux['dropped'])) < 1e-6
    for dispatch in ('capacity', 'dense'):
        got, aux = jax.jit(moe.MoE(_tiny_moe_config(dispatch)).apply)(variables, x, mask)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(aux['load'], want_aux['load'])


def _np_capacity_reference(x, weights, idx, gate, up, down, capacity):
    """Dense output with each expert's overflow (beyond `capacity`, lowest gates) zeroed."""
    weights = np.asarray(weights).copy()
    idx = np.asarray(idx)
    dropped = 0
    for expert in range(gate.shape[0]):
        tokens, slots = np.nonzero(idx == expert)
        ranked = np.argsort(-weights[tokens, slots], kind='stable')
        for r in ranked[capacity:]:
            weights[tokens[r], slots[r]] = 0.0
            dropped += 1
    y, _ = moe.dispatch_dense(x, jnp.asarray(weights), jnp.asarray(idx), gate, up, down, None)
    return np.asarray(y), dropped / idx.size


def test_capacity_drops_lowest_gates_and_reports_fraction():
    x, weights, idx, gate, up, down = _dispatch_inputs(4)
    capacity = 5  # the balanced share is 32 * 2 / 8 = 8: this forces drops
    want, want_dropped = _np_capacity_reference(x, weights, idx, gate, up, down, capacity)
    assert want_dropped > 0.1
    got, dropped = jax.jit(moe.dispatch_capacity, static_argnums=6)(x, weights, idx, gate, up, down, capacity)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(dropped, want_dropped, rtol=1e-6)


def test_capacity_keeps_the_higher_gate_of_two_tokens_on_one_expert():
    x, _, _, gate, up, down = _dispatch_inputs(5, tokens=2, k=1)
    idx = jnp.array([[3], [3]])
    weights = jnp.array([[0.2], [0.7]])
    got, dropped = jax.jit(moe.dispatch_capacity, static_argnums=6)(x, weights, idx, gate, up, down, 1)
    want, _ = moe.dispatch_dense(x, weights, idx, gate, up, down, None)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)
    np.testing.assert_array_equal(got[0], 0.0)
    assert float(dropped) == 0.5


# ---------------------------------------------------------------- expert parallel on 8 devices

def _mesh(expert: int):
    mesh_cfg = config_lib.base_config().mesh
    mesh_cfg.expert = expert  # data fills the other 8 / expert devices
    return sharding.make_mesh(mesh_cfg)


def _under_mesh(fn, mesh):
    """`fn` jitted and traced inside the mesh and logical rules, as the train step runs the model."""
    def wrapped(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            return jax.jit(fn)(*args)
    return wrapped


@pytest.mark.parametrize('expert', [2, 4, 8])
def test_expert_parallel_equals_dense_values_and_grads(expert):
    x, weights, idx, gate, up, down = _dispatch_inputs(expert, e=16, k=4)
    tokens = x.shape[0]
    ep_loss = _sum_sq(moe.dispatch_expert_parallel, tokens)
    dense_loss = _sum_sq(moe.dispatch_dense, None)
    got = _under_mesh(jax.value_and_grad(ep_loss, argnums=(0, 1, 2, 3, 4)), _mesh(expert))(
        x, weights, gate, up, down, idx)
    want = jax.value_and_grad(dense_loss, argnums=(0, 1, 2, 3, 4))(x, weights, gate, up, down, idx)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _np_expert_parallel_reference(x, weights, idx, gate, up, down, capacity, shards, n):
    """Dense output with expert_parallel's two drops: tokens split into `shards` contiguous shards, each
    sending at most S assignments to each of the n destinations (lowest gates dropped), then each expert
    keeping its C highest-gate arrivals."""
    weights, idx = np.asarray(weights).copy(), np.asarray(idx)
    tokens, k = idx.shape
    e = gate.shape[0]
    t, e_local = tokens // shards, e // n
    rows, slots = moe.expert_parallel_buffers(capacity, tokens, t, n, e_local, k)
    kept = np.ones_like(weights, bool)
    for shard in range(shards):
        mine = np.arange(shard * t, (shard + 1) * t)
        for dest in range(n):
            tok, slot = np.nonzero(idx[mine] // e_local == dest)
            ranked = np.argsort(-weights[mine][tok, slot], kind='stable')
            kept[mine[tok[ranked[rows:]]], slot[ranked[rows:]]] = False
    # An expert receives from its N-shard group: n consecutive shards (the batch axes put `expert` last).
    for start in range(0, tokens, t * n):
        span = np.arange(start, start + t * n)
        for expert in range(e):
            tok, slot = np.nonzero((idx[span] == expert) & kept[span])
            ranked = np.argsort(-weights[span][tok, slot], kind='stable')
            kept[span[tok[ranked[slots:]]], slot[ranked[slots:]]] = False
    y, _ = moe.dispatch_dense(x, jnp.asarray(np.where(kept, weights, 0.0)), jnp.asarray(idx), gate, up, down, None)
    return np.asarray(y), 1.0 - kept.mean()


@pytest.mark.parametrize('expert', [2, 8])
def test_expert_parallel_drops_like_its_reference(expert):
    """Bounded buffers (capacity 5 of the balanced 8 per expert) drop in transit and at the expert."""
    x, weights, idx, gate, up, down = _dispatch_inputs(6)
    capacity = 5
    want, want_dropped = _np_expert_parallel_reference(x, weights, idx, gate, up, down, capacity, 8, expert)
    assert want_dropped > 0.1
    got, dropped = _under_mesh(lambda *a: moe.dispatch_expert_parallel(*a, capacity), _mesh(expert))(
        x, weights, idx, gate, up, down)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(dropped, want_dropped, rtol=1e-6)


def test_expert_parallel_buffers_follow_the_capacity_not_the_worst_case():
    """V3's router (256 experts, top-8, 8 groups / 4 kept) at width 16 on 8 expert shards: each shard sends
    each destination f x t x K / N rows (not t x min(K, E/N)), and where nothing is dropped the output is
    dispatch_capacity's."""
    cfg = dataclasses.replace(ROUTING, n_routed_experts=256, capacity_factor=2.0, **dict(V3, num_experts_per_tok=8,
                                                                                         n_group=8, topk_group=4))
    tokens, d, f, n = 512, 16, 8, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (tokens, d))
    # Scores independent of x, as a balanced router gives (bias balancing's aim).
    weights, idx = moe.select_experts(jax.nn.sigmoid(jax.random.normal(keys[1], (tokens, 256))), jnp.zeros(256), cfg)
    gate, up = (jax.random.normal(key, (256, d, f)) / d ** 0.5 for key in keys[2:4])
    down = jax.random.normal(keys[4], (256, f, d)) / f ** 0.5
    capacity = moe.capacity_per_expert(tokens, cfg)
    t = tokens // 8
    rows, slots = moe.expert_parallel_buffers(capacity, tokens, t, n, 256 // n, 8)
    assert (capacity, rows, slots) == (32, 2 * t * 8 // n, 2 * n * t * 8 // 256)
    assert moe.expert_parallel_buffers(tokens, tokens, t, n, 256 // n, 8)[0] == t * 8  # dropless: the worst case

    mesh = _mesh(n)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        run = jax.jit(lambda *a: moe.dispatch_expert_parallel(*a, capacity))
        got, dropped = run(x, weights, idx, gate, up, down)
        hlo = run.lower(x, weights, idx, gate, up, down).compile().as_text()
    want, want_dropped = moe.dispatch_capacity(x, weights, idx, gate, up, down, capacity)
    assert float(dropped) == 0.0 and float(want_dropped) == 0.0
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Per device: x, expert ids and gates go out, outputs come back, N x S rows each.
    sent = n * rows * (d * 4 + 4 + 4 + d * 4)
    assert aot.collectives(aot.hlo_totals(hlo))['all-to-all'][1] == sent


def _tiny_moe_config(dispatch, **fields):
    c = config_lib.base_config().model
    c.update(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             moe_intermediate_size=16, scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
             norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=0.01, seq_aux=True,
             initializer_range=0.1, moe_dispatch=dispatch)
    c.update(**fields)
    return config_lib.freeze_model(c)


def _random_variables(model, *args):
    """Variables of `model` filled from numpy (no compiled init), routing bias included."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.1, v.dtype), shapes)


def _moe_value_and_grad(dispatch):
    """(loss, (y, load)), grads of a scalar loss through the MoE layer, balance loss included."""
    model = moe.MoE(_tiny_moe_config(dispatch))

    def loss(params, variables, x_BxLxD):
        y, aux = model.apply({**variables, 'params': params}, x_BxLxD, jnp.ones(x_BxLxD.shape[:2]))
        return jnp.sum(y ** 2) + aux['balance_loss'], (y, aux['load'])
    return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope='module')
def moe_dense_reference():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 32))
    variables = _random_variables(moe.MoE(_tiny_moe_config('dense')), x, jnp.ones((8, 4)))
    return variables, x, jax.jit(_moe_value_and_grad('dense'))(variables['params'], variables, x)


@pytest.mark.parametrize('expert', [2, 4, 8])
def test_moe_module_expert_parallel_equals_dense(moe_dense_reference, expert):
    variables, x, want = moe_dense_reference
    got = _under_mesh(_moe_value_and_grad('expert_parallel'), _mesh(expert))(variables['params'], variables, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_transformer_expert_parallel_equals_dense():
    tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 6), 1, 61)
    dense = Transformer(_tiny_moe_config('dense'))
    variables = _random_variables(dense, tokens)
    want, want_aux = jax.jit(dense.apply)(variables, tokens)
    ep = Transformer(_tiny_moe_config('expert_parallel'))
    got, aux = _under_mesh(ep.apply, _mesh(4))(variables, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(aux['load']['moe_layers'], want_aux['load']['moe_layers'])


@pytest.mark.parametrize('dispatch', ['capacity', 'expert_parallel'])
def test_padding_never_takes_a_real_tokens_capacity(dispatch):
    """Training-time dropping: what sits in padded positions must not change any real token's output."""
    model = moe.MoE(_tiny_moe_config(dispatch, capacity_factor=1.0))
    x = jax.random.normal(jax.random.PRNGKey(3), (8, 4, 32))
    mask = jnp.ones((8, 4)).at[4:].set(0.0)
    variables = _random_variables(model, x, mask)
    apply = _under_mesh(lambda x: model.apply(variables, x, mask, deterministic=False), _mesh(8))
    y, aux = apply(x)
    assert float(aux['dropped']) > 0  # 32 * 2 / 8 = 8 slots per expert for 64 assignments
    for seed in range(3):
        noise = 3 * jax.random.normal(jax.random.PRNGKey(seed), x.shape)
        y2, _ = apply(jnp.where(mask[..., None] > 0, x, noise))
        np.testing.assert_allclose(y2[mask > 0], y[mask > 0], atol=1e-6)


def test_device_limited_routing_reaches_at_most_m_devices():
    """V2's device-limited routing with groups = the expert axis's devices (n_group = mesh.expert = 4, M =
    topk_group = 2): each token's top-3 experts, mapped to the devices that hold them by the sharding the
    weights get, span at most 2 devices (unlimited top-3 routing spans 3 for some tokens); a group count
    that straddles devices is refused."""
    mesh = _mesh(4)
    fields = dict(n_routed_experts=16, num_experts_per_tok=3, scoring_func='softmax', n_group=4, topk_group=2,
                  norm_topk_prob=False, routed_scaling_factor=1.0)
    model = moe.MoE(_tiny_moe_config('expert_parallel', topk_method='group_limited_greedy', **fields))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 32))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.ones((8, 16)))
        gate_sharding = sharding.logical_sharding(boxed, mesh)['params']['gate']
    holder = {}  # expert -> the device set holding it
    for device, index in gate_sharding.devices_indices_map((16, 32, 16)).items():
        for e in range(16)[index[0]]:
            holder.setdefault(e, set()).add(device.id)
    device_of = {e: min(ids) for e, ids in holder.items()}
    assert len(set(device_of.values())) == 4
    scores = moe.scores_from_logits(x.reshape(-1, 32) @ jax.random.normal(jax.random.PRNGKey(1), (32, 16)), 'softmax')
    spans = {}
    for method in ('group_limited_greedy', 'greedy'):
        cfg = _tiny_moe_config('expert_parallel', topk_method=method, **fields)
        _, idx = moe.select_experts(scores, jnp.zeros(16), cfg)
        spans[method] = [len({device_of[int(e)] for e in row}) for row in np.asarray(idx)]
    assert max(spans['group_limited_greedy']) == 2 and max(spans['greedy']) == 3
    c = config_lib.base_config()
    c.model.update(num_hidden_layers=2, **TINY_MLA_MOE)
    c.model.update(n_routed_experts=24, n_group=3, topk_group=2, topk_method='group_limited_greedy')
    c.mesh.update(data=1, expert=8)
    with pytest.raises(config_lib.ConfigError, match='model.n_group=3'):
        config_lib.validate(c, 8)


@pytest.mark.parametrize('dispatch', ['capacity', 'expert_parallel'])
def test_never_dropped_rows_keep_every_assignment(dispatch):
    """V2's never-dropped sequences: with never_drop_fraction 0.25, rows 0, 4, ... of 32 take capacity first,
    so at a capacity factor of 1.0 (~20% of assignments dropped; for expert_parallel on 8 shards of 4 rows
    each: per-device capacity 4 rows per destination, then 16 slots per expert) their outputs equal the
    dropless layer's while nearly every other row loses assignments; without the field the same rows lose
    some too."""
    x = jax.random.normal(jax.random.PRNGKey(5), (32, 4, 32))
    mask = jnp.ones((32, 4))
    variables = _random_variables(moe.MoE(_tiny_moe_config('dense')), x, mask)
    want, _ = moe.MoE(_tiny_moe_config('dense')).apply(variables, x, mask)
    protected = np.arange(32) % 4 == 0
    errors = {}
    for fraction in (0.25, 0.0):
        model = moe.MoE(_tiny_moe_config(dispatch, capacity_factor=1.0, never_drop_fraction=fraction))
        y, aux = _under_mesh(lambda x: model.apply(variables, x, mask, deterministic=False), _mesh(8))(x)
        assert float(aux['dropped']) > 0.15
        errors[fraction] = np.abs(np.asarray(y) - np.asarray(want)).max(axis=(1, 2))  # per row
    assert errors[0.25][protected].max() < 1e-5 and (errors[0.25][~protected] > 1e-3).mean() > 0.8
    assert (errors[0.0][protected] > 1e-3).mean() > 0.5


# ---------------------------------------------------------------- the grouped GEMM kernels on a TPU topology

def test_ragged_dispatch_compiles_to_grouped_kernels_for_a_tpu():
    """Compiled for a TPU (libtpu, no TPU needed), dispatch_ragged's forward and backward are tokamax's
    megablox kernels (2 forward, 4 backward) with no dot left in the optimized HLO, and the compiler counts
    the routed rows' FLOPs only: 3 GEMMs x (forward + 2 backward) x 2 T K D F, not E / K times that."""
    import os
    import re
    from jax.experimental import topologies
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # other test processes may hold libtpu
    device = topologies.get_topology_desc(topology_name='v5e:1x1', platform='tpu', chips_per_host_bounds=(1, 1, 1),
                                          num_slices=1, wrap=(False, False, False)).devices[0]
    t, k, e, d, f = 384, 2, 16, 256, 128  # the megablox kernel takes widths >= 128
    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
        shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))

    def loss(x, weights, gate, up, down, idx):
        return jnp.sum(moe.dispatch_ragged(x, weights, idx, gate, up, down, None)[0].astype(jnp.float32) ** 2)

    with jax.default_device(device), jax.set_mesh(jax.sharding.Mesh([device], ('data',))):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
            spec(t, d), spec(t, k), spec(e, d, f), spec(e, d, f), spec(e, f, d), spec(t, k, dtype=jnp.int32)).compile()
    hlo = compiled.as_text()
    assert len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)) == 6
    assert len(re.findall(r'%t?gmm_megablox', hlo)) >= 6
    assert not re.search(r' (dot|convolution)\(', hlo)
    routed = 3 * 3 * 2 * t * k * d * f
    assert routed <= compiled.cost_analysis()['flops'] <= 1.05 * routed


def _gemms(jaxpr) -> int:
    """Matmul equations in a jaxpr and the jaxprs nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in ('dot_general', 'ragged_dot_general')
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                    n += _gemms(getattr(sub, 'jaxpr', sub))
    return n


@pytest.mark.parametrize('strategy', ['ragged', 'capacity', 'grouped'])
def test_remat_save_dots_recomputes_no_routed_expert_gemm(strategy):
    """Under remat 'save_dots' a layer's backward runs as many matmuls as without remat: the routed experts'
    GEMM outputs are kept (their einsums have an expert batch axis, tokamax's are custom calls), where
    'full' runs the forward's again."""
    from dsjax.model.transformer import _REMAT_POLICIES
    x, weights, idx, gate, up, down = _dispatch_inputs(0)
    probe = jax.random.normal(jax.random.PRNGKey(1), x.shape)

    def loss(x, weights, gate, up, down, idx):  # linear in the output: its backward needs no forward value
        return jnp.sum(moe.DISPATCH[strategy](x, weights, idx, gate, up, down, x.shape[0])[0] * probe)
    count = lambda fn: _gemms(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2, 3, 4)))(
        x, weights, gate, up, down, idx).jaxpr)
    plain = count(loss)
    assert count(jax.checkpoint(loss, policy=_REMAT_POLICIES['save_dots'])) == plain
    assert count(jax.checkpoint(loss, policy=_REMAT_POLICIES['full'])) > plain
