"""Reward model: Bradley-Terry against its formula, the last-token scalar head, the stage, the GRPO callable."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.data import tasks
from dsjax.posttrain import losses, reward_model, rewards, rollout
from dsjax.train import logger


def test_bradley_terry_against_its_formula():
    chosen = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    rejected = np.array([1.0, 1.0, 0.5, -2.0], np.float32)
    for margin in (0.0, 0.7):
        expected = np.log1p(np.exp(-(chosen - rejected - margin)))  # -log sigmoid(x) = log(1 + e^-x)
        np.testing.assert_allclose(np.asarray(losses.bradley_terry(chosen, rejected, margin)), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(losses.pairwise_accuracy(chosen, rejected)), [1, 0, 0.5, 1])
    # The gradient pushes the chosen reward up and the rejected one down, by sigmoid(-(rc - rr)).
    g_c, g_r = jax.grad(lambda c, r: losses.bradley_terry(c, r).sum(), argnums=(0, 1))(chosen, rejected)
    np.testing.assert_allclose(np.asarray(g_c), -1 / (1 + np.exp(chosen - rejected)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_r), -np.asarray(g_c), rtol=1e-6)


def test_reward_is_read_at_the_last_real_token(tiny_model):
    cfg = tiny_model()
    model = reward_model.RewardModel(cfg)
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    # The backbone keeps the Transformer's parameter names, so pre-trained checkpoints load into it.
    assert {'embed', 'final_norm', 'reward_head', 'reward_norm'} <= set(variables['params'])
    tokens = np.array([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 10]], np.int32)
    segments = np.array([[1, 1, 1, 0, 0, 0], [1] * 6], np.int32)
    scores, _ = model.apply(variables, tokens, None, segments)
    alone, _ = model.apply(variables, tokens[:1, :3], None, segments[:1, :3])
    np.testing.assert_allclose(np.asarray(scores[0]), np.asarray(alone[0]), rtol=1e-5)
    garbage = tokens.copy()
    garbage[0, 3:] = 42  # padding content must not matter
    moved, _ = model.apply(variables, garbage, None, segments)
    np.testing.assert_allclose(np.asarray(moved[0]), np.asarray(scores[0]), rtol=1e-5)
    assert scores.shape == (2,)


def test_preference_pairs_differ_in_correctness():
    import random
    rng = random.Random(0)
    for p in tasks.make_problems('arithmetic', 'train', 20, level=2) + tasks.make_problems('countdown', 'train', 20, 3):
        chosen, rejected = reward_model.preference_pair(p, rng)
        assert tasks.grade(p, chosen) and tasks.format_ok(chosen)
        assert not (tasks.grade(p, rejected) and tasks.format_ok(rejected))


def test_reward_stage_trains_and_serves_as_a_grpo_reward(tmp_path):
    c = presets.load_experiment(__file__.replace('tests/posttrain/test_reward_model.py', 'experiments/x.py'),
                                   'llm_small', 'smoke')
    c.stage = 'reward'
    c.reward.update(tasks=('arithmetic:1',), pairs=64, val_pairs=16)
    c.data.seq_len = 96
    c.model.max_position_embeddings = 128
    c.train.update(steps=4, eval_every=4, checkpoint_every=4, async_checkpoint=False)
    c.optim.update(lr=3e-3, decay_steps=4)
    c.mesh.data = 1
    last = reward_model.run(c, tmp_path, devices=jax.devices()[:1])
    records = [r for r in logger.read_metrics(tmp_path) if 'val_pair_accuracy' in r]
    assert [r['step'] for r in records] == [0, 4]
    assert np.isfinite(last['loss']) and 0 <= last['pair_accuracy'] <= 1
    fn = reward_model.ModelReward(tmp_path, batch=4, width=96)
    problems = tasks.make_problems('arithmetic', 'test', 5, level=1)
    scores = fn([p.prompt for p in problems], [tasks.worked_solution(p) for p in problems])
    assert scores.shape == (5,) and np.all(np.isfinite(scores))
    # Registered with the GRPO rewards API: a reward name like the rule rewards.
    c.grpo.update(reward_funcs=('accuracy', 'reward_model'), reward_weights=(1.0, 0.5), reward_model=str(tmp_path))
    total, parts = rewards.build(c, None)(rollout.task_rows(problems), [tasks.worked_solution(p) for p in problems])
    assert total.shape == (5,) and set(parts) == {'accuracy', 'reward_model'}
    np.testing.assert_allclose(total, 1.0 + 0.5 * parts['reward_model'], rtol=1e-5)


def test_reward_model_reward_needs_a_run_directory():
    c = config_lib.base_config()
    c.grpo.update(reward_funcs=('reward_model',), reward_weights=(1.0,))
    with pytest.raises(rewards.RewardError, match='grpo.reward_model'):
        rewards.build(c, None)
