"""Each stage's `run(config, workdir)` by name, and chains of stages run by one command.

A chain config is `stage='chain'`, `chain=(name, ...)` (the order) and `stages.<name>` (one full
stage config each). Stage <name> runs in WORKDIR/<name>; a stage whose `init.checkpoint` is empty
starts from the previous stage's workdir ('scratch': from random weights), and any string field may
name an earlier stage's directory as '{name}' (dsjax/posttrain/chain.py). Re-running the command
resumes: each stage restores its own latest checkpoint, and a finished stage returns at once. With an
`evaluation` section, the stages it names are evaluated on held-out problems into WORKDIR/table.md.
"""
import json
import time

import jax
from absl import logging
from etils import epath

from dsjax import config as config_lib
from dsjax.posttrain import chain, distill, dpo, grpo, rejection, reward_model, sft
from dsjax.train import loop
from dsjax.train import workdir as workdir_lib

RUNNERS = {
    'pretrain': loop.run,
    'sft': sft.run,
    'grpo': grpo.run,
    'reward': reward_model.run,
    'dpo': dpo.run,
    'rejection': rejection.run,
    'distill': distill.run,
}
# name -> the check of the stage's own section, `validate(config, num_devices)`.
CHECKS = {
    'sft': sft.validate,
    'grpo': grpo.validate,
    'reward': reward_model.validate,
    'dpo': dpo.validate,
    'rejection': rejection.validate,
    'distill': distill.validate,
}


def validate(config, num_devices: int) -> None:
    """Every field the stage `config.stage` reads: the shared sections, then its own; raises ConfigError
    naming the first bad one."""
    config_lib.validate(config, num_devices)
    if config.stage in CHECKS:
        CHECKS[config.stage](config, num_devices)


def stopped_by(result: dict) -> str | None:
    """Why `run` stopped early (a signal, see train/preemption.py), or None: a stage's metrics or a chain's
    {stage: metrics}."""
    if loop.STOPPED in result:
        return result[loop.STOPPED]
    return next((r[loop.STOPPED] for r in result.values() if isinstance(r, dict) and loop.STOPPED in r), None)


def run(config, workdir) -> dict:
    """Runs the stage `config.stage` names (or the chain) in `workdir`; returns its last metrics."""
    if config.stage == 'chain':
        return run_chain(config, workdir)
    if config.stage not in RUNNERS:
        config_lib.fail('stage', config.stage, f"must be one of {tuple(RUNNERS) + ('chain',)}")
    return RUNNERS[config.stage](config, workdir)


def chain_configs(config, workdir) -> list[tuple[str, object, epath.Path]]:
    """(name, stage config with init.checkpoint filled in, workdir) of each stage, in order; every stage's
    whole config (its own section included) is validated before the first one starts."""
    names = tuple(config.chain)
    if not names or sorted(names) != sorted(config.stages.keys()):
        config_lib.fail('chain', names, f'must list each of config.stages ({sorted(config.stages.keys())}) once, '
                        'in the order to run them')
    root = workdir_lib.resolve(workdir)  # local or remote (gs://, s3://)
    out, previous = [], ''
    for name in names:
        stage = config.stages[name].copy_and_resolve_references()
        stage_dir = root / name
        if not stage.init.checkpoint and previous:
            stage.init.checkpoint = str(previous)
        try:
            chain.resolve_references(stage, {n: root / n for n, _, _ in out})
        except ValueError as e:
            raise config_lib.ConfigError(f'stage {name!r}: {e}') from e
        if stage.stage == 'chain' or stage.stage not in RUNNERS:
            config_lib.fail(f'stages.{name}.stage', stage.stage, f'must be one of {tuple(RUNNERS)}')
        try:
            validate(stage, len(jax.devices()))
        except config_lib.ConfigError as e:
            raise config_lib.ConfigError(f'stage {name!r}: {e}') from e
        out.append((name, stage, stage_dir))
        previous = stage_dir
    return out


def run_chain(config, workdir) -> dict:
    """Runs every stage of the chain in turn; returns {stage name: its last metrics}."""
    results, table, wall = {}, {}, {}
    evaluation = config.evaluation if 'evaluation' in config else None
    for name, stage, stage_dir in chain_configs(config, workdir):
        logging.info('Chain: stage %r (%s) in %s', name, stage.stage, stage_dir)
        t0 = time.perf_counter()
        results[name] = RUNNERS[stage.stage](stage, stage_dir)
        wall[name] = _add_wall_time(stage_dir, time.perf_counter() - t0)
        if loop.STOPPED in results[name]:
            # A signal stopped the stage after saving: the chain stops too (re-running resumes it).
            logging.warning('Chain: stage %r stopped by %s; later stages did not run', name, results[name][loop.STOPPED])
            break
        if evaluation is not None and name in evaluation.stages:
            table[name] = chain.evaluate_stage(name, stage_dir, evaluation)
            logging.info('Chain so far:\n%s', chain.write_table(workdir, table, wall, evaluation.get('gap', ())))
    return results


def _add_wall_time(stage_dir, seconds: float) -> float:
    """The stage's wall time over every invocation that ran it (a resumed stage adds up)."""
    path = epath.Path(stage_dir) / 'wall_s.json'
    total = (json.loads(path.read_text())['wall_s'] if path.exists() else 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'wall_s': total}))
    return total
