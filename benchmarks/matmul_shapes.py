"""The matmuls of llm_small's train step, one at a time: XLA (jax) against PyTorch, float32, same threads.

Run: `python benchmarks/matmul_shapes.py` (seconds); prints markdown and writes results/matmul_shapes.md.
Shapes for T = 16 x 256 tokens, d = 128, ffn 344, vocab 4096: each layer's forward (x @ W), its two
backward products (g @ W^T for the input, x^T @ g for the weight), the head's three, and attention's
three kinds of batched product (64 = batch x heads, 256 positions, head dim 32): scores q @ k^T, the
output p @ v, and the backward's p^T @ g (dv; dk has the same shape), whose contraction runs over the
rows of both operands. Median of 5 rounds of 10 calls, the rounds alternating jax and torch
(harness.side_by_side).
"""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from harness import Timed, side_by_side  # benchmarks/harness.py
from train_step import xla_threads  # benchmarks/train_step.py

T, D, F, V = 4096, 128, 344, 4096
# name: (lhs shape, rhs shape, lhs transposed, rhs transposed)
CASES = {
    'ffn x @ W  (T,D) x (D,F)': ((T, D), (D, F), False, False),
    'ffn h @ W2  (T,F) x (F,D)': ((T, F), (F, D), False, False),
    'ffn dx = g @ W^T  (T,F) x (D,F)^T': ((T, F), (D, F), False, True),
    'ffn dW = x^T @ g  (T,D)^T x (T,F)': ((T, D), (T, F), True, False),
    'head x @ E^T  (T,D) x (V,D)^T': ((T, D), (V, D), False, True),
    'head dE = g^T @ x  (T,V)^T x (T,D)': ((T, V), (T, D), True, False),
    'head dx = g @ E  (T,V) x (V,D)': ((T, V), (V, D), False, False),
    'attention q @ k^T  (64,256,32) x (64,256,32)^T': ((64, 256, 32), (64, 256, 32), False, True),
    'attention p @ v  (64,256,256) x (64,256,32)': ((64, 256, 256), (64, 256, 32), False, False),
    'attention dv = p^T @ g  (64,256,256)^T x (64,256,32)': ((64, 256, 256), (64, 256, 32), True, False),
}


def flop(sa, sb, lhs_t: bool, rhs_t: bool) -> int:
    m, k = (sa[-1], sa[-2]) if lhs_t else (sa[-2], sa[-1])
    n = sb[-2] if rhs_t else sb[-1]
    return 2 * int(np.prod(sa[:-2], dtype=np.int64)) * m * n * k


def main():
    threads = xla_threads()
    torch.set_num_threads(threads)
    lines = [f'# llm_small\'s matmuls alone: jax {jax.__version__} vs torch {torch.__version__}, float32, {threads} '
             f'threads, load average {os.getloadavg()[0]:.1f} at the start', '',
             '| product | GFLOP | jax GFLOP/s | torch GFLOP/s | jax / torch speed |', '|---|---|---|---|---|']
    rng = np.random.default_rng(0)
    for name, (sa, sb, lhs_t, rhs_t) in CASES.items():
        a, b = rng.standard_normal(sa, np.float32), rng.standard_normal(sb, np.float32)
        jax_fn = jax.jit(lambda x, y, lt=lhs_t, rt=rhs_t: (jnp.swapaxes(x, -1, -2) if lt else x) @
                         (jnp.swapaxes(y, -1, -2) if rt else y))
        torch_fn = lambda x, y, lt=lhs_t, rt=rhs_t: ((x.transpose(-1, -2) if lt else x) @
                                                     (y.transpose(-1, -2) if rt else y))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        seconds = side_by_side({'jax': Timed(lambda: jax_fn(ja, jb), jax.block_until_ready),
                                'torch': Timed(lambda: torch_fn(ta, tb), lambda r: r)}, repeats=5, steps=10)
        t_jax, t_torch = seconds['jax'], seconds['torch']
        f = flop(sa, sb, lhs_t, rhs_t)
        lines.append(f'| {name} | {f / 1e9:.2f} | {f / t_jax / 1e9:.0f} | {f / t_torch / 1e9:.0f} | '
                     f'{t_torch / t_jax:.2f}x |')
    text = '\n'.join(lines) + '\n'
    print(text)
    (pathlib.Path(__file__).parent / 'results' / 'matmul_shapes.md').write_text(text)


if __name__ == '__main__':
    main()
