"""FP8 training (model.fp8) against the same run without, as DeepSeek-V3 validated it; and its CPU cost.

Run:
  python benchmarks/fp8.py compare OFF_WORKDIR ON_WORKDIR   # two finished runs of one experiment, fp8 off / on
  python benchmarks/fp8.py time [experiment] [rounds]       # train-step time fp8 / off in one process
`compare` prints the validation-loss table (relative difference of FP8 to the run without, at every
evaluation) and draws benchmarks/results/fp8_val_loss.png; `time` prints a row of step times. Both tables
are in benchmarks/results/fp8.md. The runs behind the table:
  python -m dsjax.main --config=experiments/v3_small.py --workdir=OFF
  python -m dsjax.main --config=experiments/v3_small.py --config.model.fp8=True --workdir=ON
(same seed and data; one after the other, fresh workdirs).
"""
import pathlib
import sys

from matplotlib.figure import Figure
import numpy as np

from dsjax import config as config_lib
from dsjax import presets
from dsjax.train import logger

RESULTS = pathlib.Path(__file__).parent / 'results'


def losses(workdir, key: str) -> dict[int, float]:
    """step -> `key` ('val_loss', 'loss') of a run."""
    return {r['step']: r[key] for r in logger.read_metrics(workdir) if key in r}


def windowed(train: dict[int, float], window: int) -> dict[int, float]:
    """Mean training loss of steps (s - window, s] for every s a multiple of `window`."""
    return {s: float(np.mean([train[t] for t in range(s - window + 1, s + 1) if t in train]))
            for s in range(window, max(train) + 1, window)}


def compare(off_dir, on_dir, window: int = 50, png=RESULTS / 'fp8_val_loss.png'):
    """Prints the tables and draws the plot of the two runs' validation loss (and training loss averaged
    over `window` steps: both runs see the same batches); returns the final validation difference."""
    curves = {}
    for key, title in (('val_loss', 'validation loss'), ('loss', f'training loss, mean of {window} steps')):
        off, on = losses(off_dir, key), losses(on_dir, key)
        if key == 'loss':
            off, on = windowed(off, window), windowed(on, window)
        steps = sorted(set(off) & set(on))
        rel = {s: (on[s] - off[s]) / off[s] for s in steps}
        curves[title] = (steps, off, on, rel)
        print(f'\n| step | {title}, fp8 off | fp8 on | relative difference (on - off) / off |\n|---|---|---|---|')
        print('\n'.join(f'| {s} | {off[s]:.4f} | {on[s]:.4f} | {rel[s]:+.3%} |' for s in steps))
    fig = Figure(figsize=(11, 4))
    loss_ax, rel_ax = fig.subplots(1, 2)
    for (title, (steps, off, on, rel)), marker in zip(curves.items(), 'os'):
        loss_ax.plot(steps, [off[s] for s in steps], marker + '-', label=f'{title}, fp8 off')
        loss_ax.plot(steps, [on[s] for s in steps], marker + '--', label=f'{title}, fp8 on')
        rel_ax.plot(steps, [100 * rel[s] for s in steps], marker + '-', label=title)
    loss_ax.set(xlabel='step', ylabel='loss', title='v3_small with and without model.fp8', ylim=(3.5, 9))
    loss_ax.legend(fontsize=8)
    rel_ax.axhspan(-0.25, 0.25, color='tab:green', alpha=0.15, label="V3's bound: 0.25%")
    rel_ax.axhline(0, color='gray', lw=0.5)
    rel_ax.set(xlabel='step', ylabel='(fp8 on - off) / off, %', title='relative difference')
    rel_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    steps, _, _, rel = curves['validation loss']
    return rel[steps[-1]]


def time_steps(experiment: str = 'v3_small', rounds: int = 5) -> dict:
    """Median train-step seconds of `experiment` with fp8 off and on, alternating in one process."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import harness  # noqa: PLC0415  (benchmarks/harness.py, beside this file)
    runners = {}
    for fp8_on in (False, True):
        c = presets.load_experiment(str(harness.EXPERIMENTS / 'x.py'), experiment)
        c.model.fp8 = fp8_on
        c.mesh.data = 1
        cfg = config_lib.freeze_model(c.model)
        runners[fp8_on] = harness.build_ours(c, harness.random_batch(cfg, c.data.batch_size, c.data.seq_len))
    sec = harness.side_by_side(runners, repeats=rounds, steps=2)
    print(f'| {experiment} | {sec[False] * 1e3:.0f} | {sec[True] * 1e3:.0f} | {sec[True] / sec[False]:.2f} |')
    return sec


if __name__ == '__main__':
    if sys.argv[1:2] == ['compare']:
        compare(*sys.argv[2:4])
    elif sys.argv[1:2] == ['time']:
        time_steps(*(sys.argv[2:3] or ['v3_small']), *(int(a) for a in sys.argv[3:4]))
    else:
        sys.exit(__doc__)
