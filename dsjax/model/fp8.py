"""FP8 GEMMs as DeepSeek-V3 trained with them (paper section 3.3), forward and both backward products.

Axis legend: M rows (tokens), K contraction, N output features, G groups (experts or expert blocks),
A assignments (rows sorted by expert), E experts.

Every operand of the three GEMMs of a linear layer (Fprop y = x w, Dgrad dx = dy w^T, Wgrad
dw = x^T dy) is E4M3 with a float32 scale per tile, the scale computed online from the tile's max-abs
(scale = amax / 448, so the largest entry maps to E4M3's largest finite value; no delayed scaling):
- activations and activation gradients: 1 x 128 tiles along that GEMM's contraction (per row per 128
  channels in Fprop and Dgrad; per channel per 128 rows in Wgrad, V3's 128 x 1 re-quantisation);
- weights: 128 x 128 blocks (the same blocks serve w in Fprop and w^T in Dgrad, as in V3).
Products accumulate in float32 and come out in the compute dtype (the weight gradient in the weight's).
Axes that are not a multiple of 128 are zero-padded before the scales are taken (as DeepSeek's
checkpoint blocks are), so an edge tile is scaled by its real entries only.

Two implementations with the same numbers:
- 'reference' (any backend, the one that runs on CPU and TPU): quantise, dequantise to float32 and
  multiply in float32. In exact arithmetic this is the block recipe (sum over K blocks of the float32
  partial product times both scales); in float32 the two agree to ~1e-6 relative (tests/model/test_fp8.py
  checks it against a numpy model of the per-block form). Measured on this CPU (2048 x 256 @ 256 x 768):
  plain float32 matmul 6.3 ms, quantise-dequantise-matmul 9.7 ms, per-K-block float32 partial products
  30.6 ms, and qwix.dot_general on the E4M3 values (the per-block form with an FP8 dot) 734 ms, because
  XLA's CPU emulates an FP8 dot; so the reference dequantises before the product.
- 'tokamax' (GPU): tokamax.ragged_dot on the quantised operands, whose Triton kernel multiplies the
  per-K-block partial products by the scales inside its K loop (the FP32 promotion every 128 of K); a
  dense or batched product is a ragged one with one group or equal groups.
The limited-precision accumulation inside a block that made V3 promote every 128 elements (H800 tensor
cores keep ~14 bits) is not something either path has; tests/model/test_fp8.py models it in numpy.

Quantisation is qwix's (`qwix.quantize` with channelwise and tiled axes). qwix computes the scale in
the input's dtype: a bfloat16 input gets bfloat16 scales, which drifted the product by 2e-2 relative
(the issue's measurement), so inputs are upcast to float32 first; qwix needs every tiled axis to be a
multiple of the tile, hence the padding here. qwix's QtRule (its model-interception API) tiles only
the innermost contraction axis, so it cannot give 128 x 128 weight blocks or the per-GEMM re-tiling of
the backward; the custom VJP below calls qwix's core quantize instead.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import qwix

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # E4M3's largest finite value
TILE = 128
IMPLS = ('reference', 'tokamax')


def resolve_impl(backend: str | None = None) -> str:
    """'tokamax' (its Triton ragged_dot applies per-K-block scales in the kernel) on a GPU, else the
    float32 'reference'."""
    return 'tokamax' if (backend or jax.default_backend()) == 'gpu' else 'reference'


def _pad_to_tile(x, axes: Sequence[int]):
    """Zero-pads each axis in `axes` up to a multiple of TILE."""
    pad = [(0, -n % TILE if i in axes else 0) for i, n in enumerate(x.shape)]
    return jnp.pad(x, pad) if any(p for _, p in pad) else x


def quantize(x, axes: Sequence[int]) -> qwix.QArray:
    """E4M3 values and float32 scales of x: one scale per TILE entries along each of `axes`, per index
    along every other axis; the tiled axes are zero-padded to a multiple of TILE (the QArray has the
    padded shape). An all-zero tile gets scale 1 (qwix) and quantises to zeros."""
    axes = tuple(sorted(a % x.ndim for a in axes))
    x = _pad_to_tile(x.astype(jnp.float32), axes)
    return qwix.quantize(x, E4M3, channelwise_axes=[a for a in range(x.ndim) if a not in axes],
                         tiled_axes={a: TILE for a in axes})


def dequantize(q: qwix.QArray, shape: Sequence[int]) -> jax.Array:
    """float32 values of a `quantize`d array, cut back to the unpadded `shape`."""
    return qwix.dequantize(q)[tuple(slice(0, n) for n in shape)]


def fake_quantize(x, axes: Sequence[int]) -> jax.Array:
    """x rounded through E4M3 with `quantize`'s tiles, in float32."""
    return dequantize(quantize(x, axes), x.shape)


# ---------------------------------------------------------------- the products

def _product(layout: str, x, w, *args):
    """The float32 product of float32 operands: 'matmul' ([M, K] @ [K, N], or per group) or 'ragged'
    (jax.lax.ragged_dot with args = (group sizes,)). HIGHEST precision: a dequantised entry (4 significant
    bits times a float32 scale) would otherwise be rounded to bf16 / TF32 on a TPU / GPU."""
    highest = jax.lax.Precision.HIGHEST
    if layout == 'ragged':
        return jax.lax.ragged_dot(x, w, args[0], precision=highest, preferred_element_type=jnp.float32)
    return jnp.matmul(x, w, precision=highest, preferred_element_type=jnp.float32)


def _tokamax_product(layout: str, x_q: qwix.QArray, w_q: qwix.QArray, *args):
    """_product of quantised operands through tokamax.ragged_dot, which takes the E4M3 values and their
    scales (a dense product is one group; a per-group one, equal groups)."""
    import tokamax  # noqa: PLC0415  (only where this path runs: it loads the kernels' modules)
    from absl import flags  # noqa: PLC0415
    # tokamax parses sys.argv for its absl flags unless an absl app has: a notebook's or pytest's arguments
    # are not flags, so it gets the defaults (as moe.ragged_dot does).
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    if layout == 'ragged':
        lhs, rhs, sizes = x_q, w_q, args[0]
    elif x_q.ndim == 2:
        lhs, rhs, sizes = x_q, jax.tree.map(lambda a: a[None], w_q), jnp.array([x_q.shape[0]], jnp.int32)
    else:
        g, m, k = x_q.shape
        lhs, rhs, sizes = x_q.reshape(g * m, k), w_q, jnp.full((g,), m, jnp.int32)
    # Triton on a GPU; elsewhere tokamax's XLA reference, which dequantises (the tests' check of this path).
    implementation = 'triton' if jax.default_backend() == 'gpu' else 'xla'
    y = tokamax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32, implementation=implementation)
    return y.reshape(*x_q.shape[:-1], y.shape[-1])


def _quantized_product(layout: str, impl: str, x, w, *args):
    """x @ w with x in 1 x 128 tiles along K and w in 128 x 128 blocks, float32, cut to the unpadded N."""
    x_q, w_q = quantize(x, (-1,)), quantize(w, (-2, -1))
    if impl == 'reference':
        y = _product(layout, qwix.dequantize(x_q), qwix.dequantize(w_q), *args)
    else:
        y = _tokamax_product(layout, x_q, w_q, *args)
    return y[..., :w.shape[-1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8(layout: str, impl: str, x, w, *args):
    """_product(layout, x, w, *args) with each of its three GEMMs on E4M3 operands, in x's dtype."""
    return _fp8_fwd(layout, impl, x, w, *args)[0]


def _fp8_fwd(layout, impl, x, w, *args):
    # Residuals: w as it is (the compute-dtype weight, held anyway) rather than an E4M3 copy; the
    # backward re-quantises it into the same blocks.
    return _quantized_product(layout, impl, x, w, *args).astype(x.dtype), (x, w, args)


def _fp8_bwd(layout, impl, res, dy):
    x, w, args = res
    # Dgrad is a forward product with w^T: dy per row per 128 of N, w^T's blocks are w's transposed.
    dx = _quantized_product(layout, impl, dy, jnp.swapaxes(w, -1, -2), *args)
    # Wgrad contracts over the rows: x and dy quantised per channel per 128 rows (V3's 128 x 1 tiles),
    # multiplied in float32 on both paths (tokamax's ragged-contraction kernel dequantises its inputs).
    x_rows = fake_quantize(x, (-2,))
    wgrad = jax.linear_transpose(lambda b: _product(layout, x_rows, b, *args),
                                 jax.ShapeDtypeStruct(w.shape, jnp.float32))
    dw, = wgrad(fake_quantize(dy, (-2,)))
    return (dx.astype(x.dtype), dw.astype(w.dtype)) + tuple(None for _ in args)


_fp8.defvjp(_fp8_fwd, _fp8_bwd)


def fp8_dot(x, w, impl: str | None = None):
    """x [M, K] @ w [K, N] -> [M, N], or per group x [G, M, K] @ w [G, K, N] -> [G, M, N] (the experts'
    [E, C, D] capacity buffers, dispatch_grouped's [blocks, rows, D]), in FP8 (module docstring), in x's
    dtype. `impl`: 'reference' or 'tokamax' (default: resolve_impl())."""
    return _fp8('matmul', impl or resolve_impl(), x, w)


def fp8_ragged_dot(x_AxK, w_ExKxN, sizes_E, impl: str | None = None):
    """jax.lax.ragged_dot(x, w, sizes) in FP8: rows sorted by group, group e's rows times w[e]. Wgrad's
    128-row tiles run over the sorted rows, so a tile may straddle two experts (V3's kernels tile per
    expert; fp8_dot's per-group layouts do too)."""
    return _fp8('ragged', impl or resolve_impl(), x_AxK, w_ExKxN, sizes_E)
