"""Each stage's `run(config, workdir)` by name, and chains of stages run by one command.

A chain config is `stage='chain'`, `chain=(name, ...)` (the order) and `stages.<name>` (one full
stage config each). Stage <name> runs in WORKDIR/<name>; a stage whose `init.checkpoint` is empty
starts from the previous stage's workdir. Re-running the command resumes: each stage restores its own
latest checkpoint, and a finished stage returns at once.
"""
import pathlib

import jax
from absl import logging

from dsjax import config as config_lib
from dsjax.posttrain import grpo, sft
from dsjax.train import loop

RUNNERS = {
    'pretrain': loop.run,
    'sft': sft.run,
    'grpo': grpo.run,
}


def run(config, workdir) -> dict:
    """Runs the stage `config.stage` names (or the chain) in `workdir`; returns its last metrics."""
    if config.stage == 'chain':
        return run_chain(config, workdir)
    if config.stage not in RUNNERS:
        config_lib.fail('stage', config.stage, f"must be one of {tuple(RUNNERS) + ('chain',)}")
    return RUNNERS[config.stage](config, workdir)


def chain_configs(config, workdir) -> list[tuple[str, object, pathlib.Path]]:
    """(name, stage config with init.checkpoint filled in, workdir) of each stage, in order; every stage's
    shared sections are validated before the first one starts."""
    names = tuple(config.chain)
    if not names or sorted(names) != sorted(config.stages.keys()):
        config_lib.fail('chain', names, f'must list each of config.stages ({sorted(config.stages.keys())}) once, '
                        'in the order to run them')
    out, previous = [], ''
    for name in names:
        stage = config.stages[name].copy_and_resolve_references()
        stage_dir = pathlib.Path(workdir) / name
        if not stage.init.checkpoint and previous:
            stage.init.checkpoint = str(previous)
        if stage.stage == 'chain' or stage.stage not in RUNNERS:
            config_lib.fail(f'stages.{name}.stage', stage.stage, f'must be one of {tuple(RUNNERS)}')
        try:
            config_lib.validate(stage, len(jax.devices()))
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f'stage {name!r}: {e}') from e
        out.append((name, stage, stage_dir))
        previous = stage_dir
    return out


def run_chain(config, workdir) -> dict:
    """Runs every stage of the chain in turn; returns {stage name: its last metrics}."""
    results = {}
    for name, stage, stage_dir in chain_configs(config, workdir):
        logging.info('Chain: stage %r (%s) in %s', name, stage.stage, stage_dir)
        results[name] = RUNNERS[stage.stage](stage, stage_dir)
    return results
