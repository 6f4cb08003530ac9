"""What every dsjax command shares: a quiet start, a persistent compilation cache, positional arguments
refused and user errors reported in one line.

    if __name__ == '__main__':
        cli.run(main)

Each command's --help lists its own flags (a command whose flags live in a library module adopts them
with `flags.adopt_module_key_flags`); --helpfull adds every library's (absl, jax, grain, Orbax).
"""
import glob
import importlib.util
import os
import pathlib
import sys
from typing import Callable

from absl import app, logging
import jax

from dsjax.data import tokenizer as tokenizer_lib

# What a command reports in one line: a bad flag, file, directory, config field or download. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
_GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips are Google PCI devices


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter of Orbax, grain and jax (backend probing included), so a run's own lines stay
    readable; their warnings and errors pass."""

    def filter(self, record):
        noisy = any(part in record.pathname for part in ('/orbax/', '/grain/', '/jax/_src/', '/jax/experimental/'))
        return record.levelno >= logging.logging.WARNING or not noisy


def compilation_cache_dir() -> str:
    """Where compiled programs persist between runs: $JAX_COMPILATION_CACHE_DIR, else the dsjax cache's jax/."""
    return os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(tokenizer_lib.default_cache_dir(), 'jax')


def _tpu_attached() -> bool:
    return any(pathlib.Path(p).read_text().strip() == _GOOGLE_PCI_VENDOR
               for p in glob.glob('/sys/bus/pci/devices/*/vendor'))


def _skip_absent_tpu() -> None:
    """jax[tpu] installs libtpu on any machine; without a TPU (or GPU) attached, its plugin only prints
    start-up errors ("Unable to initialize backend 'tpu'", libtpu's own lines), so the CPU is named."""
    if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None or _tpu_attached():
        return
    if glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/dev/kfd'):  # a GPU: leave jax's own choice
        return
    jax.config.update('jax_platforms', 'cpu')


def setup() -> None:
    """Quiet library logs, no TPU probing where there is no TPU, and the persistent compilation cache
    (a rerun, a resumed run or a sweep's next run loads its programs instead of compiling them)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _skip_absent_tpu()
    jax.config.update('jax_compilation_cache_dir', compilation_cache_dir())


def run(main: Callable[[], None], errors: tuple = USER_ERRORS) -> None:
    """app.run for a dsjax command: `main()` takes no arguments (a positional one is an error), and an
    exception in `errors` ends the command with one line, `error: <message>`, and exit status 1."""

    def wrapped(argv):
        if len(argv) > 1:
            sys.exit(f'error: unexpected argument {argv[1]!r}: every option is a flag, --name=value '
                     '(a config field: --config.train.steps=10); see --help')
        setup()
        try:
            main()
        except errors as e:
            sys.exit(f'error: {e}')

    app.run(wrapped)
