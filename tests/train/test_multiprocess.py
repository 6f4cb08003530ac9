"""jax.distributed on this machine: 2 processes x 4 CPU devices train exactly as 1 process x 8 devices."""
import os
import pathlib
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax import presets
from dsjax.data import pipeline
from dsjax.train import logger, loop

REPO = pathlib.Path(__file__).resolve().parents[2]
PROCESSES, LOCAL_DEVICES = 2, 4
OVERRIDES = dict(steps=4, checkpoint_every=2, eval_every=2, peak_flops=1e12)


class _AllHosts(grain.DatasetIterator):
    """One process reading what every host of a multi-process run reads, as the global batch: host p's
    rows follow host p - 1's, as `make_array_from_process_local_data` lays them out over the mesh."""

    def __init__(self, hosts):
        super().__init__(hosts)

    def __next__(self):
        batches = [next(h) for h in self._parents]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {'hosts': [h.get_state() for h in self._parents]}

    def set_state(self, state):
        for h, s in zip(self._parents, state['hosts']):
            h.set_state(s)


def _saved_params(workdir, step):
    """The params saved at `step`, onto this process's first device whatever topology wrote them."""
    path = (pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state').resolve()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    metadata = ocp.StandardCheckpointer().metadata(path).item_metadata
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), metadata.tree)
    return ocp.StandardCheckpointer().restore(path, target)['params']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
    """The reference: this process, 8 devices, fed the rows both hosts of the 2-process run read."""
    workdir = tmp_path_factory.mktemp('one_process')
    make = pipeline.make_train_iterator

    def all_hosts(data_cfg, tokenizer, process_index, process_count, **kwargs):
        assert (process_index, process_count) == (0, 1)
        return _AllHosts([make(data_cfg, tokenizer, process_index=p, process_count=PROCESSES, **kwargs)
                          for p in range(PROCESSES)])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, 'make_train_iterator', all_hosts)
        c = presets.load_experiment(str(REPO / 'experiments' / 'any.py'), 'llm_small', 'smoke')
        c.train.update(**OVERRIDES)
        loop.run(c, workdir)
    return workdir


def test_two_processes_match_one(one_process_run, tmp_path):
    workdir = tmp_path / 'two_processes'
    port = _free_port()
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={LOCAL_DEVICES}'}
    flags = [f'--config.train.{k}={v}' for k, v in OVERRIDES.items()]
    procs, logs = [], []
    try:
        for p in range(PROCESSES):
            logs.append(open(tmp_path / f'process_{p}.log', 'wb'))
            procs.append(subprocess.Popen(
                [sys.executable, '-m', 'dsjax.main', '--config=experiments/llm_small.py:smoke', f'--workdir={workdir}',
                 '--distributed', f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={PROCESSES}',
                 f'--process_id={p}', *flags],
                cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        codes = [proc.wait(timeout=400) for proc in procs]
    finally:
        for proc in procs:  # a process stuck in a collective whose peer died would wait forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    output = '\n'.join((tmp_path / f'process_{p}.log').read_text()[-3000:] for p in range(PROCESSES))
    assert codes == [0] * PROCESSES, output
    assert f'Process 1 of 2: {LOCAL_DEVICES} local devices, {PROCESSES * LOCAL_DEVICES} in all' in output

    ref, got = logger.read_metrics(one_process_run), logger.read_metrics(workdir)
    for key in ('loss', 'grad_norm', 'val_loss'):
        want = {r['step']: r[key] for r in ref if key in r}
        have = {r['step']: r[key] for r in got if key in r}
        assert sorted(have) == sorted(want), key
        np.testing.assert_allclose([have[s] for s in sorted(have)], [want[s] for s in sorted(want)], rtol=2e-6,
                                   err_msg=key)
    # Only process 0 writes the run's files: one record per step and kind, one config.
    assert len([r for r in open(workdir / 'metrics.jsonl') if '"loss"' in r]) == OVERRIDES['steps']
    assert (workdir / 'config.json').exists()
    # Every process took part in the checkpoint: its own data-iterator position is saved beside the arrays.
    data_files = sorted(p.name for p in (workdir / 'checkpoints' / '4' / 'data').iterdir())
    assert len([n for n in data_files if 'of-2' in n]) == PROCESSES, data_files
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 _saved_params(workdir, 4), _saved_params(one_process_run, 4))
