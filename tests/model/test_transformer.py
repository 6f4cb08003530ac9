"""Invariants of the decoder: causality, GQA == MHA with repeated kv heads, packing, MTP wiring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.model.transformer import Transformer

# MLA + MoE + MTP covers the V3 path end to end (each MLA-MoE compile costs ~10 s on 2 cores).
CASES = {'dense': {}, 'gqa': {'num_key_value_heads': 2},
         'mla_moe_mtp': {'mla_moe': True, 'num_nextn_predict_layers': 1}}


class _Jitted:
    """A Transformer whose apply is jitted (eager scanned Flax modules are slow)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.module = Transformer(cfg)
        self.apply = jax.jit(self.module.apply)

    def init(self, *args):
        return self.module.init(*args)


def _init(cfg, length=12, seed=0):
    model = _Jitted(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (2, length), 1, cfg.vocab_size)
    variables = model.init(jax.random.PRNGKey(seed), tokens)
    if 'moe_bias' in variables:  # a non-zero routing bias exercises selection
        variables['moe_bias'] = jax.tree.map(
            lambda b: jax.random.normal(jax.random.PRNGKey(7), b.shape) * 0.1, variables['moe_bias'])
    return model, variables, tokens


@pytest.mark.parametrize('case', CASES)
def test_causal(tiny_model, case):
    model, variables, tokens = _init(tiny_model(**CASES[case]))
    logits, _ = model.apply(variables, tokens)
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % model.cfg.vocab_size)
    logits2, _ = model.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits2[:, :t]))
    assert not np.allclose(logits[:, t:], logits2[:, t:])


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_model):
    gqa_model, gqa_vars, tokens = _init(tiny_model(num_key_value_heads=2))
    mha_model = _Jitted(tiny_model(num_key_value_heads=4))
    mha_vars = jax.tree.map(lambda x: x, gqa_vars)
    attn = dict(mha_vars['params']['dense_layers']['layers']['attn'])
    for name in ('k', 'v'):  # [layers, D, G, K] -> each kv head serves 2 query heads
        attn[name] = jax.tree.map(lambda w: jnp.repeat(w, 2, axis=2), attn[name])
    mha_vars['params']['dense_layers']['layers']['attn'] = attn
    np.testing.assert_allclose(gqa_model.apply(gqa_vars, tokens)[0], mha_model.apply(mha_vars, tokens)[0],
                               atol=1e-5)


def test_gqa_with_all_kv_heads_is_plain_mha(tiny_model):
    """Grouped attention with G == N equals a numpy multi-head attention of the same weights."""
    from dsjax.model import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 5, 4, 8)).astype(np.float32) for _ in range(3))
    mask = attention.attention_mask(jnp.ones((1, 5), jnp.int32))
    got = attention.dot_product_attention(jnp.asarray(q)[:, :, :, None], jnp.asarray(k), jnp.asarray(v), mask, 0.3)
    logits = np.einsum('lnk,snk->nls', q[0], k[0]) * 0.3
    logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], np.einsum('nls,snk->lnk', probs, v[0]), atol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_fused_attention_equals_xla_einsums(causal):
    """The jax.nn.dot_product_attention path (the one cudnn takes on GPU; 'xla' here) on a packed mask
    and grouped heads equals our einsum attention, told the mask is causal or not."""
    from dsjax.model import attention

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 6, 3, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32) for _ in range(2))
    mask = attention.attention_mask(jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]]))
    want = attention.dot_product_attention(q, k, v, mask, 0.35)
    got = attention.fused_attention(q, k, v, mask, 0.35, implementation='xla', causal=causal)
    assert got.shape == want.shape == (2, 6, 3, 2, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fused_attention_hands_mla_values_to_cudnn_unpadded(monkeypatch):
    """MLA's values (narrower than the keys) reach cuDNN's binding as they are, with the packed mask and
    the causal mask type; with a stand-in kernel (einsums; cuDNN needs a GPU) the output is our einsum
    attention's."""
    from dsjax.model import attention

    calls = []

    def kernel(q, k, v, mask, scale, mask_type):
        calls.append((v.shape, mask_type))
        logits = jnp.einsum('BLNK,BSNK->BNLS', q, k) * scale
        return jnp.einsum('BNLS,BSNU->BLNU', jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), v)

    monkeypatch.setattr(attention.cudnn_attention, 'dot_product_attention', kernel)
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 6, 3, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 6, 3, 5)), jnp.float32)
    segments = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    got = attention.self_attention(q, k, v, segments, 0.35, impl='cudnn')
    want = attention.dot_product_attention(q, k, v, attention.attention_mask(segments), 0.35)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert calls == [((2, 6, 3, 5), attention.cudnn_attention.MaskType.CAUSAL)]
    with pytest.raises(ValueError, match='equal key and value widths'):
        attention.fused_attention(q, k, v, attention.attention_mask(segments), 0.35, implementation='xla')


def test_attention_impl_auto_picks_cudnn_and_splash_only_where_they_apply():
    from dsjax.model import attention

    def cfg(**fields):
        m = config_lib.base_config().model
        m.update(**fields)
        return config_lib.freeze_model(m)

    assert attention.resolve_impl(cfg(dtype='bfloat16'), 128, 128) == 'blocked'  # this backend is the CPU
    assert attention.resolve_impl(cfg(dtype='bfloat16'), 128, 128, backend='gpu') == 'cudnn'
    assert attention.resolve_impl(cfg(dtype='float32'), 128, 128, backend='gpu') == 'xla'
    assert attention.resolve_impl(cfg(dtype='bfloat16'), 192, 128, backend='gpu') == 'xla'  # MLA, no Hopper here
    assert attention.resolve_impl(cfg(dtype='bfloat16', attention_impl='xla'), 64, 64, backend='gpu') == 'xla'
    assert attention.resolve_impl(cfg(dtype='bfloat16'), 192, 128, backend='tpu') == 'xla'  # length unknown
    assert attention.resolve_impl(cfg(dtype='bfloat16'), 192, 128, backend='tpu', length=4096) == 'splash'
    assert attention.resolve_impl(cfg(dtype='bfloat16'), 192, 128, backend='tpu', length=100) == 'xla'
    assert attention.cudnn_takes(192, 128, compute_capability='9.0')  # MLA from Hopper on
    assert not attention.cudnn_takes(192, 128, compute_capability='8.0')
    assert attention.cudnn_takes(128, 128, compute_capability='8.0')
    assert not attention.cudnn_takes(320, 128, compute_capability='10.0')


def test_remat_auto_saves_attention_on_cpu_only():
    from dsjax.model import transformer

    m = config_lib.base_config().model
    assert transformer.resolve_remat(config_lib.freeze_model(m)) == 'save_attention'  # this backend is the CPU
    assert transformer.resolve_remat(config_lib.freeze_model(m), backend='gpu') == 'none'
    m.remat_policy = 'save_dots'
    assert transformer.resolve_remat(config_lib.freeze_model(m), backend='cpu') == 'save_dots'


def test_save_attention_skips_recomputing_attention(tiny_model):
    """remat 'save_attention' keeps the blocked attention's output and logsumexp: the backward has one
    exp per attention block fewer than under 'full' (no forward attention recomputed), same gradients."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, 97)

    def grad_fn(policy):
        cfg = tiny_model(remat_policy=policy, attention_impl='blocked')
        model = Transformer(cfg)
        variables = model.init(jax.random.PRNGKey(0), tokens)
        loss = lambda v: model.apply(v, tokens)[0].sum()
        return jax.grad(loss), variables

    def exps(fn, variables):
        return str(jax.make_jaxpr(fn)(variables)).count(' exp ')

    (full, variables), (saving, _) = grad_fn('full'), grad_fn('save_attention')
    # One block at L = 12, three layers scanned as one body: one forward exp fewer.
    assert exps(saving, variables) == exps(full, variables) - 1
    for a, b in zip(jax.tree.leaves(jax.jit(full)(variables)), jax.tree.leaves(jax.jit(saving)(variables))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('contract', [1, 2])
def test_dense_equals_einsum_and_its_gradients(contract):
    """layers.dense (flattened rows) is the einsum it replaces, gradients included ('BLNK,NKD->BLD' for 2)."""
    from dsjax.model.layers import dense

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, 5, 4, 6)[:2 + contract])
    w = jax.random.normal(kw, ((4, 6)[:contract] if contract == 2 else (4,)) + (7, 2))
    spec = 'BLD,DFG->BLFG' if contract == 1 else 'BLNK,NKFG->BLFG'
    ct = jax.random.normal(kx, (3, 5, 7, 2))
    ours = jax.vjp(lambda a, b: dense(a, b, contract), x, w)
    ref = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](ct), ref[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('length', [150, 256, 1000])  # blocks of 64 (the last 22); 4 x 64; 8 x 125
def test_blocked_attention_equals_full(length):
    """Causal query blocks give the full attention's output and gradients on a packed (three-document)
    row and a padded one, grouped heads included."""
    from dsjax.model import attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, length, 2, 2, 8)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(2, length, 2, 8)).astype(np.float32)) for _ in range(2))
    segments = np.ones((2, length), np.int32)
    segments[0, length // 3:] = 2
    segments[0, length // 2:] = 3
    segments[1, length - 7:] = 0  # padding

    def run(impl):
        def loss(q, k, v):
            out = attention.self_attention(q, k, v, jnp.asarray(segments), 0.3, impl)
            return (out * jnp.cos(out)).sum(), out
        return jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)

    (_, want), want_grads = run('xla')
    (_, got), got_grads = run('blocked')
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def test_splash_attention_equals_full_on_a_sharded_mesh():
    """The TPU splash kernel (run by the Pallas interpreter) under shard_map on a data x tensor mesh: rows
    over data and kv heads over tensor, or one row with its heads over both; the full attention's output
    on packed and padded rows, with MLA's narrower values."""
    import flax.linen as nn
    from dsjax import sharding
    from dsjax.model import attention

    length = 256  # two kernel blocks: the one above the diagonal is skipped
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 1, 64)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, length, 4, 64)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, length, 4, 32)).astype(np.float32))
    segments = np.ones((2, length), np.int32)
    segments[0, 100:] = 2
    segments[1, length - 7:] = 0  # padding
    segments = jnp.asarray(segments)
    want = attention.self_attention(q, k, v, segments, 0.3, 'xla')
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=1, tensor=2), jax.devices()[:4])
    splash = jax.jit(lambda *a: attention.splash_attention(*a, 0.3, interpret=True))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got = splash(q, k, v, segments)
        one_row = splash(q[1:], k[1:], v[1:], segments[1:])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(one_row), np.asarray(want[1:]), atol=1e-5)


@pytest.mark.parametrize('case', CASES)
def test_packed_equals_separate(tiny_model, case):
    """Two documents packed in one row (segment ids, positions restarting) == each run alone."""
    model, variables, tokens = _init(tiny_model(**CASES[case]), length=12)
    doc_a, doc_b = tokens[0, :5], tokens[0, 5:12]
    packed = jnp.concatenate([doc_a, doc_b])[None]
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    logits, _ = model.apply(variables, packed, positions, segments)
    alone_a, _ = model.apply(variables, doc_a[None])
    alone_b, _ = model.apply(variables, doc_b[None])
    np.testing.assert_allclose(logits[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], alone_b[0], atol=1e-5)


def test_mtp_shapes_and_inputs(tiny_model):
    cfg = tiny_model(mla_moe=True, num_nextn_predict_layers=2)
    model, variables, tokens = _init(cfg)
    targets = jnp.roll(tokens, -1, axis=1)
    logits, aux = model.apply(variables, tokens, None, None, targets)
    assert aux['mtp_logits'].shape == (2,) + logits.shape
    assert set(aux['load']) == {'moe_layers', 'mtp_0', 'mtp_1'}
    assert aux['load']['moe_layers'].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    # Depth 1 at position i sees token i+2 = targets[i+1]: changing targets[:, 8] changes depth-1
    # logits at positions <= 7 only, and the main logits not at all.
    changed = targets.at[:, 8].add(1)
    logits2, aux2 = model.apply(variables, tokens, None, None, changed)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
    d1, d1b = np.asarray(aux['mtp_logits'][1]), np.asarray(aux2['mtp_logits'][1])
    assert not np.allclose(d1[:, 7], d1b[:, 7])
    np.testing.assert_array_equal(d1[:, :7], d1b[:, :7])
