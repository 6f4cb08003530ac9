"""MoE dispatch strategies on this machine: ms per forward+backward of the routed experts as E grows.

Run: `python benchmarks/moe_dispatch.py` (about 2 minutes on 2 CPU cores); prints a markdown table
and writes it to benchmarks/results/moe_dispatch.md.
Fixed: T=256 tokens, D=256, expert width F=64, K=4 experts per token, random (roughly balanced)
softmax routing. dense and ragged are dropless; `capacity C=T` is the capacity strategy with room for
every token (what the default capacity_factor=0 and evaluation give); capacity and expert_parallel use
capacity factor 1.25 (expert_parallel on a 1-device mesh: local all_to_alls, so it measures the
packing overhead). On CPU, jax lowers ragged_dot to a masked dense dot over every group
(`_ragged_dot_general_impl`), so ragged costs about K x dense there.
"""
import math
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model import moe

TOKENS, WIDTH, EXPERT_WIDTH, TOP_K = 256, 256, 64, 4
EXPERTS = (8, 16, 64, 128)
CAPACITY_FACTOR = 1.25
# Row label -> (DISPATCH name, capacity factor; 0 means room for every token).
STRATEGIES = {
    'dense': ('dense', 0.0),
    'ragged': ('ragged', 0.0),
    'capacity C=T': ('capacity', 0.0),
    'capacity': ('capacity', CAPACITY_FACTOR),
    'expert_parallel': ('expert_parallel', CAPACITY_FACTOR),
}
RESULTS = pathlib.Path(__file__).parent / 'results' / 'moe_dispatch.md'


def inputs(e: int):
    """Activations, top-k gates of random softmax scores, and expert weights for E experts."""
    keys = jax.random.split(jax.random.PRNGKey(e), 5)
    x_TxD = jax.random.normal(keys[0], (TOKENS, WIDTH))
    weights_TxK, idx_TxK = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (TOKENS, e))), TOP_K)
    gate_ExDxF, up_ExDxF = (jax.random.normal(k, (e, WIDTH, EXPERT_WIDTH)) / WIDTH ** 0.5 for k in keys[2:4])
    down_ExFxD = jax.random.normal(keys[4], (e, EXPERT_WIDTH, WIDTH)) / EXPERT_WIDTH ** 0.5
    return x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD


def step_fn(strategy: str, e: int):
    """jit(value_and_grad) of a scalar loss through one dispatch, grads for x, gates and experts."""
    name, factor = STRATEGIES[strategy]
    dispatch = moe.DISPATCH[name]
    capacity = min(TOKENS, math.ceil(TOKENS * TOP_K / e * factor)) if factor else TOKENS

    def loss(x_TxD, weights_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, idx_TxK):
        y_TxD, dropped = dispatch(x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD, capacity)
        return jnp.mean(y_TxD ** 2), dropped
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def time_ms(fn, args, min_seconds: float = 0.4, repeats: int = 3) -> float:
    """Median over `repeats` of the mean wall time of a loop lasting at least `min_seconds`."""
    jax.block_until_ready(fn(*args))  # compile
    means = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < min_seconds:
            jax.block_until_ready(fn(*args))
            n += 1
        means.append((time.perf_counter() - start) / n * 1e3)
    return statistics.median(means)


def main():
    mesh = sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])
    ms, dropped = {}, {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        for e in EXPERTS:
            x, w, idx, gate, up, down = inputs(e)
            for strategy in STRATEGIES:
                fn = step_fn(strategy, e)
                args = (x, w, gate, up, down, idx)
                ms[strategy, e] = time_ms(fn, args)
                dropped[strategy, e] = float(fn(*args)[0][1])
                print(f'{strategy:>16} E={e:<4} {ms[strategy, e]:8.2f} ms  dropped {dropped[strategy, e]:.3f}',
                      flush=True)

    header = '| strategy | ' + ' | '.join(f'E={e}' for e in EXPERTS) + ' | 128 vs 16 | dropped at E=128 |'
    lines = [
        f'ms per forward+backward of the routed experts; T={TOKENS}, D={WIDTH}, F={EXPERT_WIDTH}, K={TOP_K}, '
        f'capacity factor {CAPACITY_FACTOR} for capacity / expert_parallel; jax {jax.__version__}, '
        f'{jax.devices()[0].platform} ({jax.devices()[0].device_kind}).',
        '',
        header,
        '|' + '---|' * (len(EXPERTS) + 3),
    ]
    for s in STRATEGIES:
        cells = ' | '.join(f'{ms[s, e]:.1f}' for e in EXPERTS)
        lines.append(f'| {s} | {cells} | {ms[s, 128] / ms[s, 16]:.1f}x | {dropped[s, 128]:.3f} |')
    dropless = [s for s in STRATEGIES if not STRATEGIES[s][1]]
    best, best_dropless = (min(group, key=lambda s: ms[s, 128]) for group in (STRATEGIES, dropless))
    lines += ['', f'At E=128 the fastest dropless strategy is {best_dropless}; the fastest overall is {best} '
              f'(dropping {dropped[best, 128]:.1%} of assignments).']
    table = '\n'.join(lines)
    print('\n' + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text('# MoE dispatch benchmark\n\n' + table + '\n')


if __name__ == '__main__':
    main()
