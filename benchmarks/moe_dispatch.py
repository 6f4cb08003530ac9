"""MoE dispatch strategies on this machine: time per step as routed experts grow at fixed top-k.

Run: `python benchmarks/moe_dispatch.py [block] [step]` (about 30 minutes on 2 busy CPU cores); prints
markdown tables and writes them to benchmarks/results/moe_dispatch.md (part 1) and moe_dispatch_step.md (part 2).

Part 1, the routed experts alone: ms per forward+backward of one dispatch at T=256 and T=2048 tokens
(2048 = v3_small's batch x sequence), D=256, expert width F=64, K=4, random (roughly balanced) softmax
routing. dense, ragged and grouped are dropless; `capacity C=T` is the capacity strategy with room for
every token; capacity and expert_parallel use capacity factor 1.25 (expert_parallel on a 1-device mesh:
local all_to_alls, so it measures the packing overhead). On CPU, jax lowers ragged_dot to a masked
dense dot over every group (`_ragged_dot_general_impl`), so ragged costs about K x dense there; ragged and
`capacity C=T` (which costs what dense costs) run at T=256 only.

Part 2, a full v3_small training step (benchmarks/train_step.py's build, MTP on, 8 x 256 tokens, then
32 x 256) with n_routed_experts = 16 and 128 (top-4, expert width 128) for capacity (factor 1.25) and
grouped (the defaults 'auto' picks on CPU); every cell runs once per round, medians of the rounds.
"""
import math
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import presets
from dsjax import sharding
from dsjax.model import moe

TOKEN_COUNTS, WIDTH, EXPERT_WIDTH, TOP_K = (256, 2048), 256, 64, 4
EXPERTS = (8, 16, 64, 128)
CAPACITY_FACTOR = 1.25
# Row label -> (DISPATCH name, capacity factor; 0 means room for every token).
STRATEGIES = {
    'dense': ('dense', 0.0),
    'ragged': ('ragged', 0.0),
    'grouped': ('grouped', 0.0),
    'capacity C=T': ('capacity', 0.0),
    'capacity': ('capacity', CAPACITY_FACTOR),
    'expert_parallel': ('expert_parallel', CAPACITY_FACTOR),
}
RESULTS = pathlib.Path(__file__).parent / 'results' / 'moe_dispatch.md'
RESULTS_STEP = RESULTS.with_name('moe_dispatch_step.md')


def inputs(e: int, tokens: int):
    """Activations, top-k gates of random softmax scores, and expert weights for E experts."""
    keys = jax.random.split(jax.random.PRNGKey(e), 5)
    x_TxD = jax.random.normal(keys[0], (tokens, WIDTH))
    weights_TxK, idx_TxK = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (tokens, e))), TOP_K)
    gate_ExDxF, up_ExDxF = (jax.random.normal(k, (e, WIDTH, EXPERT_WIDTH)) / WIDTH ** 0.5 for k in keys[2:4])
    down_ExFxD = jax.random.normal(keys[4], (e, EXPERT_WIDTH, WIDTH)) / EXPERT_WIDTH ** 0.5
    return x_TxD, weights_TxK, idx_TxK, gate_ExDxF, up_ExDxF, down_ExFxD


def step_fn(strategy: str, e: int, tokens: int):
    """jit(value_and_grad) of a scalar loss through one dispatch, grads for x, gates and experts."""
    name, factor = STRATEGIES[strategy]
    dispatch = moe.DISPATCH[name]
    capacity = min(tokens, math.ceil(tokens * TOP_K / e * factor)) if factor else tokens

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


FULL_STEP_EXPERTS = (16, 128)
# v3_small's batch of 8 x 256 tokens, then 4x: AdamW and the gradient buffers cost what the total
# parameters cost (8x from 16 to 128 experts), whatever the tokens; a bigger batch shares them out.
FULL_STEP_BATCHES = (8, 32)
# Measured at T=256 only: both cost what dense costs or more on CPU (see the docstring), and at T=2048
# they would take most of the run.
SMALL_T_ONLY = ('ragged', 'capacity C=T')
# dense is left out: at E=128 one step takes minutes here (Part 1 shows its 10x).
FULL_STEP_STRATEGIES = {'capacity': ('capacity', CAPACITY_FACTOR), 'grouped': ('grouped', 0.0)}


def expert_block_table(tokens: int, repeats: int = 3) -> list[str]:
    """Part 1 at `tokens` tokens: one row per strategy. Every (strategy, E) runs once per round, so a
    change of the machine's load between rounds hits every cell alike; medians of the rounds."""
    strategies = [s for s in STRATEGIES if tokens <= 256 or s not in SMALL_T_ONLY]
    mesh = sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])
    fns, dropped = {}, {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        for e in EXPERTS:
            x, w, idx, gate, up, down = inputs(e, tokens)
            for strategy in strategies:
                fn = step_fn(strategy, e, tokens)
                args = (x, w, gate, up, down, idx)
                dropped[strategy, e] = float(fn(*args)[0][1])  # compiles
                fns[strategy, e] = (fn, args)
        times = {key: [] for key in fns}
        for _ in range(repeats):
            for key, (fn, args) in fns.items():
                times[key].append(time_ms(fn, args, min_seconds=0.2, repeats=1))
    ms = {key: statistics.median(v) for key, v in times.items()}
    for (strategy, e), v in ms.items():
        print(f'T={tokens} {strategy:>16} E={e:<4} {v:8.2f} ms  dropped {dropped[strategy, e]:.3f}', flush=True)
    return format_block(tokens, strategies, ms, dropped)


def format_block(tokens: int, strategies, ms: dict, dropped: dict) -> list[str]:
    lines = [
        f'### Routed experts alone, T={tokens} tokens',
        '',
        f'ms per forward+backward of the routed experts; T={tokens}, D={WIDTH}, F={EXPERT_WIDTH}, K={TOP_K}, '
        f'capacity factor {CAPACITY_FACTOR} for capacity / expert_parallel.',
        '',
        '| strategy | ' + ' | '.join(f'E={e}' for e in EXPERTS) + ' | 128 vs 16 | dropped at E=128 |',
        '|' + '---|' * (len(EXPERTS) + 3),
    ]
    for s in strategies:
        cells = ' | '.join(f'{ms[s, e]:.1f}' for e in EXPERTS)
        lines.append(f'| {s} | {cells} | {ms[s, 128] / ms[s, 16]:.2f}x | {dropped[s, 128]:.3f} |')
    dropless = [s for s in strategies if not STRATEGIES[s][1]]
    best, best_dropless = (min(group, key=lambda s: ms[s, 128]) for group in (strategies, dropless))
    lines += ['', f'At E=128 the fastest dropless strategy is {best_dropless}; the fastest overall is {best} '
              f'(dropping {dropped[best, 128]:.1%} of assignments).', '']
    return lines


def full_step_table(batch: int, repeats: int = 3) -> list[str]:
    """Part 2: a whole v3_small train step at `batch` x 256 tokens per strategy and expert count. Every
    (strategy, E) runs once per round, so the E=128 / E=16 ratio compares steps timed under the same load."""
    import harness as ts  # benchmarks/harness.py, beside this file
    runners = {}
    for e in FULL_STEP_EXPERTS:
        for label, (name, factor) in FULL_STEP_STRATEGIES.items():
            c = presets.load_experiment(str(ts.EXPERIMENTS / 'v3_small.py'), 'v3_small')
            c.model.update(n_routed_experts=e, moe_dispatch=name, capacity_factor=factor)
            c.data.batch_size = batch
            cfg = config_lib.freeze_model(c.model)
            runners[label, e] = ts.build_ours(c, ts.random_batch(cfg, c.data.batch_size, c.data.seq_len))
    sec = ts.side_by_side(runners, repeats, 1)
    for (label, e), v in sec.items():
        print(f'full step batch {batch} {label:>10} E={e:<4} {v * 1e3:8.0f} ms', flush=True)
    lines = [
        f'### Full v3_small training step, {batch} x 256 tokens',
        '',
        f'ms per training step (forward, losses, backward, AdamW; MTP on; {batch} x 256 tokens, top-4, expert width '
        f'128), median of {repeats} rounds, each round running every cell once; capacity factor {CAPACITY_FACTOR}.',
        '',
        '| strategy | ' + ' | '.join(f'E={e}' for e in FULL_STEP_EXPERTS) + ' | 128 vs 16 |',
        '|' + '---|' * (len(FULL_STEP_EXPERTS) + 2),
    ]
    for s in FULL_STEP_STRATEGIES:
        cells = ' | '.join(f'{sec[s, e] * 1e3:.0f}' for e in FULL_STEP_EXPERTS)
        lines.append(f'| {s} | {cells} | {sec[s, 128] / sec[s, 16]:.2f}x |')
    return lines + ['']


def main(parts=('block', 'step')):
    """Part 1 ('block') writes RESULTS, part 2 ('step') RESULTS_STEP: `python moe_dispatch.py step` reruns one."""
    import os
    import sys
    parts = sys.argv[1:] or parts
    header = [f'jax {jax.__version__}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), '
              f'{os.cpu_count()} cores.', '']
    for part, out in (('block', RESULTS), ('step', RESULTS_STEP)):
        if part not in parts:
            continue
        load_before = os.getloadavg()
        lines = list(header)
        if part == 'block':
            for tokens in TOKEN_COUNTS:
                lines += expert_block_table(tokens)
        else:
            for batch in FULL_STEP_BATCHES:
                lines += full_step_table(batch)
        lines.append('Load average (1/5/15 min): ' + ' / '.join(f'{x:.1f}' for x in load_before) + ' at the start, '
                     + ' / '.join(f'{x:.1f}' for x in os.getloadavg()) + ' at the end.')
        write(out, lines)


def write(out: pathlib.Path, lines: list[str]) -> None:
    table = '\n'.join(lines)
    print('\n' + table)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = '# MoE dispatch benchmark' + (': full training step' if out == RESULTS_STEP else ': routed experts')
    out.write_text(title + '\n\n' + table + '\n')


if __name__ == '__main__':
    main()
