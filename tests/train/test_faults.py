"""Faults during training: signals, kill -9 at random moments (also mid-checkpoint), corrupt checkpoints,
NaN/Inf steps. After any of them the run resumes to the same parameters, bit for bit."""
import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax import presets
from dsjax.data import pipeline
from dsjax.train import checkpoint, logger, loop
from dsjax.train.state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(steps, experiment='llm_small', **train):
    c = presets.load_experiment(str(REPO / 'experiments' / 'any.py'), experiment, 'smoke')
    c.train.update(steps=steps, async_checkpoint=False, eval_every=100, peak_flops=1e12, **train)
    c.optim.decay_steps = 8
    c.mesh.data = 1
    return c


def _state(workdir, step):
    """Every array of the saved TrainState at `step`, as numpy."""
    return ocp.StandardCheckpointer().restore(pathlib.Path(workdir).resolve() / 'checkpoints' / str(step) / 'state')


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _losses(workdir):
    return {r['step']: r['loss'] for r in logger.read_metrics(workdir) if 'loss' in r}


class _Hooked(grain.DatasetIterator):
    """The loop's training iterator, with `hook(n, batch) -> batch` called on the n-th batch drawn."""

    def __init__(self, parent, hook):
        super().__init__(parent)
        self._hook, self._drawn = hook, 0

    def __next__(self):
        self._drawn += 1
        return self._hook(self._drawn, next(self._parent))

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _hook_batches(monkeypatch, hook):
    make = pipeline.make_train_iterator
    monkeypatch.setattr(pipeline, 'make_train_iterator', lambda *a, **k: _Hooked(make(*a, **k), hook))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """Five uninterrupted steps on one device."""
    workdir = tmp_path_factory.mktemp('straight')
    loop.run(_config(5), workdir, devices=jax.devices()[:1])
    return workdir


def test_signals_save_then_resume_is_bit_identical(straight_run, tmp_path, monkeypatch):
    """SIGTERM during step 2, resume, SIGINT during step 4, resume: the same run as an uninterrupted one."""
    c = _config(5, checkpoint_every=100, keep_checkpoints=5)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum, expected in ((signal.SIGTERM, [2]), (signal.SIGINT, [2, 4])):
        def send_at_second(n, batch, signum=signum):
            if n == 2:  # delivered while a step is being dispatched: the loop finishes it, saves, exits
                os.kill(os.getpid(), signum)
            return batch

        _hook_batches(monkeypatch, send_at_second)
        loop.run(c, tmp_path, devices=jax.devices()[:1])
        monkeypatch.undo()
        assert {s: signal.getsignal(s) for s in previous} == previous  # the loop's handlers are gone again
        assert _complete_steps(tmp_path) == expected
    loop.run(c, tmp_path, devices=jax.devices()[:1])
    _assert_bitwise_equal(_state(tmp_path, 5), _state(straight_run, 5))
    assert _losses(tmp_path) == _losses(straight_run)


def test_nonfinite_skip_drops_the_update_and_counts_it(tmp_path, monkeypatch):
    """V3 at smoke size: the skipped step leaves params, optimizer state and the routing bias alone."""
    def poison_third(n, batch):
        if n == 3:  # NaN weights make the loss and every gradient NaN
            batch = {**batch, 'weights': np.full_like(batch['weights'], np.nan)}
        return batch

    _hook_batches(monkeypatch, poison_third)
    c = _config(5, 'v3_small', checkpoint_every=1, keep_checkpoints=5, nonfinite_policy='skip')
    assert c.train.bias_update_rate > 0 and c.model.n_routed_experts > 0
    last = loop.run(c, tmp_path, devices=jax.devices()[:1])
    records = {r['step']: r for r in logger.read_metrics(tmp_path) if 'loss' in r}
    assert np.isnan(records[3]['loss']) and np.isnan(records[3]['grad_norm'])
    assert [records[s]['nonfinite_skips'] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert last['nonfinite_skips'] == 1 and np.isfinite(last['loss'])
    s2, s3, s4 = (_state(tmp_path, s) for s in (2, 3, 4))
    # Step 3 changed nothing but the step counter and the skip count; step 4 trained again.
    untouched = ('params', 'opt_state', 'buffers')
    _assert_bitwise_equal([s3[k] for k in untouched], [s2[k] for k in untouched])
    assert int(s3['step']) == 3 and int(s3['nonfinite_skips']) == 1
    for key in untouched:  # step 4 trained again: params, moments and routing bias all move
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s4[key]), jax.tree.leaves(s3[key]))), key
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(s4['params']))


def _small_state(seed):
    params = {'w': jax.random.normal(jax.random.key(seed), (8, 4)), 'b': jnp.arange(4.0) + seed}
    return TrainState(step=jnp.array(seed, jnp.int32), params=params, opt_state={'count': jnp.array(seed)},
                      rng=jax.random.PRNGKey(seed), buffers={'bias': jnp.zeros(4)}, nonfinite_skips=jnp.array(0))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _corrupt(step_dir: pathlib.Path):
    """Cuts every array data file of a saved state in half, as a failing disk or copy would."""
    data = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and not p.name.startswith('_')]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


# Orbax's failed read of the corrupt step leaves a callback for its already closed event loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_checkpoint_is_skipped_with_a_message(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    for s in (1, 2, 3):
        ckpt.save(s, _small_state(s))
    ckpt.close()
    _corrupt(tmp_path / '3')
    (tmp_path / '4.orbax-checkpoint-tmp-123').mkdir()  # a save cut short by a kill
    caplog.set_level(logging.WARNING)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    step, state = ckpt.restore_latest(_abstract(_small_state(0)))
    assert step == 2
    _assert_bitwise_equal(state.params, _small_state(2).params)
    assert 'skipping incomplete checkpoint' in caplog.text and 'does not read back' in caplog.text
    assert (tmp_path / 'corrupt' / '3').is_dir() and ckpt.latest_step() == 2
    assert ckpt.save(3, _small_state(3))  # the step it held can be saved again
    assert ckpt.restore_latest(_abstract(_small_state(0)))[0] == 3
    ckpt.close()


def test_unreadable_everywhere_raises_and_moves_nothing(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    ckpt.save(1, _small_state(1))
    abstract = _abstract(_small_state(0))
    w = abstract.params['w']
    wrong = abstract.replace(params={**abstract.params,
                                     'w': jax.ShapeDtypeStruct((3, 3), w.dtype, sharding=w.sharding)})
    with pytest.raises(Exception):
        ckpt.restore_latest(wrong)  # a model-config change: every checkpoint fails alike
    assert ckpt.latest_step() == 1 and not (tmp_path / 'corrupt').exists()
    ckpt.close()


# ---- kill -9 at random moments, in subprocesses ----

FAULT_STEPS = 30
KILLS = 6


def _main_cmd(workdir):
    return [sys.executable, '-m', 'dsjax.main', '--config=experiments/llm_small.py:smoke', f'--workdir={workdir}',
            f'--config.train.steps={FAULT_STEPS}', '--config.train.checkpoint_every=1',
            '--config.train.keep_checkpoints=2', '--config.train.eval_every=1000', '--config.train.peak_flops=1e12',
            '--config.train.async_checkpoint=True', f'--config.optim.decay_steps={FAULT_STEPS}']


def _env(cache):
    # A persistent compilation cache makes each restart cost seconds, not a recompile; the executables it
    # holds are the ones a fresh compile would produce, so results are unchanged.
    return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def _complete_steps(workdir):
    return checkpoint._scan(pathlib.Path(workdir) / 'checkpoints')[0]


def _in_flight(workdir):
    """Names of the step directories of saves in progress (Orbax's temporary names)."""
    directory = pathlib.Path(workdir) / 'checkpoints'
    return {p.name for p in directory.iterdir() if 'orbax-checkpoint-tmp' in p.name} if directory.exists() else set()


def _start(workdir, cache, log):
    return subprocess.Popen(_main_cmd(workdir), cwd=REPO, env=_env(cache), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, timeout=300):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bit_identical(tmp_path):
    """Kills training with SIGKILL at seeded random steps and during checkpoint writes, restarting until
    done; the final state equals an uninterrupted run's bit for bit."""
    rng = random.Random(0)
    cache = tmp_path / 'jax_cache'
    straight = tmp_path / 'straight'
    with open(tmp_path / 'straight.log', 'wb') as log:
        assert _finish(_start(straight, cache, log)) == 0, (tmp_path / 'straight.log').read_text()[-3000:]

    faulty = tmp_path / 'faulty'
    trials, starts = [], 0
    while True:
        starts += 1
        assert starts <= 3 * KILLS, f'no progress: {trials}'
        log_path = tmp_path / f'faulty_{starts}.log'
        with open(log_path, 'wb') as log:
            before = (_complete_steps(faulty) or [0])[-1]
            # What an earlier kill left behind only counts as a new write once the restart has removed it.
            leftovers = _in_flight(faulty)
            proc = _start(faulty, cache, log)
            kills_done = sum(t['signal'] == 'SIGKILL' for t in trials)
            if kills_done >= KILLS:
                assert _finish(proc) == 0, log_path.read_text()[-3000:]
                break
            # Every other kill waits for the write of a random step's checkpoint to be in flight; the rest
            # land at a random moment after a random step.
            mid_write = kills_done % 2 == 1
            target = rng.randint(before + 1, min(before + 4, FAULT_STEPS - 1))
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                writing = _in_flight(faulty)
                leftovers &= writing
                if mid_write:
                    fire = any(int(n.split('.')[0]) >= target for n in writing - leftovers)
                else:
                    fire = (_complete_steps(faulty) or [0])[-1] >= target
                if fire:
                    if not mid_write:
                        time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next step or save
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            rc = _finish(proc)
        if rc == 0:  # the run finished before the kill landed: the assertions below report it
            trials.append(dict(signal=None, note='finished before the kill'))
            break
        assert rc == -signal.SIGKILL, log_path.read_text()[-3000:]
        complete = _complete_steps(faulty)
        trials.append(dict(signal='SIGKILL', start=starts, resumed_from=before, latest_complete=complete[-1],
                           writes_in_flight=sorted(_in_flight(faulty) - leftovers), aimed_mid_write=mid_write))
    report = json.dumps(trials, indent=1)
    print(report)
    (tmp_path / 'trials.json').write_text(report)
    kills = [t for t in trials if t['signal'] == 'SIGKILL']
    assert len(kills) >= KILLS, report
    assert sum(bool(t['writes_in_flight']) for t in kills) >= 1, report
    # Each restart removed the half-written steps and resumed from the newest complete one.
    logs = '\n'.join((tmp_path / f'faulty_{i}.log').read_text() for i in range(2, starts + 1))
    assert 'removing unfinished checkpoint' in logs and not _in_flight(faulty)
    for t in kills:
        assert f'Resuming from {faulty.resolve() / "checkpoints"} step {t["latest_complete"]}' in (
            tmp_path / f'faulty_{t["start"] + 1}.log').read_text()
    _assert_bitwise_equal(_state(faulty, FAULT_STEPS), _state(straight, FAULT_STEPS))
    assert _losses(faulty) == _losses(straight)
