"""Reward functions: rule values, weights, lengths in tokens, and errors that name the faulty function."""
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.data import tasks
from dsjax.posttrain import rewards, rollout

PROBLEM = tasks.Problem('arithmetic', 2, 'Compute 47 + 85', '132', steps=('47 + 85',))
GOOD = '<think> 40 + 80 = 120 </think> <answer> 132 </answer>'
WRONG = '<think> hmm </think> <answer> 131 </answer>'
UNFORMATTED = 'the answer is <answer> 132 </answer>'


class WordTokenizer:
    """One token per whitespace-separated word: token counts differ from character counts."""

    def encode(self, text):
        return list(range(len(text.split())))

    def decode(self, ids):
        return 'é' if ids[0] % 2 else 'word'


def _config(names, weights, **grpo):
    c = config_lib.base_config()
    c.grpo.reward_funcs, c.grpo.reward_weights = names, weights
    c.grpo.update(**grpo)
    return c


ROWS = rollout.task_rows([PROBLEM] * 3)
TEXTS = [GOOD, WRONG, UNFORMATTED]


def test_rule_rewards():
    np.testing.assert_array_equal(rewards.accuracy([PROBLEM.prompt] * 3, TEXTS, problem=[PROBLEM] * 3), [1, 0, 1])
    np.testing.assert_array_equal(rewards.accuracy(['q'] * 3, TEXTS, answer=['132', 132, '7']), [1, 0, 0])
    np.testing.assert_array_equal(rewards.format_reward(['q'] * 3, TEXTS), [1, 1, 0])
    with pytest.raises(rewards.RewardError, match="'accuracy' needs task problems"):
        rewards.accuracy(['q'], [GOOD], source=['web'])


def test_weighted_sum_and_parts():
    reward_set = rewards.build(_config(('accuracy', 'format'), (1.0, 0.5)), WordTokenizer())
    total, parts = reward_set(ROWS, TEXTS)
    np.testing.assert_allclose(total, [1.5, 0.5, 1.0])
    assert sorted(parts) == ['accuracy', 'format']


def test_length_is_counted_in_tokens():
    fn = rewards.overlong_penalty(WordTokenizer(), max_tokens=10, buffer=4)
    texts = ['a ' * 6, 'a ' * 8, 'a ' * 10, 'a ' * 30, 'x' * 500]  # the last: 500 characters, one token
    np.testing.assert_allclose(fn(['q'] * 5, texts), [0.0, -0.5, -1.0, -1.0, 0.0])


def test_language_consistency_counts_reasoning_tokens():
    fn = rewards.language_consistency(WordTokenizer())
    np.testing.assert_allclose(fn(['q'] * 2, ['<think> a b c d </think> <answer> 1 </answer>', '<think></think>']),
                               [0.5, 1.0])


USER_REWARDS = """
import math


def brevity(prompts, completions, **fields):
    return [-len(c) / 100 for c in completions]


def by_field(prompts, completions, bonus, **fields):
    return [float(b) for b in bonus]


def fails_on_wrong(prompts, completions, **fields):
    return [1 / ('131' not in c) for c in completions]


def too_many(prompts, completions, **fields):
    return [0.0] * (len(completions) + 1)


def nothing(prompts, completions, **fields):
    return None


def not_a_number(prompts, completions, **fields):
    return [math.nan if '131' in c else 1.0 for c in completions]


def words(prompts, completions, **fields):
    return ['many'] * len(completions)
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / 'my_rewards.py'
    path.write_text(USER_REWARDS)
    return str(path)


def test_reward_functions_by_import_path_get_prompts_completions_and_fields(user_file, tmp_path, monkeypatch):
    rows = [{'prompt': 'a', 'bonus': 1}, {'prompt': [{'role': 'user', 'content': 'b'}], 'bonus': 2},
            {'prompt': 'c', 'bonus': 3}]
    reward_set = rewards.build(_config((f'{user_file}:brevity', f'{user_file}:by_field'), (1.0, 0.5)), None)
    total, parts = reward_set(rows, ['x' * 10, 'x' * 20, ''])
    np.testing.assert_allclose(parts[f'{user_file}:brevity'], [-0.1, -0.2, 0.0])
    np.testing.assert_allclose(total, [0.4, 0.8, 1.5])
    monkeypatch.syspath_prepend(str(tmp_path))  # an importable module works the same way
    assert rewards.build(_config(('my_rewards:brevity',), (1.0,)), None)(rows, ['', '', ''])[0].tolist() == [0, 0, 0]


@pytest.mark.parametrize('name,match', [
    ('fails_on_wrong', r"'.*:fails_on_wrong' raised ZeroDivisionError: division by zero on row 1 "
                       r"\(prompt 'Compute 47 \+ 85'"),
    ('too_many', r"':?.*too_many' returned shape \(4,\).*shape \(3,\)"),
    ('nothing', "'.*:nothing' returned shape None"),
    ('not_a_number', r"'.*:not_a_number' returned nan for row 1"),
    ('words', "'.*:words' returned .*not numbers"),
])
def test_faulty_reward_functions_name_the_function_and_row(user_file, name, match):
    reward_set = rewards.build(_config(('format', f'{user_file}:{name}'), (1.0, 1.0)), WordTokenizer())
    with pytest.raises(rewards.RewardError, match=match):
        reward_set(ROWS, TEXTS)


@pytest.mark.parametrize('name,match', [
    ('helpfulness', "grpo.reward_funcs='helpfulness'.*cannot import"),
    ('nowhere.py:f', r"grpo.reward_funcs='nowhere.py:f'.*no file nowhere.py"),
    ('json:no_such_function', "grpo.reward_funcs='json:no_such_function'.*AttributeError"),
    ('math:pi', "is not a function"),
])
def test_unknown_reward_names_are_config_errors(name, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        rewards.build(_config((name,), (1.0,)), WordTokenizer())
