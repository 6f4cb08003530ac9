"""Tests for dsjax/train/logger.py: JSONL content, TensorBoard files, resume dedup, non-finite values."""
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.train import logger


def _lines(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_jsonl_and_tensorboard(tmp_path, capsys):
    log = logger.MetricsLogger(tmp_path, total_steps=10, enable_progress=True)
    log.log(1, {'loss': jnp.float32(2.5), 'lr': np.float64(1e-3), 'tokens': 4096})
    log.log(2, {'loss': jnp.array(2.25)})
    log.close()
    assert _lines(tmp_path) == [{'step': 1, 'loss': 2.5, 'lr': 1e-3, 'tokens': 4096.0},
                                {'step': 2, 'loss': 2.25}]
    events = list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
    assert events and events[0].stat().st_size > 0
    assert 'loss=2.2500' in capsys.readouterr().err  # the progress bar shows the latest loss


def test_non_finite_written_as_null(tmp_path):
    log = logger.MetricsLogger(tmp_path, total_steps=3, enable_progress=False)
    log.log(1, {'loss': float('nan'), 'grad_norm': jnp.inf, 'ok': 1.0})
    log.close()
    text = (tmp_path / 'metrics.jsonl').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text) == {'step': 1, 'loss': None, 'grad_norm': None, 'ok': 1.0}
    [record] = logger.read_metrics(tmp_path)
    assert math.isnan(record['loss']) and math.isnan(record['grad_norm']) and record['ok'] == 1.0


def test_read_metrics_keeps_last_timeline(tmp_path):
    log = logger.MetricsLogger(tmp_path, total_steps=10, enable_progress=False)
    for step in (1, 2, 3, 4):
        log.log(step, {'loss': 10.0 - step})
    log.log(4, {'eval_loss': 9.0})  # same timeline, same step: merged
    log.close()
    # Crash; the run resumes from a checkpoint at step 2 and appends.
    log = logger.MetricsLogger(tmp_path, total_steps=10, enable_progress=False)
    for step in (3, 4, 5):
        log.log(step, {'loss': 1.0 * step})
    log.close()
    assert len(_lines(tmp_path)) == 8
    assert logger.read_metrics(tmp_path) == [
        {'step': 1, 'loss': 9.0}, {'step': 2, 'loss': 8.0},
        {'step': 3, 'loss': 3.0}, {'step': 4, 'loss': 4.0}, {'step': 5, 'loss': 5.0}]


def test_torn_last_line_is_survived(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = logger.MetricsLogger(tmp_path, total_steps=3, enable_progress=False)
    log.log(2, {'loss': 1.5})
    log.close()
    assert logger.read_metrics(tmp_path) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]


def test_rejects_bad_metrics(tmp_path):
    log = logger.MetricsLogger(tmp_path, total_steps=3, enable_progress=False)
    with pytest.raises(ValueError, match="metric 'hist' has shape"):
        log.log(1, {'hist': np.zeros(3)})
    with pytest.raises(ValueError, match="metric 'name'='abc' is not a number"):
        log.log(1, {'name': 'abc'})
    with pytest.raises(ValueError, match="'step' is reserved"):
        log.log(1, {'step': 1})
    log.close()
