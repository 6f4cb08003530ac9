"""Metrics out: WORKDIR/metrics.jsonl, TensorBoard events under WORKDIR/tensorboard, and a progress bar.

metrics.jsonl holds one JSON object per `log` call: {"step": int, "<name>": float | null, ...}. It is
strict JSON: non-finite values (NaN, +-inf) are written as null, and `read_metrics` reads them back as
NaN. A resumed run appends to the same file, so the file can hold an abandoned stretch of steps;
`read_metrics` drops it (see there).
"""
import json
import math
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import tensorboardX
import tqdm

from dsjax.train import workdir as workdir_lib

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _to_float(name: str, value: Any) -> float:
    """A Python float from a Python/numpy/jax scalar; anything else is a caller bug."""
    if np.size(value) != 1:
        raise ValueError(f'MetricsLogger.log: metric {name!r} has shape {np.shape(value)}; '
                         'only scalars are logged')
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError) as e:
        raise ValueError(f'MetricsLogger.log: metric {name!r}={value!r} is not a number') from e


class _RemoteAppend:
    """Appends to a file on an object store (gs://, s3://), which cannot append: each flush rewrites the
    whole file from what it held plus what was written since (metrics files stay small)."""

    def __init__(self, path: epath.Path):
        self._path = path
        self._text = path.read_text() if path.exists() else ''

    def tell(self) -> int:
        return len(self._text)

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        self._path.write_text(self._text)

    def close(self) -> None:
        self.flush()


def _last_byte(path: epath.Path) -> bytes:
    with path.open('rb') as f:
        f.seek(-1, 2)
        return f.read(1)


class MetricsLogger:
    """Writes each step's scalar metrics to JSONL, TensorBoard and a tqdm bar (on process 0 only)."""

    def __init__(self, workdir, *, total_steps: int, enable_progress: bool = True):
        """Opens WORKDIR/metrics.jsonl for appending and a TensorBoard writer; other processes do nothing."""
        # Every host computes the same (global) metrics; one writer keeps the files free of duplicates.
        self._active = jax.process_index() == 0
        if not self._active:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / METRICS_FILE
        self._jsonl = _RemoteAppend(path) if workdir_lib.is_remote(path) else open(path, 'a', encoding='utf-8')
        torn = self._jsonl.tell() > 0 and _last_byte(path) != b'\n'
        if torn:  # a crash cut the last line short: start ours on a fresh line so it stays parseable
            self._jsonl.write('\n')
        try:  # tensorboardX writes gs:// with google-cloud-storage and s3:// with boto3 installed
            self._tb = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR), flush_secs=30)
        except (ImportError, OSError, NotImplementedError) as e:
            logging.warning('No TensorBoard events in %s: %s', workdir, e)
            self._tb = None
        self._total, self._progress = total_steps, enable_progress
        self._bar = None  # made at the first log, so a resumed run's bar (and its rate) starts at that step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Writes the scalar `metrics` of `step`; numpy/jax scalars are converted, non-finite go out as null."""
        if not self._active:
            return
        if 'step' in metrics:
            raise ValueError("MetricsLogger.log: 'step' is reserved for the step argument; rename the metric")
        step = int(step)
        values = {name: _to_float(name, value) for name, value in metrics.items()}
        record = {'step': step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        # allow_nan=False: guarantees the file stays strict JSON that any reader can parse.
        self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
        self._jsonl.flush()  # a crash must not lose the metrics that explain it
        for name, value in values.items() if self._tb else ():
            self._tb.add_scalar(name, value, step)
        if self._bar is None:
            self._bar = tqdm.tqdm(total=self._total, initial=step, disable=not self._progress, unit='step',
                                  dynamic_ncols=True)
        if 'loss' in values:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Flushes and closes the files and the progress bar."""
        if not self._active:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb:
            self._tb.close()
        self._jsonl.close()


def read_metrics(workdir) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl as seen by the final timeline of the run, sorted by step.

    When a run crashes and resumes from an older checkpoint, it logs some steps again: a record whose
    step is lower than a step already read marks the resume, and every earlier record at that step or
    later is dropped, so a step logged twice keeps only its last record. Records of one step written by
    one timeline (say train metrics, then eval metrics) merge into one dict, later values winning.
    Nulls (non-finite values) come back as float('nan'). A line cut short by a crash is skipped with a
    warning.
    """
    by_step: dict[int, dict] = {}
    last = None
    path = epath.Path(workdir) / METRICS_FILE
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logging.warning('read_metrics: skipping unparseable line %s:%d: %.80r', path, number, line)
                continue
            step = record['step']
            if last is not None and step < last:
                by_step = {s: r for s, r in by_step.items() if s < step}
            last = step
            values = {k: (float('nan') if v is None else v) for k, v in record.items()}
            by_step.setdefault(step, {}).update(values)
    return [by_step[s] for s in sorted(by_step)]
