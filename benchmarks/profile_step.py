"""Where a train step's time goes on this backend: XLA ops timed by the profiler, summed by kind and by
the model part they come from.

Run: `python benchmarks/profile_step.py` (llm_small; `--shape=v3_small` for the MoE); prints markdown and
writes results/profile_step_<shape>.md. The step is benchmarks/harness.py's (the loop's jitted train step),
warmed up, then `--steps` steps run under `jax.profiler.trace`. Each XLA op's events on the worker threads
are summed per step and grouped by kind (the op name without its '.N' suffix: 'ynn_fusion' are the
YNNPACK dots on CPU, 'copy_bitcast_fusion' copies and layout changes, ...) and by model part (the
op's jax name in the compiled HLO: attention, MLP, norms, the chunked head + loss, the rest; the
backward of each is 'transpose(...)' there). An op runs on one thread while the other works for it
inside parallel regions, and independent ops overlap, so op times add up to more than the wall time;
the shares compare parts with each other. The busy share counts a thread busy inside an op or a
parallel region.
"""
import collections
import pathlib
import re
import tempfile
import time

from absl import app, flags
import jax

from dsjax import presets

from harness import build_ours, op_times, random_batch  # benchmarks/harness.py

_SHAPE = flags.DEFINE_string('shape', 'llm_small', 'Experiment file whose model and batch to profile.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Profiled steps (after two warm-up steps).')
_TOP = flags.DEFINE_integer('top', 12, 'Op kinds and single ops listed.')
PARTS = (('/attn/', 'attention'), ('/mlp/', 'MLP / MoE'), ('norm', 'RMSNorm'), ('jvp()/while', 'head + loss'))


def model_part(hlo_text: str) -> dict:
    """{op name: 'forward <part>' or 'backward <part>'} from the compiled HLO's op_name metadata."""
    parts = {}
    for name, jax_name in re.findall(r'%([\w.-]+) = [^\n]*?op_name="([^"]*)"', hlo_text):
        part = next((label for key, label in PARTS if key in jax_name), 'other (embedding, optimizer, ...)')
        parts[name] = ('backward ' if 'transpose(' in jax_name else 'forward ') + part
    return parts


def main(argv):
    del argv
    c = presets.load_experiment(str(pathlib.Path(__file__).parents[1] / 'experiments' / 'x.py'), _SHAPE.value)
    ours = build_ours(c, random_batch(c.model, c.data.batch_size, c.data.seq_len))
    ours.run(2)
    n = _STEPS.value
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            ours.run(n)
            wall_ms = (time.perf_counter() - start) / n * 1e3
        ops, busy_ns, threads = op_times(trace_dir)
    part_of = model_part(ours.compiled.as_text())
    kinds, parts = collections.Counter(), collections.Counter()
    for name, ns in ops.items():
        kinds[name.split('.')[0]] += ns
        parts[part_of.get(name, 'no jax name (fills, copies, loop control)')] += ns
    op_ms = sum(ops.values()) / n / 1e6
    lines = [f'# Where {_SHAPE.value}\'s train step spends its time ({jax.default_backend()}, '
             f'jax {jax.__version__})', '',
             f'Step wall time {wall_ms:.0f} ms under the profiler; {threads} worker threads, busy '
             f'{busy_ns / n / 1e6 / (wall_ms * max(threads, 1)):.0%} of the step (inside an op or a parallel region); '
             f'XLA op events sum to {op_ms:.0f} ms per step.', '',
             '| model part | ms of op time per step | share |', '|---|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} | {ns / n / 1e6 / op_ms:.0%} |' for k, ns in parts.most_common()]
    lines += ['', '| op kind | ms per step | share of op time |', '|---|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} | {ns / n / 1e6 / op_ms:.0%} |' for k, ns in kinds.most_common(_TOP.value)]
    lines += ['', '| single op | ms per step | model part |', '|---|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} | {part_of.get(k, "")} |' for k, ns in ops.most_common(_TOP.value)]
    text = '\n'.join(lines) + '\n'
    print(text)
    (pathlib.Path(__file__).parent / 'results' / f'profile_step_{_SHAPE.value}.md').write_text(text)


if __name__ == '__main__':
    app.run(main)
