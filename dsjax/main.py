"""Entry point: python -m dsjax.main --config=experiments/<name>.py[:arg] [--workdir=DIR] [--config.x=y].

Runs the stage the config names (`config.stage`, see dsjax/stages.py), or a whole chain of stages.

On several hosts add --distributed (one process per host; see the README's "Long runs" section).
Exit status: 0 when finished, 75 when SIGTERM stopped it after saving (preempted: rerun the same command to
resume), 130 for Ctrl-C, 1 for an error.
"""
import pathlib
import sys

from absl import flags, logging
import jax
from ml_collections import config_flags

from dsjax import cli
from dsjax import config as config_lib
from dsjax import stages
from dsjax.data import corpus
from dsjax.interop import hub
from dsjax.posttrain import rewards
from dsjax.train import loop, preemption
from dsjax.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/v3_small.py[:smoke].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<experiment>[_<arg>]).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first. TPU pod slices, SLURM and Open MPI '
    'are detected; elsewhere give the three flags below.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --distributed: the number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --distributed: this process, in [0, num_processes).')


def default_workdir(config_arg: str) -> str:
    """runs/<experiment file stem>[_<arg>] under the current directory."""
    path, _, arg = config_arg.partition(':')
    name = pathlib.Path(path).stem + (f'_{arg}' if arg else '')
    return str(pathlib.Path('runs') / name)


def main():
    if _DISTRIBUTED.value:
        # Before anything touches a device: every process must join before the backends start.
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
        logging.info('Process %d of %d: %d local devices, %d in all', jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count())
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
    logging.info('Workdir: %s', workdir)
    reason = stages.stopped_by(stages.run(_CONFIG.value, workdir))
    if reason:  # saved: tell the scheduler the run was preempted, not finished (rerunning resumes)
        sys.exit(preemption.exit_status(reason))


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    cli.run(main, errors=(config_lib.ConfigError, corpus.DataError, loop.NonFiniteError, rewards.RewardError,
                          hub.HubError, workdir_lib.WorkdirError))
