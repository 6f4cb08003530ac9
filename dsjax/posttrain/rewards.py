"""Reward functions for GRPO: rule-based ones, and the checked, weighted set a run uses.

A reward function is a plain callable `f(problems, completions) -> float array [N]`: `problems` are
the N `tasks.Problem`s (repeated G times per prompt), `completions` the N decoded completion texts.
Rule rewards are built by the factories in REWARDS from (config, tokenizer); a model-based reward
(a trained reward model) is any callable of the same shape, given to `build` through `extra`.
Lengths are counted in tokens of the run's tokenizer, never in characters.
"""
import dataclasses
from typing import Callable, Sequence

import numpy as np

from dsjax.data import tasks
from dsjax.posttrain import reward_model

RewardFn = Callable[[Sequence[tasks.Problem], Sequence[str]], np.ndarray]


class RewardError(ValueError):
    """A reward function raised, or returned something other than one finite number per completion."""


def accuracy(problems, completions) -> np.ndarray:
    """1 where the task's exact grader accepts the completion's final <answer>, else 0."""
    return np.array([float(tasks.grade(p, c)) for p, c in zip(problems, completions)])


def format_reward(problems, completions) -> np.ndarray:
    """1 where the completion is exactly <think> ... </think> <answer> ... </answer>, else 0."""
    del problems
    return np.array([float(tasks.format_ok(c)) for c in completions])


def overlong_penalty(tokenizer, max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer tokens, then falling linearly to
    -1 at max_tokens (and -1 past it)."""

    def length(problems, completions):
        del problems
        n = np.array([len(tokenizer.encode(c)) for c in completions], np.float32)
        return np.clip((max_tokens - buffer - n) / max(buffer, 1), -1.0, 0.0)

    return length


def language_consistency(tokenizer) -> RewardFn:
    """R1's language-consistency reward: the fraction of the reasoning's tokens (inside <think>, or
    the whole completion without one) that are in the target language, here ASCII text."""

    def language(problems, completions):
        del problems
        values = []
        for c in completions:
            thought = c.split('<think>', 1)[-1].split('</think>', 1)[0]
            ids = tokenizer.encode(thought)
            values.append(np.mean([tokenizer.decode([i]).isascii() for i in ids]) if ids else 1.0)
        return np.array(values, np.float32)

    return language


def trained_reward_model(config) -> RewardFn:
    """The reward model of `config.grpo.reward_model` (a stage 'reward' run directory) as a reward."""
    if not config.grpo.reward_model:
        raise RewardError("config.grpo.reward_model='' is invalid: reward 'reward_model' needs the run directory "
                          "of a trained reward model (stage 'reward')")
    return reward_model.ModelReward(config.grpo.reward_model)


# name -> factory(config, tokenizer) -> RewardFn.
REWARDS = {
    'accuracy': lambda config, tokenizer: accuracy,
    'format': lambda config, tokenizer: format_reward,
    'length': lambda config, tokenizer: overlong_penalty(tokenizer, config.grpo.max_new_tokens,
                                                         config.grpo.overlong_buffer),
    'language': lambda config, tokenizer: language_consistency(tokenizer),
    'reward_model': lambda config, tokenizer: trained_reward_model(config),
}


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """Named reward functions and their weights: r = sum_k w_k f_k."""
    names: tuple[str, ...]
    weights: tuple[float, ...]
    fns: tuple[RewardFn, ...]

    def __call__(self, problems, completions) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total reward [N], {name: that function's rewards [N]}); raises RewardError naming a faulty
        function."""
        n = len(completions)
        if len(problems) != n:
            raise RewardError(f'{len(problems)} problems for {n} completions: give one problem per completion')
        parts = {}
        for name, fn in zip(self.names, self.fns):
            try:
                values = fn(problems, completions)
            except Exception as e:  # noqa: BLE001 (any failure of user code gets the function's name)
                raise RewardError(f'reward function {name!r} raised {type(e).__name__}: {e}') from e
            values = np.asarray(values, np.float32) if values is not None else None
            if values is None or values.shape != (n,):
                raise RewardError(f'reward function {name!r} returned shape '
                                  f'{None if values is None else values.shape}; it must return one number '
                                  f'per completion, shape ({n},)')
            if not np.all(np.isfinite(values)):
                raise RewardError(f'reward function {name!r} returned non-finite rewards: '
                                  f'{values[~np.isfinite(values)][:4]}')
            parts[name] = values
        total = sum(w * parts[name] for name, w in zip(self.names, self.weights))
        return np.asarray(total, np.float32), parts


def build(config, tokenizer, extra: dict[str, RewardFn] | None = None) -> RewardSet:
    """The RewardSet of `config.grpo.reward_names` / `reward_weights`: each name is a rule reward of
    REWARDS or a callable of `extra` (e.g. {'reward_model': fn} for a trained reward model)."""
    extra = extra or {}
    g = config.grpo
    fns = []
    for name in g.reward_names:
        if name in extra:
            fns.append(extra[name])
        elif name in REWARDS:
            fns.append(REWARDS[name](config, tokenizer))
        else:
            raise RewardError(f'config.grpo.reward_names: {name!r} is not a reward function; valid: '
                              f'{sorted(set(REWARDS) | set(extra))}')
    return RewardSet(tuple(g.reward_names), tuple(float(w) for w in g.reward_weights), tuple(fns))
