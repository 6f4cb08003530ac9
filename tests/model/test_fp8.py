"""FP8 GEMMs (dsjax/model/fp8.py) against a plain-numpy model of DeepSeek-V3's block recipe."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.model import fp8, moe

IMPLS = ('reference', 'tokamax')  # tokamax runs its XLA kernel on the CPU: checks that path's layouts


# ---------------------------------------------------------------- a numpy model of the recipe

def np_quantize(x, axes):
    """(E4M3 values as float64 [padded shape], scales [x.shape, tiled axes / 128]) of x: the max-abs of
    each tile over `axes` (128 entries each, zero-padded) maps to 448; an all-zero tile gets scale 1."""
    x = np.asarray(x, np.float64)
    pad = [(0, -n % 128 if a in axes else 0) for a, n in enumerate(x.shape)]
    xp = np.pad(x, pad)
    split = []
    for a, n in enumerate(xp.shape):
        split += [n // 128, 128] if a in axes else [n]
    tiles = xp.reshape(split)
    tile_axes = tuple(a + j + 1 for j, a in enumerate(sorted(axes)))  # each tile's 128 entries
    amax = np.abs(tiles).max(axis=tile_axes, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(448), np.float32(1))
    scaled = np.clip(tiles.astype(np.float32) / scale, -448, 448)
    q = scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q.reshape(xp.shape), np.squeeze(scale, tile_axes).astype(np.float64)


def expand(scale, axes, shape):
    """A per-tile scale array broadcast to every entry of `shape` (padded)."""
    for a in axes:
        scale = np.repeat(scale, 128, axis=a)
    return scale[tuple(slice(0, n) for n in shape)]


def np_block_dot(x, w):
    """V3's Fprop: sum over 128-wide K blocks of the E4M3 partial product (exact here) times the row's
    activation scale and the weight block's scale."""
    m, k = x.shape
    n = w.shape[1]
    xq, xs = np_quantize(x, (1,))
    wq, ws = np_quantize(w, (0, 1))
    y = np.zeros((m, n))
    for kb in range(xs.shape[1]):
        ks = slice(128 * kb, 128 * kb + 128)
        partial = xq[:, ks] @ wq[ks, :n]
        y += partial * xs[:, kb:kb + 1] * np.repeat(ws[kb], 128)[None, :n]
    return y


def np_wgrad(x, dy):
    """V3's Wgrad: over 128-row blocks, x and dy quantised per channel per 128 rows."""
    xq, xs = np_quantize(x, (0,))
    dyq, dys = np_quantize(dy, (0,))
    dw = np.zeros((x.shape[1], dy.shape[1]))
    for mb in range(xs.shape[0]):
        rows = slice(128 * mb, 128 * mb + 128)
        dw += (xq[rows].T @ dyq[rows]) * xs[mb][:, None] * dys[mb][None, :]
    return dw


def _forward_and_grads(fn, *args):
    """fn(x, w) and its (dx, dw) for the cotangent args[2], in one jit (eager op-by-op dispatch is slow)."""
    def run(x, w, dy):
        y, vjp = jax.vjp(fn, x, w)
        return (y, *vjp(dy))
    return jax.jit(run)(*(jnp.asarray(a) for a in args))


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- quantisation

def test_quantize_matches_numpy_with_edge_tiles_and_zero_tiles():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 300)).astype(np.float32) * np.float32(3.0)
    x[1, 128:256] = 0.0  # a zero tile
    x[3] = 0.0  # a zero row
    x[4, 256:] *= 1e-3  # the 44-wide edge tile, on its own scale
    q = fp8.quantize(jnp.asarray(x), (-1,))
    assert q.qvalue.dtype == jnp.float8_e4m3fn and q.qvalue.shape == (5, 384) and q.scale.shape == (5, 3)
    want_q, want_s = np_quantize(x, (1,))
    np.testing.assert_array_equal(np.asarray(q.qvalue, np.float64), want_q)
    np.testing.assert_allclose(np.asarray(q.scale), want_s, rtol=3e-7)  # XLA: amax * (1/448)
    # The largest entry of every non-zero tile maps to E4M3's largest finite value, 448.
    tile_max = np.abs(want_q).reshape(5, 3, 128).max(-1)
    np.testing.assert_array_equal(tile_max, np.where(want_s != 1, 448.0, 0.0))
    assert (np.asarray(q.scale)[[1, 3, 3, 3], [1, 0, 1, 2]] == 1).all()
    back = np.asarray(fp8.dequantize(q, x.shape))
    np.testing.assert_allclose(back, want_q[:, :300] * expand(want_s, (1,), x.shape), rtol=1e-6)
    assert (back[3] == 0).all() and (back[1, 128:256] == 0).all()
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 within a tile's normal range.
    big = np.abs(x) > np.abs(x).max(-1, keepdims=True) / 8
    assert (np.abs(back - x)[big] <= np.abs(x)[big] * 2 ** -4).all()


def test_weight_blocks_match_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(200, 300)).astype(np.float32)
    w[:128, 256:] *= 100.0  # one block far larger: only its own scale moves
    q = fp8.quantize(jnp.asarray(w), (0, 1))
    want_q, want_s = np_quantize(w, (0, 1))
    assert q.scale.shape == want_s.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(q.qvalue, np.float64), want_q)
    np.testing.assert_allclose(np.asarray(q.scale), want_s, rtol=3e-7)  # XLA: amax * (1/448)
    assert want_s[0, 2] > 50 * want_s[0, 1]


def test_bfloat16_inputs_quantise_as_their_float32_values():
    """qwix alone keeps a bfloat16 input's scales in bfloat16 (the issue measured 2e-2 drift): fp8 upcasts."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(64, 256)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(256, 128)) * 0.05, jnp.bfloat16)
    y16 = fp8.fp8_dot(x, w)
    assert y16.dtype == jnp.bfloat16
    y32 = fp8.fp8_dot(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=1e-2, atol=4e-3 * float(
        jnp.abs(y32).max()))
    assert fp8.quantize(x, (-1,)).scale.dtype == jnp.float32


# ---------------------------------------------------------------- the GEMMs

@pytest.mark.parametrize('impl', IMPLS)
def test_fp8_dot_and_both_gradients_match_the_numpy_block_recipe(impl):
    rng = np.random.default_rng(3)
    m, k, n = 200, 300, 260  # nothing a multiple of 128: edge tiles on every axis of every GEMM
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[:, :128] *= 20.0  # an outlier channel block: per-tile scales keep the rest precise
    w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(m, n)).astype(np.float32)
    y, dx, dw = _forward_and_grads(lambda a, b: fp8.fp8_dot(a, b, impl), x, w, dy)
    want_y = np_block_dot(x, w)
    want_dx = np_block_dot(dy, w.T)  # Dgrad: dy per row per 128 of N, w^T in w's 128 x 128 blocks
    want_dw = np_wgrad(x, dy)
    assert _rel(y, want_y) < 2e-6 and _rel(dx, want_dx) < 2e-6 and _rel(dw, want_dw) < 2e-6
    # And FP8 is really on: each differs from the exact product by E4M3's rounding (percent level).
    for got, exact in ((y, x @ w), (dx, dy @ w.T), (dw, x.T @ dy)):
        assert 3e-3 < _rel(got, exact.astype(np.float64)) < 0.1


@pytest.mark.parametrize('impl', IMPLS)
def test_grouped_and_ragged_twins_match_numpy_per_group(impl):
    rng = np.random.default_rng(4)
    g, m, k, n = 3, 40, 150, 130
    x = rng.normal(size=(g, m, k)).astype(np.float32)
    w = (rng.normal(size=(g, k, n)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(g, m, n)).astype(np.float32)
    y, dx, dw = _forward_and_grads(lambda a, b: fp8.fp8_dot(a, b, impl), x, w, dy)
    for e in range(g):  # each group is its own block-recipe GEMM, Wgrad tiles within the group
        assert _rel(y[e], np_block_dot(x[e], w[e])) < 2e-6
        assert _rel(dx[e], np_block_dot(dy[e], w[e].T)) < 2e-6
        assert _rel(dw[e], np_wgrad(x[e], dy[e])) < 2e-6

    # Ragged: rows sorted by group (one group empty). Fprop and Dgrad tile per row, so they equal the
    # per-group products; Wgrad's 128-row tiles run over the sorted rows across group boundaries.
    sizes = np.array([70, 0, 90, 40])
    xr = rng.normal(size=(sizes.sum(), k)).astype(np.float32)
    wr = (rng.normal(size=(4, k, n)) * 0.05).astype(np.float32)
    dyr = rng.normal(size=(sizes.sum(), n)).astype(np.float32)
    y, dx, dw = _forward_and_grads(lambda a, b: fp8.fp8_ragged_dot(a, b, jnp.asarray(sizes, jnp.int32), impl),
                                   xr, wr, dyr)
    xq, xs = np_quantize(xr, (0,))
    dyq, dys = np_quantize(dyr, (0,))
    x_rows = (xq * expand(xs, (0,), xq.shape))[:len(xr)]
    dy_rows = (dyq * expand(dys, (0,), dyq.shape))[:len(xr)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for e in range(4):
        rows = slice(starts[e], starts[e + 1])
        if sizes[e]:
            assert _rel(y[rows], np_block_dot(xr[rows], wr[e])) < 2e-6
            assert _rel(dx[rows], np_block_dot(dyr[rows], wr[e].T)) < 2e-6
            assert _rel(dw[e], x_rows[rows].T @ dy_rows[rows]) < 2e-6
        else:
            assert not np.asarray(dw[e]).any()


def test_moe_dispatches_agree_under_fp8():
    """Fprop and Dgrad tile per token, so every dispatch layout gives the same FP8 forward and input
    gradient (Wgrad's row tiles follow each layout's rows); and FP8 moves the result."""
    rng = np.random.default_rng(5)
    t, d, f, e, k = 24, 160, 140, 4, 2
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    weights = jnp.asarray(rng.uniform(0.1, 1, size=(t, k)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]), jnp.int32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]

    @jax.jit
    def run_all(x, weights, idx, ws):  # all arguments: XLA would spend minutes constant-folding closures
        out = {}
        for name, fp8_on in (('dense', True), ('capacity', True), ('grouped', True), ('ragged', True),
                             ('gather', True), ('dense', False)):
            y, vjp = jax.vjp(lambda a: moe.DISPATCH[name](a, weights, idx, *ws, t, fp8=fp8_on)[0], x)  # noqa: B023
            out[name, fp8_on] = (y, vjp(jnp.ones_like(y))[0])
        return out

    out = jax.tree.map(np.asarray, run_all(x, weights, idx, ws))

    base_y, base_dx = out['dense', True]
    for name in ('capacity', 'grouped', 'ragged', 'gather'):
        y, dx = out[name, True]
        np.testing.assert_allclose(y, base_y, rtol=1e-5, atol=1e-5 * np.abs(base_y).max())
        np.testing.assert_allclose(dx, base_dx, rtol=1e-5, atol=1e-5 * np.abs(base_dx).max())
    exact_y, _ = out['dense', False]
    assert 1e-3 < _rel(base_y, exact_y.astype(np.float64)) < 0.1


# ---------------------------------------------------------------- why FP32 promotion every 128 of K

def _keep_bits(s, bits: int):
    """s with its significand truncated (toward zero) to `bits` bits: the modelled tensor-core accumulator."""
    m, e = np.frexp(s)
    return np.ldexp(np.trunc(m * 2.0 ** bits) / 2.0 ** bits, e)


def _limited_dot(a, b, bits: int, promote: int):
    """a [M, K] @ b [K, N] summed in K order through an accumulator that keeps `bits` significant bits;
    with `promote`, every `promote` products the partial sum moves into a float64 total (the FP32 CUDA-core
    accumulator of V3's kernels; float64 here so it adds no error of its own) and restarts at zero."""
    total = np.zeros((a.shape[0], b.shape[1]))
    acc = np.zeros_like(total)
    for i in range(a.shape[1]):
        acc = _keep_bits(acc + np.outer(a[:, i], b[i]), bits)  # E4M3 x E4M3 products are exact
        if promote and (i + 1) % promote == 0:
            total, acc = total + acc, np.zeros_like(acc)
    return total + acc


def test_fp32_promotion_every_128_keeps_the_error_flat_as_k_grows():
    """V3 (section 3.3.2): H800 tensor cores accumulate FP8 products in about 14 bits, so a K = 4096 GEMM
    is off by ~2%; adding each 128-long partial sum into FP32 bounds the error. Modelled: products of E4M3
    values exact, the accumulator's significand truncated to 14 bits after every addition (round-to-nearest
    gives 10x smaller errors than the paper's ~2%, truncation reproduces it)."""
    rng = np.random.default_rng(6)
    rows = []
    for k in (128, 512, 1024, 4096):
        a = rng.normal(size=(16, k)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        b = rng.normal(size=(k, 16)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        exact = a @ b
        err = [np.abs(_limited_dot(a, b, 14, promote) - exact).mean() / np.abs(exact).mean() for promote in (0, 128)]
        rows.append((k, *err))
    print('\n| K | error, 14-bit accumulator | with FP32 promotion every 128 |\n|---|---|---|')
    for k, plain, promoted in rows:
        print(f'| {k} | {plain:.2e} | {promoted:.2e} |')
    (_, plain_128, promoted_128), (*_, plain_4096, promoted_4096) = rows[0], rows[-1]
    assert plain_128 == promoted_128  # K = 128 is one block: nothing to promote
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)  # the error grows with K ...
    assert 1e-2 < plain_4096 < 5e-2  # ... to the paper's percent level at K = 4096
    assert promoted_4096 < 2 * promoted_128 and plain_4096 > 20 * promoted_4096  # promotion keeps it flat


# ---------------------------------------------------------------- in training

def _smoke_config(fp8_on: bool, steps: int = 4):
    c = presets.load_experiment(__file__.replace('tests/model/test_fp8.py', 'experiments/x.py'), 'v3_small',
                                'smoke')
    c.model.fp8 = fp8_on
    c.mesh.data = 1
    c.train.steps = steps
    c.train.async_checkpoint = False
    c.optim.decay_steps = 4
    return c


def test_train_state_tree_is_the_same_with_fp8():
    """FP8 lives in the GEMMs only: parameters, optimizer state and buffers keep their shapes and dtypes, so
    a checkpoint moves freely between FP8 and higher-precision runs."""
    import flax.linen as nn
    from dsjax import sharding
    from dsjax.model.transformer import Transformer
    from dsjax.train import loop, optim

    def abstract_state(fp8_on):
        c = _smoke_config(fp8_on)
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            _, abstract, _ = loop.build_state_fns(Transformer(config_lib.freeze_model(c.model)),
                                                  optim.make_optimizer(c.optim), mesh, c.data.seq_len)
        return abstract

    off, on = abstract_state(False), abstract_state(True)
    assert jax.tree.structure(off) == jax.tree.structure(on)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), off, on)) == \
        [True] * len(jax.tree.leaves(off))


def test_v3_small_smoke_with_fp8_trains_saves_and_resumes(tmp_path):
    from dsjax.train import logger, loop
    loop.run(_smoke_config(True, steps=2), tmp_path, devices=jax.devices()[:1])
    last = loop.run(_smoke_config(True, steps=4), tmp_path, devices=jax.devices()[:1])  # resumes at step 2
    losses = {r['step']: r['loss'] for r in logger.read_metrics(tmp_path) if 'loss' in r}
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert np.isfinite(last['val_loss']) and losses[4] < losses[1]
    saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved == [2, 4]
