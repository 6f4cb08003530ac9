"""The GRPO stage: prompt/completion alignment (EOS trained), config errors, and a tiny run that resumes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.data import tasks
from dsjax.data.corpus import DataError
from dsjax.posttrain import grpo, losses, rollout
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


def test_batch_problems_are_fixed_per_batch_and_from_the_train_split():
    a = grpo.batch_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, index=5)
    assert a == grpo.batch_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, index=5)
    assert a != grpo.batch_problems(('arithmetic:2', 'countdown:3'), 6, seed=0, index=6)
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
        return None, None, rollout.decode.Generation(tokens=None, mask=mask, logprobs=None, key=None), texts

    monkeypatch.setattr(rollout, 'rollout', fake_rollout)
    m = rollout.evaluate(None, None, problems, ['p0', 'p1'], None, max_new_tokens=48, key=None, samples=3,
                         temperature=0.6, top_p=0.95)
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
    c.grpo.update(tasks=('arithmetic:1',), batch_size=8, num_generations=4, max_completion_length=6, eval_problems=8,
                  beta=0.01, num_iterations=2, eval_temperature=1.0)  # evaluation reuses the rollout's compile
    c.grpo.update(**grpo_fields)
    c.train.update(steps=4, eval_every=4, checkpoint_every=2, async_checkpoint=False)  # 2 batches of 2 updates
    c.optim.update(schedule='constant', warmup_steps=0)
    return c


@pytest.mark.parametrize('fields,match', [
    (dict(batch_size=12, num_generations=8), 'grpo.batch_size=12.*divisible by grpo.num_generations=8'),
    (dict(num_generations=1, batch_size=8), 'grpo.num_generations=1'),
    (dict(loss_type='mean'), 'grpo.loss_type'),
    (dict(reward_funcs=('accuracy', 'fame'), reward_weights=(1.0, 1.0)), "grpo.reward_funcs='fame'.*cannot import"),
    (dict(reward_funcs=('no_such_module:f',), reward_weights=(1.0,)), "grpo.reward_funcs='no_such_module:f'"),
    (dict(reward_weights=(1.0,)), 'grpo.reward_weights'),
    (dict(tasks=('arithmetic:9',)), 'grpo.tasks'),
    (dict(temperature=0.0), 'grpo.temperature'),
    (dict(eval_samples=4, eval_temperature=0.0), 'grpo.eval_samples=4'),
    (dict(eval_top_p=0.0), 'grpo.eval_top_p'),
    (dict(num_iterations=3), r'train.steps=4 .*multiple of grpo.num_iterations=3'),
])
def test_bad_config_is_named_before_anything_runs(tmp_path, fields, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        grpo.run(tiny_config(tmp_path, **fields), tmp_path / 'run')
    assert not (tmp_path / 'run').exists()


def test_tiny_run_finishes_and_resumes_exactly(tmp_path):
    """Two batches of two updates each, then a third batch resumed from step 4: the same as a run of
    six steps straight through (rollouts are a function of the state and the step)."""
    straight = tiny_config(tmp_path)
    straight.train.steps = 6
    grpo.run(straight, tmp_path / 'straight')
    workdir = tmp_path / 'run'
    last = grpo.run(tiny_config(tmp_path), workdir)
    for name in ('reward', 'reward_accuracy', 'reward_format', 'accuracy', 'format_rate', 'completion_len_mean',
                 'completion_len_max', 'zero_advantage_groups', 'solved_groups', 'hopeless_groups', 'kl',
                 'clip_fraction', 'entropy', 'gen_tokens_per_s', 'data_wait_frac', 'eval_accuracy',
                 'eval_format_rate'):
        assert np.isfinite(last[name]), name
    assert last['completion_len_max'] <= 6
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']  # optimizer steps
    resumed = tiny_config(tmp_path)
    resumed.train.steps = 6
    grpo.run(resumed, workdir)
    records, reference = logger.read_metrics(workdir), logger.read_metrics(tmp_path / 'straight')
    assert [r['step'] for r in records] == [r['step'] for r in reference] == [0, 1, 2, 3, 4, 5, 6]
    for got, want in zip(records, reference):
        for k in ('loss', 'grad_norm', 'reward', 'eval_accuracy'):
            if k in want:
                assert got[k] == want[k], (got['step'], k)



def test_moe_routing_bias_moves_under_grpo_as_under_pretraining():
    """GRPO's update ends in the loop's apply_gradients: the routing bias takes the step of
    auxiliary-loss-free balancing, b += rate * sign(mean load - load), from the policy's own load."""
    import flax.linen as nn
    from dsjax import sharding
    from dsjax.model.transformer import Transformer
    from dsjax.train import loop, optim
    from dsjax.train import step as step_lib
    from tests.conftest import TINY_MLA_MOE

    c = config_lib.base_config()
    c.model.update(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64, **TINY_MLA_MOE)
    c.train.bias_update_rate = 0.01
    c.grpo.update(max_completion_length=4, beta=0.0)
    model = Transformer(config_lib.freeze_model(c.model))
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        optimizer = optim.make_optimizer(c.optim)
        state = loop.build_state_fns(model, optimizer, mesh, 16)[0](jax.random.PRNGKey(0))
        rng = np.random.RandomState(0)
        prompt_BxW = rng.randint(3, 97, (8, 6)).astype(np.int32)
        tokens_BxN = rng.randint(3, 97, (8, 4)).astype(np.int32)
        batch = grpo.sequences(prompt_BxW, np.full(8, 6), tokens_BxN, np.ones((8, 4), bool), PAD)
        batch.update(completions=tokens_BxN, mask=np.ones((8, 4), bool), advantages=rng.randn(8).astype(np.float32))
        _, aux = model.apply(state.variables(), batch['inputs'], batch['positions'], batch['segment_ids'])
        expected = step_lib.update_routing_bias(state.buffers, aux['load'], 0.01)
        apply_gradients = step_lib.make_apply_gradients(optimizer, optim.make_schedule(c.optim), c.train)
        new_state, metrics = jax.jit(grpo.make_update_step(model, apply_gradients, c.grpo))(state, batch)
    moved = jax.tree.leaves(new_state.buffers['moe_bias'])
    assert all(np.abs(np.asarray(b)).max() == pytest.approx(0.01) for b in moved)  # every expert moved by gamma
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), new_state.buffers, expected)
    assert np.isfinite(float(metrics['maxvio_batch']))


USER_REWARD = '''
def closeness(prompts, completions, answer, **fields):
    """1 for the right number anywhere in the completion, less the further off the first number is."""
    out = []
    for completion, want in zip(completions, answer):
        digits = ''.join(ch if ch.isdigit() else ' ' for ch in completion).split()
        out.append(1.0 / (1 + abs(int(digits[0][:6]) - int(want))) if digits else 0.0)
    return out
'''


def _user_prompts(tmp_path, n=40):
    """A user's JSONL prompt set: questions as strings or conversations, each with the field its reward reads."""
    rows = []
    for i in range(n):
        question = f'What is {i} + {i % 7}?'
        prompt = {'prompt': question} if i % 2 else {'messages': [{'role': 'user', 'content': question}]}
        rows.append({**prompt, 'answer': str(i + i % 7)})
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return path


def test_prompt_set_rows_are_a_function_of_the_batch_index(tmp_path):
    c = tiny_config(tmp_path, source='jsonl', paths=(str(_user_prompts(tmp_path)),))
    c.data.val_fraction = 0.25
    prompts = grpo.PromptSet(c)
    assert 20 <= len(prompts.train) < 40 and 0 < len(prompts.eval) <= c.grpo.eval_problems
    assert isinstance(prompts.train[0]['prompt'], (str, list)) and 'answer' in prompts.train[0]
    assert prompts.batch(3, 5) == grpo.PromptSet(c).batch(3, 5)
    seen = [r['answer'] for i in range(len(prompts.train)) for r in prompts.batch(i, 1)]
    assert sorted(seen) == sorted(r['answer'] for r in prompts.train)  # each row once per epoch


@pytest.mark.parametrize('line,match', [
    ('{"question": "x"}', r'prompts.jsonl:1: expected an object with a "prompt" string or a "messages" list'),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', 'prompts.jsonl:1: "messages" must be a conversation '
                                                               'ending on a user turn'),
    ('not json', 'prompts.jsonl:1: not valid JSON'),
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, line, match):
    (tmp_path / 'prompts.jsonl').write_text(line + '\n')
    with pytest.raises(DataError, match=match):
        rollout.read_prompt_rows(tmp_path / 'prompts.jsonl')


def test_grpo_on_a_user_jsonl_prompt_set_with_a_reward_from_a_file_resumes(tmp_path):
    """TRL's way of working: the user's prompts, the user's reward function (a file outside the package,
    by import path), a built-in reward reading the rows' `answer` field; stopped after one batch, resumed."""
    reward_file = tmp_path / 'user_rewards.py'
    reward_file.write_text(USER_REWARD)
    fields = dict(source='jsonl', paths=(str(_user_prompts(tmp_path)),), template='chat', num_iterations=1,
                  reward_funcs=(f'{reward_file}:closeness', 'accuracy'), reward_weights=(1.0, 1.0))
    c = tiny_config(tmp_path, **fields)
    c.data.val_fraction = 0.25
    c.train.update(steps=1, checkpoint_every=1, eval_every=1)
    workdir = tmp_path / 'run'
    grpo.run(c, workdir)
    c.train.steps = 2
    last = grpo.run(c, workdir)
    assert [r['step'] for r in logger.read_metrics(workdir)] == [0, 1, 2]
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1', '2']
    for name in ('reward', f'reward_{reward_file}:closeness', 'reward_accuracy', 'eval_reward',
                 f'eval_reward_{reward_file}:closeness', 'eval_reward_accuracy', 'loss', 'grad_norm'):
        assert np.isfinite(last[name]), name
    assert 0 <= last[f'reward_{reward_file}:closeness'] <= 1
