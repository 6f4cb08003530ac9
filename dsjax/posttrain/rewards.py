"""Reward functions for GRPO, called as TRL calls them: `f(prompts, completions, **fields) -> floats`.

`prompts` are the N prompts (a question string or a conversation, repeated G times per prompt row),
`completions` the N decoded completion texts, and `fields` every other field of the N prompt rows, each a
list (generated task problems give `problem`, a user's JSONL rows whatever they hold). A reward function
returns one finite number per completion.

`grpo.reward_funcs` names each one: a rule reward of REWARDS (built from the config and tokenizer), or any
function by import path, 'package.module:function' (importable) or 'path/to/file.py:function'. Lengths are
counted in tokens of the run's tokenizer, never in characters.
"""
import dataclasses
import importlib
import importlib.util
import pathlib
from typing import Callable

import numpy as np

from dsjax import config as config_lib
from dsjax.data import tasks
from dsjax.posttrain import reward_model

RewardFn = Callable[..., object]


class RewardError(ValueError):
    """A reward function raised, or returned something other than one finite number per completion."""


def accuracy(prompts, completions, problem=None, answer=None, **fields) -> np.ndarray:
    """1 where the completion's final <answer> is right, else 0: by the task's exact grader (rows of
    generated problems), or equal to the row's `answer` field (a user's rows)."""
    del prompts, fields
    if problem is not None:
        return np.array([float(tasks.grade(p, c)) for p, c in zip(problem, completions)])
    if answer is None:
        raise RewardError("reward 'accuracy' needs task problems (grpo.source='tasks') or rows with an "
                          "'answer' field")
    return np.array([float(tasks.parse_answer(c) == str(a).strip()) for a, c in zip(answer, completions)])


def format_reward(prompts, completions, **fields) -> np.ndarray:
    """1 where the completion is exactly <think> ... </think> <answer> ... </answer>, else 0."""
    del prompts, fields
    return np.array([float(tasks.format_ok(c)) for c in completions])


def overlong_penalty(tokenizer, max_tokens: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment: 0 up to max_tokens - buffer tokens, then falling linearly to
    -1 at max_tokens (and -1 past it)."""

    def length(prompts, completions, **fields):
        del prompts, fields
        n = np.array([len(tokenizer.encode(c)) for c in completions], np.float32)
        return np.clip((max_tokens - buffer - n) / max(buffer, 1), -1.0, 0.0)

    return length


def language_consistency(tokenizer) -> RewardFn:
    """R1's language-consistency reward: the fraction of the reasoning's tokens (inside <think>, or
    the whole completion without one) that are in the target language, here ASCII text."""

    def language(prompts, completions, **fields):
        del prompts, fields
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
    'length': lambda config, tokenizer: overlong_penalty(tokenizer, config.grpo.max_completion_length,
                                                         config.grpo.overlong_buffer),
    'language': lambda config, tokenizer: language_consistency(tokenizer),
    'reward_model': lambda config, tokenizer: trained_reward_model(config),
}


def import_function(path: str, field: str = 'grpo.reward_funcs') -> RewardFn:
    """The function an import path names: 'package.module:function' or 'path/to/file.py:function'. (The
    registry REWARDS names dsjax's own; a user's functions live in their own files, as with TRL.)"""
    module_name, _, name = path.rpartition(':')
    try:
        if not module_name:
            raise ValueError('not a rule reward, and no module before a colon')
        if module_name.endswith('.py'):
            spec = importlib.util.spec_from_file_location(f'dsjax_reward_{pathlib.Path(module_name).stem}',
                                                          module_name)
            if spec is None or not pathlib.Path(module_name).is_file():
                raise FileNotFoundError(f'no file {module_name}')
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, name)
    except Exception as e:  # noqa: BLE001 (any failure to import user code is reported with its field)
        config_lib.fail(field, path, f'cannot import it ({type(e).__name__}: {e}); give a rule reward '
                        f"{tuple(REWARDS)} or 'module:function' / 'path/to/file.py:function'")
    if not callable(fn):
        config_lib.fail(field, path, f'{name} is not a function')
    return fn


def resolve(config, tokenizer, name: str) -> RewardFn:
    """The reward function `name` stands for (see the module docstring)."""
    return REWARDS[name](config, tokenizer) if name in REWARDS else import_function(name)


def _columns(rows) -> tuple[list, dict]:
    """The rows' prompts and every other field as a list over the rows (None where a row lacks it)."""
    names = sorted({k for row in rows for k in row if k != 'prompt'})
    return [row['prompt'] for row in rows], {k: [row.get(k) for row in rows] for k in names}


@dataclasses.dataclass(frozen=True)
class RewardSet:
    """Named reward functions and their weights: r = sum_k w_k f_k."""
    names: tuple[str, ...]
    weights: tuple[float, ...]
    fns: tuple[RewardFn, ...]

    def __call__(self, rows, completions) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total reward [N], {name: that function's rewards [N]}) of N prompt rows and their completions;
        raises RewardError naming a faulty function and the row it failed on."""
        n = len(completions)
        if len(rows) != n:
            raise RewardError(f'{len(rows)} prompt rows for {n} completions: give one row per completion')
        prompts, fields = _columns(rows)
        parts = {}
        for name, fn in zip(self.names, self.fns):
            try:
                values = fn(prompts, completions, **fields)
            except Exception as e:  # noqa: BLE001 (any failure of user code gets the function's name)
                raise RewardError(f'reward function {name!r} raised {type(e).__name__}: {e}'
                                  f'{_failing_row(fn, rows, completions)}') from e
            try:
                values = np.asarray(values, np.float32) if values is not None else None
            except (TypeError, ValueError) as e:
                raise RewardError(f'reward function {name!r} returned {str(values)[:200]}: not numbers') from e
            if values is None or values.shape != (n,):
                raise RewardError(f'reward function {name!r} returned shape '
                                  f'{None if values is None else values.shape}; it must return one number '
                                  f'per completion, shape ({n},)')
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise RewardError(f'reward function {name!r} returned {values[bad[0]]} for row {bad[0]} (prompt '
                                  f'{str(rows[bad[0]]["prompt"])[:100]!r}): rewards must be finite numbers')
            parts[name] = values
        total = sum(w * parts[name] for name, w in zip(self.names, self.weights))
        return np.asarray(total, np.float32), parts


def _failing_row(fn, rows, completions) -> str:
    """' on row i (prompt ...)': the first row that `fn` fails on alone (found only once it has failed)."""
    for i, (row, completion) in enumerate(zip(rows, completions)):
        prompts, fields = _columns([row])
        try:
            fn(prompts, [completion], **fields)
        except Exception:  # noqa: BLE001
            return f' on row {i} (prompt {str(row["prompt"])[:100]!r}, completion {completion[:100]!r})'
    return ''


def build(config, tokenizer) -> RewardSet:
    """The RewardSet of `config.grpo.reward_funcs` / `reward_weights`."""
    g = config.grpo
    fns = tuple(resolve(config, tokenizer, name) for name in g.reward_funcs)
    return RewardSet(tuple(g.reward_funcs), tuple(float(w) for w in g.reward_weights), fns)
