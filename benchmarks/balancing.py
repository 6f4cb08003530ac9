"""Balancing ablation on v3_small: routing-bias balancing (two gammas) vs sequence-wise loss only vs none.

    python benchmarks/balancing.py --workdir=runs/balancing [--steps=150]

Runs each variant (skipping finished ones: rerunning resumes), then writes balancing.md (final
validation loss, global and batch MaxVio, dropped fraction) and balancing.png (validation MaxVio and
validation loss over steps) into benchmarks/results/.
"""
import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

from dsjax import config as config_lib  # noqa: E402
from dsjax.train import logger, loop  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/balancing', 'Where the runs live.')
_STEPS = flags.DEFINE_integer('steps', 150, 'Training steps of every run (equal length).')

VARIANTS = {
    'bias gamma 1e-2 + seq loss': dict(bias_update_rate=0.01),
    'bias gamma 1e-3 + seq loss': dict(bias_update_rate=0.001),
    'seq-wise loss only': dict(bias_update_rate=0.0),
    'no balancing': dict(bias_update_rate=0.0, aux_loss_alpha=0.0),
}
RESULTS = pathlib.Path(__file__).parent / 'results'


def variant_config(overrides: dict, steps: int):
    c = config_lib.load_experiment(str(pathlib.Path(__file__).parents[1] / 'experiments' / 'x.py'), 'v3_small')
    c.train.bias_update_rate = overrides['bias_update_rate']
    c.model.aux_loss_alpha = overrides.get('aux_loss_alpha', c.model.aux_loss_alpha)
    c.train.steps = c.optim.decay_steps = c.train.checkpoint_every = steps
    c.train.eval_every = max(steps // 3, 1)
    c.train.progress_bar = False
    return c


def main(argv):
    del argv
    root = pathlib.Path(_WORKDIR.value)
    runs = {}
    for name, overrides in VARIANTS.items():
        workdir = root / name.replace(' ', '_').replace('+', 'plus')
        loop.run(variant_config(overrides, _STEPS.value), workdir)  # resumes / returns at once when done
        runs[name] = logger.read_metrics(workdir)
    rows = ['| run | val loss | global MaxVio | batch MaxVio (last step) | dropped (last step) |', '|---|---|---|---|---|']
    fig, (ax_mv, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, records in runs.items():
        evals = [r for r in records if 'val_loss' in r]
        train = [r for r in records if 'loss' in r]
        rows.append(f"| {name} | {evals[-1]['val_loss']:.3f} | {evals[-1]['maxvio_global']:.2f} | "
                    f"{train[-1]['maxvio_batch']:.2f} | {train[-1]['dropped']:.1%} |")
        ax_mv.plot([r['step'] for r in evals], [r['maxvio_global'] for r in evals], marker='o', label=name)
        ax_loss.plot([r['step'] for r in evals], [r['val_loss'] for r in evals], marker='o', label=name)
    ax_mv.set_title('global MaxVio (validation set, mean over layers)')
    ax_loss.set_title('validation loss')
    for ax in (ax_mv, ax_loss):
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f'v3_small, {_STEPS.value} steps each, same seed and data')
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / 'balancing.png', dpi=90)
    (RESULTS / 'balancing.md').write_text('# Balancing ablation (v3_small)\n\n' + '\n'.join(rows) + '\n')
    print('\n'.join(rows))
    print(json.dumps({name: runs[name][-1].get('maxvio_global') for name in runs}))


if __name__ == '__main__':
    app.run(main)
