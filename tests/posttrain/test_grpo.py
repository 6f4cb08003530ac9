"""The GRPO stage: prompt/completion alignment (EOS trained), config errors, and a tiny run that resumes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.data import tasks
from dsjax.posttrain import grpo, losses
from dsjax.train import logger

EOS, PAD = 3, 0


def test_sequences_put_each_completion_after_its_prompt_and_keep_the_eos():
    prompt_BxW = np.array([[2, 11, 12], [2, 21, 0]])
    lengths_B = np.array([3, 2])
    tokens_BxN = np.array([[31, EOS, PAD, PAD], [41, 42, 43, 44]])
    mask_BxN = np.array([[True, True, False, False], [True, True, True, True]])  # as generate returns it
    batch = grpo.sequences(prompt_BxW, lengths_B, tokens_BxN, mask_BxN, PAD)
    np.testing.assert_array_equal(batch['inputs'], [[2, 11, 12, 31, EOS, 0, 0], [2, 21, 41, 42, 43, 44, 0]])
    np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch['positions'][0], np.arange(7))


def test_eos_gets_gradient_and_tokens_after_it_none():
    lengths_B, n, v = jnp.array([3, 2]), 4, 8
    tokens_BxN = jnp.array([[5, EOS, PAD, PAD], [6, 7, 6, EOS]])
    mask_BxN = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    logits_BxTxV = jax.random.normal(jax.random.PRNGKey(0), (2, 7, v))

    def loss(logits):
        logp = losses.token_logprobs(grpo.completion_logits(logits, lengths_B, n), tokens_BxN)
        return losses.grpo_loss(logp, jax.lax.stop_gradient(logp), None, jnp.array([1.0, -1.0]), mask_BxN,
                                eps_low=0.2, eps_high=0.2, beta=0.0, mode='token-mean')[0]

    grad_BxT = np.abs(np.asarray(jax.grad(loss)(logits_BxTxV))).sum(-1)
    # Row 0: prompt of 3, completion tokens at positions 3 (token 5) and 4 (EOS), predicted from 2 and 3.
    assert grad_BxT[0, 3] > 0  # the logits that produce EOS are trained
    np.testing.assert_array_equal(grad_BxT[0, [0, 1, 4, 5, 6]], 0.0)
    assert np.all(grad_BxT[1, 1:5] > 0) and grad_BxT[1, 0] == 0 and np.all(grad_BxT[1, 5:] == 0)


def test_step_problems_are_fixed_per_step_and_from_the_train_split():
    a = grpo.step_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, step=5)
    assert a == grpo.step_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, step=5)
    assert a != grpo.step_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, step=6)
    assert [p.task for p in a] == ['arithmetic', 'countdown'] * 3
    assert all(tasks.split_of(p.task, tasks.canonical_key(p)) == 'train' for p in a)


def test_group_health():
    health = grpo.group_health([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 1, 0], 4)
    assert health == {'solved_groups': 1 / 3, 'hopeless_groups': 1 / 3}


def test_evaluate_counts_samples_first_answers_and_tasks(monkeypatch):
    """pass@1 is the mean over k samples, pass@k any of them; the first answer is graded on its own."""
    problems = [tasks.Problem('arithmetic', 2, 'Compute 2 + 3', '5', steps=('2 + 3',)),
                tasks.Problem('multiplication', 2, 'Compute 12 * 3', '36', steps=('12 * 3',))]
    right, wrong = '<think> a </think> <answer> {} </answer>', '<think> a </think> <answer> 0 </answer>'
    rambles = right + ' User: more <answer> 7 </answer>'  # right first, then another answer
    texts = [right.format(5), wrong, rambles.format(5), wrong, wrong, right.format(36)]

    def fake_rollout(model_cfg, variables, prompts, tokenizer, key, sampling, max_new_tokens, mesh):
        assert prompts == ['p0'] * 3 + ['p1'] * 3 and sampling.temperature == 0.6 and sampling.top_p == 0.95
        mask = np.zeros((6, max_new_tokens), bool)
        mask[:, :4] = True
        return None, None, grpo.decode.Generation(tokens=None, mask=mask, logprobs=None, key=None), texts

    monkeypatch.setattr(grpo, 'rollout', fake_rollout)
    g = config_lib.base_config().grpo
    g.update(eval_samples=3, eval_temperature=0.6, eval_top_p=0.95)
    m = grpo.evaluate(None, None, problems, ['p0', 'p1'], None, g, None, None, shards=1)
    assert m['eval_accuracy'] == pytest.approx(2 / 6) and m['eval_pass_at_3'] == 1.0
    assert m['eval_first_answer_accuracy'] == pytest.approx(3 / 6)
    assert m['eval_format_rate'] == pytest.approx(5 / 6) and m['eval_completion_len'] == 4.0
    assert m['eval_accuracy_arithmetic2'] == pytest.approx(1 / 3)
    assert m['eval_accuracy_multiplication2'] == pytest.approx(1 / 3)


def tiny_config(tmp_path, **grpo_fields):
    c = config_lib.base_config()
    c.stage = 'grpo'
    presets.smoke(c)
    c.model.vocab_size = 320
    c.model.max_position_embeddings = 512
    c.data.update(source='tasks', tasks=('arithmetic:1',), task_documents=300, cache_dir=str(tmp_path / 'cache'))
    c.grpo.update(tasks=('arithmetic:1',), batch_size=8, group_size=4, max_new_tokens=6, eval_problems=8,
                  beta=0.01, updates_per_batch=2, eval_temperature=1.0)  # evaluation reuses the rollout's compile
    c.grpo.update(**grpo_fields)
    c.train.update(steps=2, eval_every=2, checkpoint_every=1, async_checkpoint=False)
    c.optim.update(schedule='constant', warmup_steps=0)
    return c


@pytest.mark.parametrize('fields,match', [
    (dict(batch_size=12, group_size=8), 'grpo.batch_size=12.*divisible by grpo.group_size=8'),
    (dict(group_size=1, batch_size=8), 'grpo.group_size=1'),
    (dict(aggregation='mean'), 'grpo.aggregation'),
    (dict(reward_names=('accuracy', 'fame'), reward_weights=(1.0, 1.0)), "'fame' is unknown"),
    (dict(reward_weights=(1.0,)), 'grpo.reward_weights'),
    (dict(tasks=('arithmetic:9',)), 'grpo.tasks'),
    (dict(temperature=0.0), 'grpo.temperature'),
    (dict(eval_samples=4, eval_temperature=0.0), 'grpo.eval_samples=4'),
    (dict(eval_top_p=0.0), 'grpo.eval_top_p'),
])
def test_bad_config_is_named_before_anything_runs(tmp_path, fields, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        grpo.run(tiny_config(tmp_path, **fields), tmp_path / 'run')
    assert not (tmp_path / 'run').exists()


def test_tiny_run_finishes_and_resumes(tmp_path):
    workdir = tmp_path / 'run'
    last = grpo.run(tiny_config(tmp_path), workdir)
    for name in ('reward', 'reward_accuracy', 'reward_format', 'accuracy', 'format_rate', 'completion_len_mean',
                 'completion_len_max', 'zero_advantage_groups', 'solved_groups', 'hopeless_groups', 'kl',
                 'clip_fraction', 'entropy', 'gen_tokens_per_s', 'train_tokens_per_s', 'eval_accuracy',
                 'eval_format_rate'):
        assert np.isfinite(last[name]), name
    assert last['completion_len_max'] <= 6
    assert [r['step'] for r in logger.read_metrics(workdir)] == [0, 1, 2]

    resumed = tiny_config(tmp_path)
    resumed.train.steps = 3
    grpo.run(resumed, workdir)
    assert [r['step'] for r in logger.read_metrics(workdir)] == [0, 1, 2, 3]

