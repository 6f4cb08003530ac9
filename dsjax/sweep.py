"""Ablation sweeps: python -m dsjax.sweep --config=experiments/sweeps/<name>.py --workdir=DIR [--print].

A sweep file defines `get_sweep()` returning a plain dict:

    base       the experiment every run starts from, 'experiments/<name>.py[:arg]' (relative to the
               current directory, as for dsjax.main)
    overrides  {'train.steps': 150, ...}: `--config.x=y` overrides shared by every run (optional)
    variants   {'name': {'model.x': 1, ...}, ...}: named override dicts, one variant each (optional)
    product    {'model.x': [1, 2], 'train.y': [3, 4]}: every combination, crossed with the variants
               (optional; with neither, the base alone is the one variant)
    seeds      [0, 1, 2]: each variant runs once per seed (train.seed and data.shuffle_seed)
    metrics    ['val_loss', ...]: what the report tabulates and draws: names logged in metrics.jsonl
               (the final value) or computed from the config (DERIVED_METRICS)

Every run's config is built and validated before the first run starts, so an unknown field, a value of
the wrong type or an invalid combination fails at once, naming the run and the field. Runs execute one
after another as `python -m dsjax.main` subprocesses (each has its own compile cache and memory) in
DIR/<variant>/seed_<s>; `--print` prints those commands instead, one line per run, for a cluster
scheduler. A run whose final step is checkpointed is skipped and an unfinished one resumes, so an
interrupted sweep is finished by rerunning the same command. The report goes into DIR: report.md,
runs.csv (every run) and summary.csv (mean and spread over seeds), loss_curves.png, metrics.png and,
for MoE runs, expert_load.png (validation load per layer and expert at the final step).
"""
import csv
import importlib.util
import io
import itertools
import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

# Figures are made with the object API (no pyplot): importing this module never changes the
# backend of a notebook or program that imports it.
import matplotlib
from matplotlib.figure import Figure
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from dsjax import cli
from dsjax import config as config_lib
from dsjax import presets
from dsjax import report as report_lib
from dsjax import stages
from dsjax.train import checkpoint, logger
from dsjax.train import workdir as workdir_lib

SWEEP_KEYS = ('base', 'overrides', 'variants', 'product', 'seeds', 'metrics')
SEED_FIELDS = ('train.seed', 'data.shuffle_seed')


class SweepError(ValueError):
    """A sweep file, or a run it describes, cannot be run."""


def _kv_cache_bytes_per_token(cfg: config_lib.ModelConfig) -> float:
    from dsjax.infer import cache  # the inference stack is only needed for this metric

    return float(cache.bytes_per_token_per_layer(cfg) * cfg.num_hidden_layers)


def _params(cfg: config_lib.ModelConfig) -> float:
    import jax
    import jax.numpy as jnp

    from dsjax.model.transformer import Transformer

    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return float(sum(x.size for x in jax.tree.leaves(shapes['params'])))


def _activated_params(cfg: config_lib.ModelConfig) -> float:
    from dsjax.model import flops

    return float(flops.activated_matmul_params(cfg, include_mtp=False))


# Metrics a run's config determines (no training needed): name -> function of the frozen model config.
DERIVED_METRICS = {
    'kv_cache_bytes_per_token': _kv_cache_bytes_per_token,  # all layers, in the compute dtype
    'params': _params,  # total parameters (MTP modules included)
    'activated_params': _activated_params,  # matmul weights per token, as DeepSeek counts them
}


class Run:
    """One run of a sweep: a variant at a seed, its overrides, resolved config and directory."""

    def __init__(self, variant: str, seed: int, overrides: dict, config, workdir: epath.Path):
        self.variant, self.seed, self.overrides, self.config, self.workdir = variant, seed, overrides, config, workdir

    @property
    def name(self) -> str:
        return f'{self.variant} (seed {self.seed})'

    def command(self, base: str, python: str = 'python') -> list[str]:
        """The dsjax.main command line of this run."""
        flags_ = [f'--config.{k}={_flag_value(v)}' for k, v in self.overrides.items()]
        return [python, '-m', 'dsjax.main', f'--config={base}', f'--workdir={self.workdir}', *flags_]

    def local_log(self) -> pathlib.Path:
        """Where the run's output is written as it runs: log.txt in its directory, or for a remote one a
        local file copied there when the run ends (object stores cannot append)."""
        if not workdir_lib.is_remote(self.workdir):
            return pathlib.Path(self.workdir) / 'log.txt'
        local = pathlib.Path(tempfile.gettempdir()) / 'dsjax_sweep' / str(self.workdir).replace('://', '/') / 'log.txt'
        local.parent.mkdir(parents=True, exist_ok=True)
        remote = self.workdir / 'log.txt'
        if remote.exists() and not local.exists():
            local.write_text(remote.read_text())
        return local

    def finished_step(self) -> int | None:
        """The newest complete checkpoint step in the run directory (None: never checkpointed)."""
        return max(checkpoint.complete_steps(checkpoint.checkpoint_dir(self.workdir)), default=None)

    @property
    def finished(self) -> bool:
        return self.finished_step() == self.config.train.steps

    def config_drift(self) -> list[str]:
        """Fields where the config this run was started with (its config.json) differs from the planned one:
        an edited sweep file, or a dsjax version that added or changed a default since."""
        path = self.workdir / 'config.json'
        if not path.is_file():
            return []
        saved = _flatten(json.loads(path.read_text()))
        planned = _flatten(json.loads(self.config.to_json_best_effort()))
        missing = '<absent>'
        return sorted(k for k in saved.keys() | planned.keys() if saved.get(k, missing) != planned.get(k, missing))


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
    return out


def _flag_value(value) -> str:
    """`value` as config_flags parses it back (bools as true/false, tuples as Python literals)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def load_sweep(path: str) -> dict:
    """`get_sweep()` of the sweep file at `path`, its keys checked."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f'--config={path!r}: no such sweep file')
    spec = importlib.util.spec_from_file_location(f'dsjax_sweep_{file.stem}', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, 'get_sweep'):
        raise SweepError(f'{path}: a sweep file must define get_sweep()')
    sweep = module.get_sweep()
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f'{path}: get_sweep() key {unknown[0]!r} is unknown; valid keys: {SWEEP_KEYS}')
    if 'base' not in sweep:
        raise SweepError(f"{path}: get_sweep() needs 'base', the experiment every run starts from")
    return sweep


def _base_config(base: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of 'path/to/experiment.py[:arg]'."""
    path, _, arg = base.partition(':')
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f'base={base!r}: {path} does not exist (paths are relative to the current directory '
                         f'{pathlib.Path.cwd()}; run from the repository root)')
    return presets.load_experiment(str(file.resolve()), file.stem, arg or None)


def _override(c: ml_collections.ConfigDict, field: str, value, where: str) -> None:
    """Sets the dotted `field` of `c`; a field the base config lacks, or a wrong type, raises SweepError."""
    *parents, leaf = field.split('.')
    node, seen = c, 'config'
    for part in parents:
        if not _is_section(node.get(part)):
            raise SweepError(f'{where}: config.{field} does not exist ({seen} has no section {part!r}; its '
                             f'sections: {sorted(k for k in node.keys() if _is_section(node[k]))})')
        node, seen = node[part], f'{seen}.{part}'
    if _is_section(node.get(leaf)):
        raise SweepError(f'{where}: config.{field} is a section; override its fields (config.{field}.<name>)')
    if leaf not in node:
        raise SweepError(f'{where}: config.{field} does not exist; the fields of {seen} are '
                         f'{sorted(k for k in node.keys() if not _is_section(node[k]))}')
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise SweepError(f'{where}: config.{field}={value!r} is invalid: {e}') from e


def _is_section(value) -> bool:
    return isinstance(value, ml_collections.ConfigDict)


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9.=-]+', '_', text).strip('_') or 'base'


def _variants(sweep: dict) -> list[tuple[str, dict]]:
    """(name, overrides) of every variant: the named variants crossed with the product."""
    named = sweep.get('variants', {'': {}})
    if not isinstance(named, dict):
        raise SweepError(f"variants={named!r} is invalid: give a dict of name -> {{'field': value}} overrides")
    product = sweep.get('product', {})
    for field, values in product.items():
        if not isinstance(values, (list, tuple)):
            raise SweepError(f'product[{field!r}]={values!r} is invalid: give a list of values')
    out = []
    for name, overrides in named.items():
        for values in itertools.product(*product.values()):
            combo = dict(zip(product, values))
            label = ', '.join(f'{f.split(".")[-1]}={v}' for f, v in combo.items())
            out.append((', '.join(x for x in (name, label) if x) or 'base', {**overrides, **combo}))
    return out


def plan(sweep: dict, workdir, num_devices: int | None = None) -> list[Run]:
    """Every run of `sweep` under `workdir`, each config built and validated; nothing runs."""
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    seeds = list(sweep.get('seeds', [0]))
    variants = _variants(sweep)
    if not seeds or not variants:
        raise SweepError(f'the sweep has zero runs ({len(variants)} variants x {len(seeds)} seeds): give at '
                         'least one seed and one variant')
    metrics = list(sweep.get('metrics', ['val_loss']))
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise SweepError(f'metrics={metrics!r} is invalid: give one or more metric names (logged in '
                         f'metrics.jsonl, or one of {sorted(DERIVED_METRICS)})')
    base = sweep['base']
    shared = dict(sweep.get('overrides', {}))
    runs, dirs = [], set()
    for name, overrides in variants:
        for seed in seeds:
            run_overrides = {**shared, **overrides, **{f: seed for f in SEED_FIELDS}}
            where = f'run {name!r} seed {seed}'
            c = _base_config(base)
            for field, value in run_overrides.items():
                _override(c, field, value, where)
            try:
                stages.validate(c, num_devices)
            except config_lib.ConfigError as e:
                raise SweepError(f'{where}: {e}') from e
            workdir_ = epath.Path(workdir) / _slug(name) / f'seed_{seed}'
            if workdir_ in dirs:
                raise SweepError(f'{where}: two runs would share the directory {workdir_}; give the variants '
                                 'distinct names')
            dirs.add(workdir_)
            runs.append(Run(name, seed, run_overrides, c, workdir_))
    return runs


def execute(runs: list[Run], base: str) -> None:
    """Runs each unfinished run to its final step, in order; a signal stops the current run (it saves)
    and the sweep (rerun to resume)."""
    received = []

    def forward(signum, frame):
        del frame
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    child = None
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, run in enumerate(runs, 1):
            progress = f'[{i}/{len(runs)}] {run.name}'
            if received:  # arrived between two runs
                raise SweepError(f'stopped by signal {signal.Signals(received[0]).name} before {progress}; rerun '
                                 'the same command to resume')
            drift = run.config_drift()
            if drift:
                print(f'{progress}: warning: {run.workdir}/config.json differs from the plan in {", ".join(drift[:6])}'
                      f'{" ..." if len(drift) > 6 else ""}; delete that directory to redo the run', flush=True)
            if run.finished:
                print(f'{progress}: finished (step {run.config.train.steps}), skipped', flush=True)
                continue
            step = run.finished_step()
            print(f'{progress}: {"resuming from step %d" % step if step else "starting"} -> {run.workdir}',
                  flush=True)
            run.workdir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            log_path = run.local_log()
            with open(log_path, 'a') as log:
                # A session of its own: a terminal's Ctrl-C reaches the sweep, which forwards it once
                # (a second signal would stop the run without saving).
                child = subprocess.Popen(run.command(base, sys.executable), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                child.wait()
            if workdir_lib.is_remote(run.workdir):
                (run.workdir / 'log.txt').write_text(log_path.read_text())
            if received:
                raise SweepError(f'{progress}: stopped by signal {signal.Signals(received[0]).name} at step '
                                 f'{run.finished_step()}; rerun the same command to resume')
            if not run.finished:
                tail = log_path.read_text().splitlines()[-15:]
                raise SweepError(f'{progress}: exited with code {child.returncode} before step '
                                 f'{run.config.train.steps}; the end of {run.workdir}/log.txt:\n' + '\n'.join(tail))
            print(f'{progress}: done in {time.perf_counter() - start:.0f} s', flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def final_metrics(run: Run, metrics: list[str]) -> dict[str, float]:
    """Each metric's last logged value (or its value computed from the config)."""
    records = logger.read_metrics(run.workdir)
    model_cfg = config_lib.freeze_model(run.config.model)
    out = {}
    for m in metrics:
        if m in DERIVED_METRICS:
            out[m] = DERIVED_METRICS[m](model_cfg)
        else:
            values = [r[m] for r in records if m in r]
            out[m] = float(values[-1]) if values else float('nan')
    return out


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return 'n/a'
    if abs(x) >= 1000:
        return f'{x:,.0f}'
    return f'{x:.3f}' if abs(x) < 10 else f'{x:.2f}'


def write_report(runs: list[Run], sweep: dict, workdir, title: str) -> epath.Path:
    """Tables (markdown, CSV) and plots of finished runs into `workdir` (local or remote); returns
    report.md's path."""
    workdir = epath.Path(workdir)
    metrics = list(sweep.get('metrics', ['val_loss']))
    values = {id(r): final_metrics(r, metrics) for r in runs}
    variants = list(dict.fromkeys(r.variant for r in runs))
    by_variant = {v: [r for r in runs if r.variant == v] for v in variants}

    _write_csv(workdir / 'runs.csv', ['variant', 'seed', *metrics, 'workdir'],
               [[r.variant, r.seed, *(values[id(r)][m] for m in metrics), r.workdir.relative_to(workdir)]
                for r in runs])
    summary = {v: {m: _spread([values[id(r)][m] for r in rs]) for m in metrics} for v, rs in by_variant.items()}
    _write_csv(workdir / 'summary.csv', ['variant', 'seeds', *(f'{m}_{s}' for m in metrics for s in ('mean', 'std'))],
               [[v, len(by_variant[v]), *(x for m in metrics for x in summary[v][m])] for v in variants])

    seeds = sorted({r.seed for r in runs})
    lines = [f'# {title}', '', f'Base `{sweep["base"]}`; {len(variants)} variants x {len(seeds)} seeds '
             f'({", ".join(map(str, seeds))}); mean ± sample standard deviation over seeds.', '']
    shared = sweep.get('overrides', {})
    if shared:
        lines += ['Every run: ' + ', '.join(f'`{k}={v}`' for k, v in shared.items()), '']
    lines += ['| variant | ' + ' | '.join(metrics) + ' |', '|---' * (len(metrics) + 1) + '|']
    for v in variants:
        cells = [f'{_fmt(mean)} ± {_fmt(std)}' if len(by_variant[v]) > 1 and std else _fmt(mean)
                 for mean, std in (summary[v][m] for m in metrics)]
        lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## Every run', '', '| variant | seed | ' + ' | '.join(metrics) + ' |',
              '|---' * (len(metrics) + 2) + '|']
    for r in runs:
        lines.append(f'| {r.variant} | {r.seed} | ' + ' | '.join(_fmt(values[id(r)][m]) for m in metrics) + ' |')
    lines += ['', '![loss curves](loss_curves.png)', '', '![metrics](metrics.png)', '']
    colors = {v: matplotlib.colormaps['tab10'](i % 10) for i, v in enumerate(variants)}
    _plot_losses(runs, colors, workdir / 'loss_curves.png', title)
    _plot_metrics(runs, values, metrics, colors, workdir / 'metrics.png', title)
    if _plot_expert_load(by_variant, workdir / 'expert_load.png', title):
        lines += ['![expert load](expert_load.png)', '']
    out = workdir / 'report.md'
    out.write_text('\n'.join(lines))
    return out


def _write_csv(path: epath.Path, header: list, rows: list[list]) -> None:
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    path.write_text(text.getvalue())


def _plot_losses(runs: list[Run], colors: dict, out: epath.Path, title: str) -> None:
    """Train loss (thin) and validation loss (markers) of every run, one colour per variant."""
    fig = Figure(figsize=(13, 4.5))
    ax_train, ax_val = fig.subplots(1, 2)
    labelled = set()
    for r in runs:
        records = logger.read_metrics(r.workdir)
        label = None if r.variant in labelled else r.variant
        labelled.add(r.variant)
        for ax, key, style in ((ax_train, 'loss', dict(lw=1.0, alpha=0.6)), (ax_val, 'val_loss', dict(marker='o'))):
            steps, ys = report_lib.series(records, key)
            ax.plot(steps, ys, color=colors[r.variant], label=label, **style)
    for ax, name in ((ax_train, 'train loss (main head)'), (ax_val, 'validation loss (main head)')):
        ax.set_title(name)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_val.set_ylim(top=min(ax_val.get_ylim()[1], ax_train.get_ylim()[1]))
    fig.suptitle(f'{title}: every seed drawn')
    fig.tight_layout()
    report_lib.save_png(fig, out)


def _plot_metrics(runs: list[Run], values: dict, metrics: list[str], colors: dict, out: epath.Path,
                  title: str) -> None:
    """One bar per run for each metric, grouped and coloured by variant."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(runs)) * len(metrics) ** 0.5 + 2, 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ys = [values[id(r)][m] for r in runs]
        ax.bar(range(len(runs)), ys, color=[colors[r.variant] for r in runs])
        ax.set_xticks(range(len(runs)), [f'{r.variant}\nseed {r.seed}' for r in runs], rotation=60, ha='right',
                      fontsize=7)
        finite = [y for y in ys if np.isfinite(y)]
        if finite and m not in DERIVED_METRICS and min(finite) > 0:  # zoom in on small differences
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 0.5 * (hi - lo) - 0.02 * hi), hi + 0.3 * (hi - lo) + 0.02 * hi)
        ax.set_title(m)
        ax.grid(alpha=0.3, axis='y')
    fig.suptitle(f'{title}: final values')
    fig.tight_layout()
    report_lib.save_png(fig, out)


def _plot_expert_load(by_variant: dict, out: epath.Path, title: str) -> bool:
    """Validation load / mean load per MoE layer and expert at the final step, the first seed of each
    MoE variant; False when no run is MoE."""
    loads = {}
    for v, rs in by_variant.items():
        saved = report_lib.expert_loads(rs[0].workdir)
        if saved:
            loads[v] = saved[-1]
    if not loads:
        return False
    fig = Figure(figsize=(4.5 * len(loads) + 1, 3.5))
    axes = fig.subplots(1, len(loads), squeeze=False)
    for ax, (v, (step, load)) in zip(axes[0], loads.items()):
        ratio = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
        im = ax.imshow(ratio, aspect='auto', cmap='RdBu_r', vmin=0, vmax=2, interpolation='nearest')
        maxvio = float(np.mean(ratio.max(axis=1) - 1))
        ax.set_title(f'{v}\nstep {step}, seed {by_variant[v][0].seed}, MaxVio {maxvio:.2f}', fontsize=9)
        ax.set_xlabel('expert')
        ax.set_ylabel('MoE layer')
        ax.set_yticks(range(load.shape[0]))
    fig.colorbar(im, ax=axes[0].tolist(), label='load / mean load (1 = balanced)')
    fig.suptitle(f'{title}: validation expert load', y=1.02)
    report_lib.save_png(fig, out, bbox_inches='tight')
    return True


def main():
    config, workdir = flags.FLAGS.config, workdir_lib.resolve(flags.FLAGS.workdir)
    sweep = load_sweep(config)
    runs = plan(sweep, workdir)
    if flags.FLAGS['print'].value:
        for run in runs:
            print(shlex.join(run.command(sweep['base'])))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    print(f'{len(runs)} runs of {config} in {workdir}', flush=True)
    execute(runs, sweep['base'])
    out = write_report(runs, sweep, workdir, pathlib.Path(config).stem)
    print(out.read_text())
    print(f'Report: {out} (plots beside it)')


if __name__ == '__main__':
    # Defined here, not at import, so notebooks and tests can import this module beside other CLIs.
    flags.DEFINE_string('config', None, 'Sweep file, e.g. experiments/sweeps/balancing.py.', required=True)
    flags.DEFINE_string('workdir', None, 'Sweep directory: one subdirectory per run, and the report.', required=True)
    flags.DEFINE_bool('print', False, 'Print one shell command per run instead of running them.')
    cli.run(main, errors=(SweepError, workdir_lib.WorkdirError))
