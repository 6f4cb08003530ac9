"""Where a train step's time goes on this backend: XLA ops timed by the profiler, summed by kind.

Run: `python benchmarks/profile_step.py` (llm_small; `--shape=v3_small` for the MoE); prints markdown and
writes results/profile_step_<shape>.md. The step is benchmarks/harness.py's (the loop's jitted train step),
warmed up, then `--steps` steps run under `jax.profiler.trace`; each XLA op's events on the worker threads
are summed per step and grouped by kind (the op name without its '.N' suffix: 'ynn_fusion' are the
YNNPACK dots on CPU, 'copy_bitcast_fusion' copies and layout changes, ...). The busy share compares the
ops' summed time with the step's wall time times the worker threads: how much of the cores XLA keeps busy.
"""
import collections
import pathlib
import tempfile
import time

from absl import app, flags
import jax

from dsjax import config as config_lib

from harness import build_ours, random_batch  # benchmarks/harness.py

_SHAPE = flags.DEFINE_string('shape', 'llm_small', 'Experiment file whose model and batch to profile.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Profiled steps (after two warm-up steps).')
_TOP = flags.DEFINE_integer('top', 12, 'Op kinds and single ops listed.')


def op_times(trace_dir) -> tuple[collections.Counter, set]:
    """{op name: summed duration in ns} over the XLA worker threads, and the threads' names."""
    path = next(pathlib.Path(trace_dir).rglob('*.xplane.pb'))
    ops, threads = collections.Counter(), set()
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if 'XLAEigen' not in line.name:  # XLA's CPU worker threads
                continue
            threads.add(line.name)
            for event in line.events:
                if not event.name.startswith('ThunkExecutor'):  # the containers, not ops
                    ops[event.name] += event.duration_ns
    return ops, threads


def main(argv):
    del argv
    c = config_lib.load_experiment(str(pathlib.Path(__file__).parents[1] / 'experiments' / 'x.py'), _SHAPE.value)
    ours = build_ours(c, random_batch(c.model, c.data.batch_size, c.data.seq_len))
    ours.run(2)
    n = _STEPS.value
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            ours.run(n)
            wall_ms = (time.perf_counter() - start) / n * 1e3
        ops, threads = op_times(trace_dir)
    kinds = collections.Counter()
    for name, ns in ops.items():
        kinds[name.split('.')[0]] += ns
    busy_ms = sum(ops.values()) / n / 1e6
    lines = [f'# Where {_SHAPE.value}\'s train step spends its time ({jax.default_backend()}, '
             f'jax {jax.__version__})', '',
             f'Step wall time {wall_ms:.0f} ms under the profiler; XLA ops {busy_ms:.0f} ms summed over '
             f'{len(threads)} worker threads: the cores are busy {busy_ms / (wall_ms * max(len(threads), 1)):.0%} '
             'of the step.', '', '| op kind | ms per step | share of op time |', '|---|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} | {ns / n / 1e6 / busy_ms:.0%} |' for k, ns in kinds.most_common(_TOP.value)]
    lines += ['', '| single op | ms per step |', '|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} |' for k, ns in ops.most_common(_TOP.value)]
    text = '\n'.join(lines) + '\n'
    print(text)
    (pathlib.Path(__file__).parent / 'results' / f'profile_step_{_SHAPE.value}.md').write_text(text)


if __name__ == '__main__':
    app.run(main)
