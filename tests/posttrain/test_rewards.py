"""Reward functions: rule values, weights, lengths in tokens, and errors that name the faulty function."""
import ml_collections
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.data import tasks
from dsjax.posttrain import rewards

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
    c.grpo.reward_names, c.grpo.reward_weights = names, weights
    c.grpo.update(**grpo)
    return c


def test_rule_rewards():
    texts = [GOOD, WRONG, UNFORMATTED]
    np.testing.assert_array_equal(rewards.accuracy([PROBLEM] * 3, texts), [1, 0, 1])
    np.testing.assert_array_equal(rewards.format_reward([PROBLEM] * 3, texts), [1, 1, 0])


def test_weighted_sum_and_parts():
    reward_set = rewards.build(_config(('accuracy', 'format'), (1.0, 0.5)), WordTokenizer())
    total, parts = reward_set([PROBLEM] * 3, [GOOD, WRONG, UNFORMATTED])
    np.testing.assert_allclose(total, [1.5, 0.5, 1.0])
    assert sorted(parts) == ['accuracy', 'format']


def test_length_is_counted_in_tokens():
    fn = rewards.overlong_penalty(WordTokenizer(), max_tokens=10, buffer=4)
    texts = ['a ' * 6, 'a ' * 8, 'a ' * 10, 'a ' * 30, 'x' * 500]  # the last: 500 characters, one token
    np.testing.assert_allclose(fn([PROBLEM] * 5, texts), [0.0, -0.5, -1.0, -1.0, 0.0])


def test_language_consistency_counts_reasoning_tokens():
    fn = rewards.language_consistency(WordTokenizer())
    np.testing.assert_allclose(fn([PROBLEM] * 2, ['<think> a b c d </think> <answer> 1 </answer>', '<think></think>']),
                               [0.5, 1.0])


@pytest.mark.parametrize('bad,match', [
    (lambda problems, texts: 1 / 0, "'broken' raised ZeroDivisionError"),
    (lambda problems, texts: np.zeros(len(texts) + 1), r"'broken' returned shape \(4,\).*shape \(3,\)"),
    (lambda problems, texts: None, "'broken' returned shape None"),
    (lambda problems, texts: np.full(len(texts), np.nan), "'broken' returned non-finite"),
])
def test_faulty_reward_functions_are_named(bad, match):
    reward_set = rewards.build(_config(('format', 'broken'), (1.0, 1.0)), WordTokenizer(), extra={'broken': bad})
    with pytest.raises(rewards.RewardError, match=match):
        reward_set([PROBLEM] * 3, [GOOD, WRONG, UNFORMATTED])


def test_unknown_reward_name():
    with pytest.raises(rewards.RewardError, match="'helpfulness' is not a reward function"):
        rewards.build(_config(('helpfulness',), (1.0,)), WordTokenizer())


def test_model_based_reward_plugs_in_as_a_callable():
    scores = ml_collections.ConfigDict({'calls': 0})

    def reward_model(problems, texts):
        scores.calls += 1
        return np.arange(len(texts), dtype=np.float32)

    reward_set = rewards.build(_config(('accuracy', 'reward_model'), (1.0, 0.1)), WordTokenizer(),
                               extra={'reward_model': reward_model})
    total, parts = reward_set([PROBLEM] * 3, [GOOD, WRONG, UNFORMATTED])
    np.testing.assert_allclose(total, [1.0, 0.1, 1.2])
    assert scores.calls == 1 and 'reward_model' in parts
