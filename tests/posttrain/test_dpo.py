"""DPO (dsjax/posttrain/dpo.py): the loss and its gradient against the formula, and against TRL's sigmoid loss
re-derived in numpy from its source (trl 1.16.0, trl/trainer/dpo_trainer.py, DPOTrainer's loss: logps summed over
the completion tokens, `chosen_logratios = chosen_logps - ref_chosen_logps` (rejected alike), `delta_score =
chosen_logratios - rejected_logratios`, `per_sequence_loss = -F.logsigmoid(self.beta * delta_score)`, `loss =
per_sequence_loss.mean()`, `chosen_rewards = beta * chosen_logratios`). TRL itself needs accelerate, datasets and
pandas, so it is not installed for this one function."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsjax import presets, stages
from dsjax.posttrain import dpo
from dsjax.train import logger

REPO_FILE = __file__.replace('tests/posttrain/test_dpo.py', 'experiments/x.py')

RNG = np.random.default_rng(0)
P = 6
CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = (RNG.normal(-20.0, 5.0, P).astype(np.float32) for _ in range(4))


def trl_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL's DPO sigmoid loss (reverse KL, no label smoothing) in float64 numpy: (loss, chosen_rewards,
    rejected_rewards, reward accuracy)."""
    chosen, rejected, ref_chosen, ref_rejected = (np.asarray(x, np.float64) for x in
                                                   (chosen, rejected, ref_chosen, ref_rejected))
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    per_sequence = np.logaddexp(0.0, -beta * delta)  # -log sigmoid(beta * delta)
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return per_sequence.mean(), chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).mean()


@pytest.mark.parametrize('beta', [0.1, 0.5])
def test_loss_matches_trl(beta):
    per_pair, chosen_rewards, rejected_rewards = dpo.dpo_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    loss, want_chosen, want_rejected, accuracy = trl_sigmoid_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta)
    assert float(per_pair.mean()) == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(chosen_rewards, want_chosen, rtol=1e-5)
    np.testing.assert_allclose(rejected_rewards, want_rejected, rtol=1e-5)
    got_accuracy = dpo.preference_accuracy(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED).mean()
    assert float(got_accuracy) == pytest.approx(accuracy)


def test_loss_and_gradient_by_hand():
    """One pair: Delta = (-10 - -12) - (-11 - -10) = 3, beta 0.1: loss = log(1 + e^-0.3) = 0.5544; the
    gradient is -beta sigmoid(-beta Delta) = -0.1 x 0.42556 on log pi(y_w) and +0.042556 on log pi(y_l), none on
    the reference."""
    args = [jnp.asarray([x]) for x in (-10.0, -11.0, -12.0, -10.0)]
    loss = lambda *a: dpo.dpo_loss(*a, beta=0.1)[0].sum()
    assert float(loss(*args)) == pytest.approx(np.log1p(np.exp(-0.3)), rel=1e-6)
    grads = jax.grad(loss, argnums=(0, 1))(*args)
    s = 1 / (1 + np.exp(0.3))
    assert float(grads[0][0]) == pytest.approx(-0.1 * s, rel=1e-5)
    assert float(grads[1][0]) == pytest.approx(0.1 * s, rel=1e-5)
    # Equal log-ratios: loss log 2 whatever beta.
    even = [jnp.asarray([x]) for x in (-3.0, -5.0, -1.0, -3.0)]
    assert float(loss(*even)) == pytest.approx(np.log(2.0), rel=1e-6)


def test_sequence_logprobs_sum_the_answer_tokens():
    logits = jnp.asarray(RNG.normal(size=(2, 4, 7)), jnp.float32)
    targets = jnp.asarray([[1, 2, 3, 4], [5, 6, 0, 0]])
    weights = jnp.asarray([[0, 0, 1, 1], [1, 1, 0, 0]], jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = [logp[0, 2, 3] + logp[0, 3, 4], logp[1, 0, 5] + logp[1, 1, 6]]
    np.testing.assert_allclose(dpo.sequence_logprobs(logits, targets, weights), want, rtol=1e-6)


def _stage(name: str, steps: int):
    c = presets.load_experiment(REPO_FILE, 'llm_small', 'smoke')
    c.stage = name
    c.sft.update(source='cold_start', tasks=('arithmetic:1',), examples=64, val_examples=8)
    c.dpo.update(tasks=('arithmetic:1',), pairs=64, val_pairs=16)
    c.data.seq_len = 64
    c.model.max_position_embeddings = 128
    c.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, async_checkpoint=False)
    c.optim.update(lr=3e-3, warmup_steps=0, decay_steps=steps, schedule='constant')
    return c


def test_dpo_stage_in_a_chain_after_sft(tmp_path):
    """SFT, then DPO from it: DPO's first step sees pi = pi_ref (the loop's frozen reference), so its loss is
    exactly log 2 and its implicit-reward accuracy 0.5 (all ties); training on the pairs then ranks the
    held-out pairs' chosen answers above the rejected ones more often than the reference did."""
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('sft', 'dpo')
    c.stages = ml_collections.ConfigDict({'sft': _stage('sft', 4), 'dpo': _stage('dpo', 12)})
    c.stages.sft.init.checkpoint = 'scratch'
    c.stages.dpo.train.micro_batches = 2  # 16 pairs in micro-batches of 8 (a pair per device)
    c.stages.dpo.data.batch_size = 16
    stages.run(c, tmp_path)
    records = logger.read_metrics(tmp_path / 'dpo')
    first = next(r for r in records if r['step'] == 1)
    assert first['dpo_loss'] == pytest.approx(np.log(2.0), rel=1e-5)
    assert first['reward_accuracy'] == pytest.approx(0.5)
    evals = [r for r in records if 'val_preference_accuracy' in r]
    assert [r['step'] for r in evals] == [0, 12]
    before, after = evals
    assert before['val_reward_accuracy'] == pytest.approx(0.5) and before['val_loss'] == pytest.approx(np.log(2.0))
    assert after['val_loss'] < before['val_loss']
    assert after['val_preference_accuracy'] > before['val_preference_accuracy']
