"""Checkpoints with Orbax: the TrainState, the grain data-iterator state and the resolved config, per step.

Layout of one run's checkpoint directory (Orbax's CheckpointManager with a Composite of three items):

    DIR/<step>/state/    the TrainState pytree (StandardSave; each array written by the hosts that hold it)
    DIR/<step>/data/     grain iterator state, one JSON file per process (grain's own Orbax handler)
    DIR/<step>/config/   the resolved config as JSON
    DIR/<step>/commit_success.txt   written last: a step without it is incomplete and is never restored

Restoring takes abstract arrays that carry the *current* shardings, so a checkpoint written on one mesh
restores onto any other mesh (Orbax reads each shard's slice directly into its target device).
"""
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import grain
import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import workdir as workdir_lib

# Orbax 0.12 writes this file as the last act of finalizing a step, in both of its atomicity modes
# (rename of a tmp dir on local disks, commit file on object stores). A step directory that lacks it
# was cut short (a crash mid-save, an interrupted copy) and must not be restored.
_COMMIT_FILE = 'commit_success.txt'
_STATE, _DATA, _CONFIG = 'state', 'data', 'config'
CHECKPOINTS = 'checkpoints'  # a run's checkpoint directory, inside its workdir
_TMP_MARK = '.orbax-checkpoint-tmp'  # in the name of a step directory whose save has not finished


def _scan(directory: epath.Path) -> tuple[list[int], list[epath.Path]]:
    """The complete steps in `directory` (sorted) and the step-like directories that are not complete."""
    if not directory.exists():
        return [], []
    complete, incomplete = [], []
    for path in directory.iterdir():
        # Orbax names a save in progress '<step>.orbax-checkpoint-tmp-<time>'; count it as a step dir.
        if not path.name.split('.')[0].isdigit() or not path.is_dir():
            continue
        if path.name.isdigit() and (path / _COMMIT_FILE).exists():
            complete.append(int(path.name))
        else:
            incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def checkpoint_dir(path, what: str = 'path') -> epath.Path:
    """The checkpoint directory of `path` (local or remote, train/workdir.py): a run's workdir's checkpoints/
    (also before its first save), or `path` itself when it holds checkpoint steps (a checkpoints/
    directory, or hf_to_orbax's output); errors name the argument `what`."""
    path = workdir_lib.resolve(path, what)
    holds_steps = any(_scan(path))
    return path if holds_steps and not (path / CHECKPOINTS).exists() else path / CHECKPOINTS


def _check_shardings(abstract, what: str) -> None:
    """Every leaf must carry the sharding it should be restored into."""
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        if getattr(leaf, 'sharding', None) is None:
            name = jax.tree_util.keystr(keypath)
            raise ValueError(
                f'{what}: leaf {name} ({leaf!r}) has no sharding; pass jax.ShapeDtypeStruct(shape, dtype, '
                'sharding=...) leaves so each array is restored directly onto the current mesh')


class Checkpointer:
    """Saves and restores one run's checkpoints; the only writer of its directory."""

    def __init__(self, directory, *, keep: int, async_save: bool = True, remove_unfinished: bool = False):
        """Opens (creating if needed) `directory`, keeping the newest `keep` complete checkpoints.

        Unfinished or incomplete step directories are logged and ignored, never deleted: a reader (an
        evaluation job) must not delete a save the trainer has in flight. The training run, the only
        writer, sets `remove_unfinished`: on a restart, saves that a kill cut short are removed (they
        can be as large as a checkpoint, and a preemptible run is killed many times).
        """
        if keep < 1:
            raise ValueError(f'Checkpointer keep={keep!r} (train.keep_checkpoints): must be >= 1')
        self.directory = epath.Path(directory)
        self._warned: set[str] = set()
        self._saved: set[int] = set()
        if remove_unfinished:
            for path in _scan(self.directory)[1]:
                if _TMP_MARK in path.name:
                    self._warned.add(path.name)
                    logging.warning('Checkpointer: removing unfinished checkpoint %s (a save that was cut short)',
                                    path)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=remove_unfinished)
        self._mgr = ocp.CheckpointManager(self.directory, options=options)
        self.latest_step()  # logs any incomplete step directories once, at startup

    def _complete_steps(self) -> list[int]:
        """Complete steps on disk, logging each incomplete step directory the first time it is seen."""
        complete, incomplete = _scan(self.directory)
        for path in incomplete:
            if path.name not in self._warned and int(path.name.split('.')[0]) not in self._saved:
                self._warned.add(path.name)
                logging.warning('Checkpointer: skipping incomplete checkpoint %s (no %s); delete it when '
                                'no save is in flight', path, _COMMIT_FILE)
        return complete

    def latest_step(self) -> int | None:
        """The newest complete checkpoint step, or None if there is none."""
        steps = self._complete_steps()
        return steps[-1] if steps else None

    def _resolve(self, step: int | None) -> int:
        steps = self._complete_steps()
        if not steps:
            raise FileNotFoundError(f'Checkpointer: no complete checkpoint in {self.directory}')
        if step is None:
            return steps[-1]
        if step not in steps:
            raise ValueError(f'Checkpointer: step={step!r} is not a complete checkpoint in {self.directory}; '
                             f'complete steps: {steps}')
        return step

    def save(self, step: int, state, *, data_iterator=None, config: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state and config) as `step`; True if a save started.

        With async saves this returns once the arrays are copied off the devices (the caller may donate
        or overwrite `state` right away) and the iterator state is captured; the writes finish in the
        background. Call `wait()` before reading the checkpoint back.

        Args:
          step: the training step this state is at.
          state: the TrainState (a pytree of jax.Arrays, possibly sharded over a mesh).
          data_iterator: a grain DatasetIterator (or DataLoaderIterator) whose position to save.
          config: the resolved config as a JSON-able dict.
          force: passed to Orbax: save even if its save-interval policy would skip this step.

        Returns:
          Whether a save was started (Orbax skips a step that is not newer than the latest one).
        """
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items[_CONFIG] = ocp.args.JsonSave(config)
        saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._saved.add(step)
            return True
        # Orbax refuses any step not newer than its latest, and it counts a plain '<step>' directory as
        # a checkpoint even without the commit file; say so rather than silently stop checkpointing.
        _, incomplete = _scan(self.directory)
        blocking = [p for p in incomplete if p.name.isdigit() and int(p.name) >= step
                    and int(p.name) not in self._saved]
        if blocking:
            raise ValueError(f'Checkpointer.save(step={step}): incomplete checkpoint directories '
                             f'{[str(p) for p in blocking]} block newer saves; move or delete them')
        return False

    def restore(self, abstract_state, *, step: int | None = None, data_iterator=None):
        """Restores the TrainState at `step` (default: latest complete) into `abstract_state`'s shardings.

        Args:
          abstract_state: TrainState pytree of jax.ShapeDtypeStruct, each with `.sharding` set; the
            restored arrays land directly in those shardings, whatever mesh the checkpoint was saved on.
          step: the step to restore; None for the newest complete one.
          data_iterator: if given, its position is set in place to the saved one.

        Returns:
          The restored TrainState.
        """
        step = self._resolve(step)
        _check_shardings(abstract_state, 'Checkpointer.restore(abstract_state)')
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            if not (self.directory / str(step) / _DATA).exists():
                raise ValueError(f'Checkpointer.restore: {self.directory / str(step)} holds no data-iterator '
                                 'state (it was saved without data_iterator); restore without one')
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._mgr.restore(step, args=ocp.args.Composite(**items))[_STATE]

    def restore_latest(self, abstract_state, *, data_iterator=None):
        """(step, state) of the newest complete checkpoint that reads back, or None if there is none.

        A complete checkpoint that fails to read (truncated or deleted files: disk or copy faults) is
        logged and the next older one is tried. When an older one reads, the unreadable newer ones are
        moved to DIR/corrupt/, so later saves of those steps are not refused; when none reads, nothing is
        moved and the newest one's error is raised (a wrong model config fails every checkpoint alike).
        On several processes the first error is raised: all of them must restore the same step.
        """
        steps = self._complete_steps()
        if not steps:
            return None
        failed = []
        for step in reversed(steps):
            try:
                state = self.restore(abstract_state, step=step, data_iterator=data_iterator)
            except Exception as e:  # noqa: BLE001  (any read failure; re-raised below when nothing reads)
                if jax.process_count() > 1:
                    raise
                logging.warning('Checkpointer: checkpoint %s does not read back (%s: %s); trying an older one',
                                self.directory / str(step), type(e).__name__, str(e)[:500])
                failed.append((step, e))
                continue
            for bad, _ in failed:
                self._move_aside(bad)
            return step, state
        raise failed[0][1]

    def _move_aside(self, step: int) -> None:
        """Moves an unreadable step directory to DIR/corrupt/<step>[.<n>], out of Orbax's view."""
        target_dir = self.directory / 'corrupt'
        target_dir.mkdir(parents=True, exist_ok=True)
        target, n = target_dir / str(step), 0
        while target.exists():
            n += 1
            target = target_dir / f'{step}.{n}'
        (self.directory / str(step)).rename(target)
        logging.warning('Checkpointer: moved unreadable checkpoint step %d to %s', step, target)
        self._mgr.reload()

    def restore_config(self, step: int | None = None) -> dict:
        """The config dict saved with `step` (default: latest complete)."""
        step = self._resolve(step)
        if not (self.directory / str(step) / _CONFIG).exists():
            raise ValueError(f'Checkpointer.restore_config: {self.directory / str(step)} was saved '
                             'without a config')
        return self._mgr.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]

    def wait(self) -> None:
        """Blocks until every async save has been written and finalized."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._mgr.close()


def restore_params(directory, abstract_params, step: int | None = None) -> Any:
    """Restores only the params subtree of another run's checkpoint (see `restore_subtrees`)."""
    return restore_subtrees(directory, {'params': abstract_params}, step)['params']


def restore_subtrees(directory, abstract: dict, step: int | None = None, what: str = 'init.checkpoint') -> dict:
    """Restores the named top-level subtrees of another run's checkpoint (for `init.checkpoint`).

    Reads nothing else (the optimizer state of the previous stage is neither needed nor read), and never
    writes to `directory`. A name the checkpoint does not hold (e.g. `buffers` of a converted HF
    checkpoint) is left out of the result; `params` must be there.

    Args:
      directory: the previous run's workdir or checkpoint directory (the one its Checkpointer wrote).
      abstract: {name: pytree of jax.ShapeDtypeStruct with `.sharding` set}, e.g. params and buffers.
      step: the step to read; None for the newest complete one.
      what: the config field or flag `directory` came from, named in errors.

    Returns:
      {name: pytree}, each array in the sharding of its abstract leaf.
    """
    path = step_dir(directory, step, what) / _STATE
    _check_shardings(abstract, f'restore_subtrees({str(directory)!r})')
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        saved = set(checkpointer.metadata(path).item_metadata.tree)
        if 'params' not in saved:
            raise ValueError(f'{what}={str(directory)!r}: {path} holds no params (has {sorted(saved)})')
        item = {name: tree for name, tree in abstract.items() if name in saved and jax.tree.leaves(tree)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return checkpointer.restore(path, args=args)


def complete_steps(directory) -> list[int]:
    """The complete checkpoint steps in `directory`, sorted, without opening a CheckpointManager."""
    return _scan(epath.Path(directory))[0]


def step_dir(path, step: int | None = None, what: str = 'path') -> epath.Path:
    """The directory of checkpoint `step` (None: the newest complete one) of `path`, a run's workdir or
    checkpoint directory; errors name the argument `what` (a config field or flag)."""
    directory = checkpoint_dir(path, what)
    complete, incomplete = _scan(directory)
    for bad in incomplete:
        logging.warning('%s: skipping incomplete checkpoint %s (no %s)', what, bad, _COMMIT_FILE)
    if not complete:
        raise FileNotFoundError(f'{what}={str(path)!r}: no complete checkpoint there (expected a run directory '
                                'holding checkpoints/<step>/, written by dsjax.train.checkpoint)')
    if step is None:
        step = complete[-1]
    elif step not in complete:
        raise ValueError(f'{what}={str(path)!r}: step {step!r} is not a complete checkpoint; complete steps: '
                         f'{complete}')
    return directory / str(step)


def read_config(path, step: int | None = None, what: str = 'path') -> tuple[epath.Path, ml_collections.ConfigDict]:
    """(step directory, saved config) of a run's checkpoint `step` (None: the newest): the config saved
    with it, as base_config() updated by `from_saved`."""
    directory = step_dir(path, step, what)
    if not (directory / _CONFIG).exists():
        raise FileNotFoundError(f'{what}={str(path)!r}: {directory / _CONFIG} does not exist: the checkpoint was '
                                'saved without its config, so its architecture is unknown')
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        saved = checkpointer.restore(directory / _CONFIG, args=ocp.args.JsonRestore())
    return directory, from_saved(saved)


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """base_config() with the values of a config saved with a run (its JSON dict): the one reader of
    saved configs. Fields this version does not know are left out (older runs' settings), except in the
    model section, where one would change the architecture: there it is an error."""
    # References resolved (data.vocab_size, optim.decay_steps): each field takes its own saved value.
    c = config_lib.base_config().copy_and_resolve_references()

    def merge(section, values, prefix):
        for key, value in values.items():
            if prefix.startswith('model.') and key not in section:
                config_lib.fail(f'{prefix}{key}', value, 'unknown model field in a saved config (written by '
                                f'another version of dsjax?); valid fields: {sorted(section.keys())}')
            if key not in section:
                continue
            if isinstance(section[key], ml_collections.ConfigDict):
                merge(section[key], value, f'{prefix}{key}.')
            else:
                section[key] = tuple(value) if isinstance(value, list) else value

    merge(c, saved, '')
    return c


class SavedRun(NamedTuple):
    """What `read_run` returns."""
    config: ml_collections.ConfigDict  # the run's config, as saved
    model_cfg: config_lib.ModelConfig
    variables: dict  # {'params': ..., 'moe_bias': ...} (the routing bias only where the model has one)


def read_run(path, step: int | None = None, *, what: str = 'path', module=Transformer, dtype=None,
             mesh=None) -> SavedRun:
    """The one reader of a run for use (inference, conversion, a reward model, a teacher, chains): its saved
    config, frozen model config and variables (params and routing bias; nothing else is read).

    Args:
      path: a run's workdir, its checkpoints/ directory, or hf_to_orbax's output.
      step: the checkpoint step; None for the newest complete one.
      what: the argument `path` came from, named in errors (e.g. '--model', 'distill.teacher').
      module: the flax module class the params belong to (a reward model's head is not a Transformer's).
      dtype: parameter and compute dtype to load in, by name or as a jnp/np dtype (default: the saved config's).
      mesh: where to place the arrays, by the logical rules (default: the first device).
    """
    directory, config = read_config(path, step, what)
    if dtype is not None:
        dtype = config_lib.dtype_name(dtype, 'dtype')
        config.model.update(dtype=dtype, param_dtype=dtype)
    model_cfg = config_lib.freeze_model(config.model)
    mesh = mesh or sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
    boxed = jax.eval_shape(module(model_cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), sharding.logical_sharding(boxed, mesh))
    # A TrainState's params and its non-gradient buffers (the V3 routing bias).
    item = {'params': abstract['params']}
    if 'moe_bias' in abstract:
        item['buffers'] = {'moe_bias': abstract['moe_bias']}
    restored = restore_subtrees(directory.parent, item, int(directory.name), what)
    variables = {'params': restored['params']}
    if 'buffers' in restored:
        variables['moe_bias'] = restored['buffers']['moe_bias']
    return SavedRun(config, model_cfg, variables)
