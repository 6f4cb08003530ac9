"""One layer's causal self-attention, forward + backward: dsjax's kernels against PyTorch's sdpa.

Run: `python benchmarks/attention.py` (under a minute); prints markdown and writes results/attention.md.
The shape is llm_small's (batch 16, 256 positions, 4 heads of 32; `--shape=B,L,N,K` for another), float32,
one document per row. dsjax runs `attention.self_attention` with impl 'xla' (einsums over the whole
[L, L] scores) and 'blocked' (the CPU's 'auto': causal query blocks, recomputing backward), jitted with
its gradient; PyTorch runs `scaled_dot_product_attention(is_causal=True)` (its fused flash kernel on CPU)
and `backward`. Median of 5 rounds of 10 calls, rounds alternating (harness.side_by_side), same threads.
"""
import os
import pathlib

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import torch

from dsjax.model import attention

from harness import Timed, side_by_side  # benchmarks/harness.py
from train_step import xla_threads  # benchmarks/train_step.py

_SHAPE = flags.DEFINE_list('shape', ['16', '256', '4', '32'], 'Batch, length, heads, head width.')


def main(argv):
    del argv
    b, length, n, k = (int(x) for x in _SHAPE.value)
    threads = xla_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    q, key, v, dout = (rng.standard_normal((b, length, n, k), np.float32) for _ in range(4))
    segments = jnp.ones((b, length), jnp.int32)
    args = [jnp.asarray(x) for x in (q, key, v, dout)]

    def ours(impl):
        def loss(q, key, v, dout):
            out = attention.self_attention(q[:, :, :, None], key, v, segments, k ** -0.5, impl)
            return (out[:, :, :, 0] * dout).sum()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return Timed(lambda: grad(*args), jax.block_until_ready)

    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3).copy(), requires_grad=True) for x in (q, key, v))
    tdout = torch.from_numpy(dout.transpose(0, 2, 1, 3).copy())

    def torch_step():
        tq.grad = tk.grad = tv.grad = None
        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tdout)
        return tq.grad

    runners = {'xla': ours('xla'), 'blocked': ours('blocked'), 'torch': Timed(torch_step, lambda r: r)}
    seconds = side_by_side(runners, repeats=5, steps=10)
    lines = [f'# One layer\'s causal attention, forward + backward ({b} x {length}, {n} heads of {k}, float32)', '',
             f'jax {jax.__version__} vs torch {torch.__version__}, {threads} threads, load average '
             f'{os.getloadavg()[0]:.1f} at the start; median of 5 alternating rounds of 10 calls.', '',
             '| implementation | ms per call | torch / this |', '|---|---|---|']
    names = {'xla': "dsjax 'xla' (full [L, L] scores)", 'blocked': "dsjax 'blocked' (CPU 'auto')",
             'torch': 'PyTorch sdpa (flash, is_causal)'}
    lines += [f'| {names[key]} | {s * 1e3:.1f} | {seconds["torch"] / s:.2f}x |' for key, s in seconds.items()]
    text = '\n'.join(lines) + '\n'
    print(text)
    (pathlib.Path(__file__).parent / 'results' / 'attention.md').write_text(text)


if __name__ == '__main__':
    app.run(main)
