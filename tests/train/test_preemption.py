"""Multi-host preemption: 2 processes under jax.distributed, SIGTERM to one of them only. Both stop after
the same step, save that one checkpoint together (each process its data-iterator position) and exit with
status 75 (preempted, saved; rerunning resumes) instead of hanging in a collective or exiting 0."""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from dsjax.train import checkpoint, logger, preemption

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 10_000  # far more than the test lets run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    workdir, port = tmp_path / 'run', _free_port()
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
    overrides = dict(steps=STEPS, checkpoint_every=STEPS, eval_every=STEPS, log_every=1, peak_flops=1e12)
    procs, logs = [], []
    try:
        for p in range(2):
            logs.append(open(tmp_path / f'process_{p}.log', 'wb'))
            procs.append(subprocess.Popen(
                [sys.executable, '-m', 'dsjax.main', '--config=experiments/llm_small.py:smoke', f'--workdir={workdir}',
                 '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={p}',
                 *[f'--config.train.{k}={v}' for k, v in overrides.items()]],
                cwd=REPO, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.time() + 500
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if (workdir / logger.METRICS_FILE).exists() and len(logger.read_metrics(workdir)) >= 4:
                break  # both processes are stepping (process 0 logs only after a collective step)
            time.sleep(1)
        procs[1].send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:  # a process left waiting in a collective would wait forever
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    output = [(tmp_path / f'process_{p}.log').read_text() for p in range(2)]
    assert codes == [preemption.EXIT_STATUS['SIGTERM']] * 2, '\n'.join(o[-3000:] for o in output)
    steps = checkpoint.complete_steps(workdir / 'checkpoints')
    assert len(steps) == 1 and 0 < steps[0] < STEPS, steps
    assert f'SIGTERM: saved step {steps[0]}, exiting.' in output[1]
    assert f'{preemption.OTHER_PROCESS}: saved step {steps[0]}, exiting.' in output[0]
    data_files = [p.name for p in (workdir / 'checkpoints' / str(steps[0]) / 'data').iterdir()]
    assert len([n for n in data_files if 'of-2' in n]) == 2, data_files
