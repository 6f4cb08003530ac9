"""Run dashboard: python -m dsjax.report --workdir=DIR renders DIR/report.png from the run's metrics.

Panels: train and validation loss, learning rate, gradient norm, tokens/s and MFU, MaxVio (batch and
global), and for MoE runs the validation expert load per layer at the last evaluation (a heatmap of
load / mean load: 1.0 is perfect balance) and MaxVio per layer over evaluations.
"""
# Figures are made with the object API (no pyplot): importing this module never changes the
# backend of a notebook or program that imports it.
from matplotlib.figure import Figure
import numpy as np
from absl import flags
from etils import epath

from dsjax import cli
from dsjax.train import logger


def series(records, key):
    """(steps, values) of the records that hold a finite `key`."""
    points = [(r['step'], r[key]) for r in records if key in r and np.isfinite(r[key])]
    return tuple(map(list, zip(*points))) if points else ([], [])


def expert_loads(workdir) -> list[tuple[int, np.ndarray]]:
    """(step, load [layers, experts]) of every saved evaluation, by step."""
    files = sorted((epath.Path(workdir) / 'expert_load').glob('step_*.npy'))
    loads = []
    for f in files:
        with f.open('rb') as fh:
            loads.append((int(f.stem.split('_')[1]), np.load(fh)))
    return loads


def render(workdir, out=None) -> epath.Path:
    """Draws the dashboard PNG and returns its path."""
    workdir = epath.Path(workdir)
    records = logger.read_metrics(workdir)
    loads = expert_loads(workdir)
    rows = 3 if loads else 2
    fig = Figure(figsize=(16, 4.2 * rows))
    axes = fig.subplots(rows, 3, squeeze=False)
    panels = [
        ('loss', [('loss', 'train'), ('val_loss', 'validation')], 'linear'),
        ('learning rate', [('lr', 'lr')], 'linear'),
        ('gradient norm', [('grad_norm', 'global norm')], 'log'),
        ('throughput', [('tokens_per_s', 'tokens/s')], 'linear'),
        ('MFU', [('mfu', 'achieved / measured matmul peak')], 'linear'),
        ('MaxVio (expert load imbalance)', [('maxvio_batch', 'batch'), ('maxvio_global', 'validation set')], 'linear'),
    ]
    for ax, (title, keys, scale) in zip(axes[:2].flat, panels):
        for key, label in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker='.' if key.startswith(('val', 'maxvio_g')) else None, label=label)
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.set_yscale(scale if any(series(records, k)[0] for k, _ in keys) else 'linear')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if loads:
        step, load = loads[-1]
        ratio = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
        im = axes[2, 0].imshow(ratio, aspect='auto', cmap='RdBu_r', vmin=0, vmax=2)
        axes[2, 0].set_title(f'validation load / mean, step {step}')
        axes[2, 0].set_xlabel('expert')
        axes[2, 0].set_ylabel('MoE layer')
        axes[2, 0].set_yticks(range(load.shape[0]))
        fig.colorbar(im, ax=axes[2, 0])
        steps = [s for s, _ in loads]
        per_layer = np.array([(l.max(1) - l.mean(1)) / np.maximum(l.mean(1), 1e-9) for _, l in loads])
        for layer in range(per_layer.shape[1]):
            axes[2, 1].plot(steps, per_layer[:, layer], marker='.', label=f'layer {layer}')
        axes[2, 1].set_title('MaxVio per MoE layer (validation)')
        axes[2, 1].set_xlabel('step')
        axes[2, 1].legend(fontsize=7)
        axes[2, 1].grid(alpha=0.3)
        first = loads[0][1]
        axes[2, 2].bar(np.arange(first.shape[1]) - 0.2, first.sum(0) / first.sum() * first.shape[1], 0.4,
                       label=f'step {loads[0][0]}')
        axes[2, 2].bar(np.arange(load.shape[1]) + 0.2, load.sum(0) / load.sum() * load.shape[1], 0.4,
                       label=f'step {step}')
        axes[2, 2].axhline(1.0, color='k', lw=0.8)
        axes[2, 2].set_title('load per expert / mean, all layers')
        axes[2, 2].legend(fontsize=8)
    fig.suptitle(str(workdir))
    fig.tight_layout()
    out = epath.Path(out) if out else workdir / 'report.png'
    save_png(fig, out)
    return out


def save_png(fig, out: epath.Path, **kwargs) -> None:
    """Writes a figure as PNG to a local or remote (gs://, s3://) path alike (matplotlib alone would write
    a local folder named 'gs:')."""
    with out.open('wb') as f:
        fig.savefig(f, dpi=90, format='png', **kwargs)


def main():
    workdir = epath.Path(flags.FLAGS.workdir)
    if not (workdir / logger.METRICS_FILE).is_file():
        raise FileNotFoundError(f'--workdir={str(workdir)!r} holds no {logger.METRICS_FILE}: give a run directory '
                                'that dsjax.main wrote')
    print(render(workdir, flags.FLAGS.out))


if __name__ == '__main__':
    # Defined here, not at import: the sweep runner and notebooks import this module beside other CLIs.
    flags.DEFINE_string('workdir', None, 'Run directory holding metrics.jsonl.', required=True)
    flags.DEFINE_string('out', None, 'PNG path (default: WORKDIR/report.png).')
    cli.run(main)
