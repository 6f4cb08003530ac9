"""Entry point: python -m dsjax.main --config=experiments/<name>.py[:arg] [--workdir=DIR] [--config.x=y]."""
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dsjax import config as config_lib
from dsjax.data import corpus
from dsjax.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file, e.g. experiments/v3_small.py[:smoke].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default: runs/<experiment>[_<arg>]).')


def default_workdir(config_arg: str) -> str:
    """runs/<experiment file stem>[_<arg>] under the current directory."""
    path, _, arg = config_arg.partition(':')
    name = pathlib.Path(path).stem + (f'_{arg}' if arg else '')
    return str(pathlib.Path('runs') / name)


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter of Orbax, grain and XLA so the run's own progress stays readable."""

    def filter(self, record):
        noisy = any(part in record.pathname for part in ('/orbax/', '/grain/', '/jax/_src/'))
        return record.levelno >= logging.logging.WARNING or not noisy


def main(argv):
    del argv
    logging.get_absl_logger().addFilter(_QuietLibraries())
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
    logging.info('Workdir: %s', workdir)
    try:
        loop.run(_CONFIG.value, workdir)
    except (config_lib.ConfigError, corpus.DataError, loop.NonFiniteError) as e:
        logging.error('%s', e)
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    app.run(main)
