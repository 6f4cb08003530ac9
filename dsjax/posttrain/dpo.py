"""Direct Preference Optimization, as DeepSeek-LLM Chat was aligned after SFT (DeepSeek-LLM paper 5.2).

Run:  python -m dsjax.main --config=<experiment> --config.stage=dpo --config.init.checkpoint=SFT_RUN --workdir=DIR
Axis legend: P preference pairs, L length, V vocab.

For a prompt x with a chosen answer y_w and a rejected one y_l, and the frozen reference policy pi_ref
(the model DPO starts from, which the loop hands over once: `Stage.reference`):

    L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

with each log pi(y|x) summed over the answer's tokens. It is Bradley-Terry on the implicit rewards
beta * (log pi - log pi_ref), so `losses.bradley_terry` computes it. The paper's settings: one epoch at
lr 5e-6, batch 512 pairs, warm-up then cosine; beta 0.1 (TRL's default; the paper does not state it).

Pairs: the reward stage's (`reward_model.preference_pair`): for train-split problems of `dpo.tasks` the
worked solution against a near miss or an unformatted answer; validation pairs from the test split. A
batch row is one pair [2, L] (chosen, rejected), so pairs never split over devices or micro-batches.
Batches come from a batch source that adds the reference's log-probs (one forward pass per batch) and is
a function of the step, so a resume draws the same pairs. Logged: `reward_accuracy` (TRL's
rewards/accuracies: chosen's implicit reward above rejected's; 0.5 at step 0, where pi = pi_ref) and
`val_preference_accuracy` (the policy alone ranks chosen above rejected by log-likelihood: comparable
before and after the stage).
"""
import random

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.data import chat, tasks
from dsjax.data.corpus import DataError
from dsjax.model.transformer import Transformer
from dsjax.posttrain import losses, reward_model, sft
from dsjax.train import loop
from dsjax.train import step as step_lib

REFERENCE = ('ref_chosen', 'ref_rejected')


def sequence_logprobs(logits_BxLxV, targets_BxL, weights_BxL):
    """sum over the weighted (answer) positions of log softmax(logits)[target], per row [B], float32."""
    return (losses.token_logprobs(logits_BxLxV, targets_BxL) * weights_BxL).sum(axis=-1)


def dpo_loss(chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, beta: float):
    """Per-pair DPO loss [P] and the implicit rewards beta * (log pi - log pi_ref) of both answers [P]."""
    chosen_reward_P = beta * (chosen_P - ref_chosen_P)
    rejected_reward_P = beta * (rejected_P - ref_rejected_P)
    return losses.bradley_terry(chosen_reward_P, rejected_reward_P), chosen_reward_P, rejected_reward_P


def preference_accuracy(chosen_P, rejected_P, ref_chosen_P=None, ref_rejected_P=None):
    """Share of pairs [P] whose chosen answer the policy ranks higher: by log-likelihood, or with the
    reference's log-probs given, by implicit reward (TRL's `rewards/accuracies`)."""
    if ref_chosen_P is not None:
        chosen_P, rejected_P = chosen_P - ref_chosen_P, rejected_P - ref_rejected_P
    return losses.pairwise_accuracy(chosen_P, rejected_P)


def pair_rows(tokenizer, problems, seq_len: int, seed: int) -> list[dict]:
    """One row per pair: chat.FIELDS [2, seq_len] (chosen, rejected; weights on the answer tokens) and
    pair_weight 1. Pairs longer than seq_len + 1 tokens are dropped."""
    rng = random.Random(seed)
    rows = []
    for p in problems:
        answers = [chat.tokenize_conversation(tokenizer, sft.conversation(p, c))
                   for c in reward_model.preference_pair(p, rng)]
        packed = [chat.pack_examples([a], seq_len)[0] for a in answers]
        if all(packed):
            rows.append({**{k: np.stack([packed[0][0][k], packed[1][0][k]]) for k in chat.FIELDS},
                         'pair_weight': np.float32(1.0)})
    if not rows:
        raise DataError(f'dpo: no preference pair fits data.seq_len={seq_len}')
    return rows


def _empty_pair(seq_len: int) -> dict:
    row = chat.empty_row(seq_len)
    return {**{k: np.stack([v, v]) for k, v in row.items()}, 'pair_weight': np.float32(0.0)}


def pair_logprobs(model, variables, batch, deterministic=True, rng=None):
    """log pi of the chosen and the rejected answers [P] each, and the model's aux."""
    p, two, length = batch['inputs'].shape
    flat = {k: batch[k].reshape(p * two, length) for k in chat.FIELDS}
    logits, aux = step_lib._apply(model, variables['params'], {k: v for k, v in variables.items() if k != 'params'},
                                  flat, deterministic, rng)
    logp_Px2 = sequence_logprobs(logits, flat['targets'], flat['weights']).reshape(p, two)
    return logp_Px2[:, 0], logp_Px2[:, 1], aux


def make_loss_fn(model, beta: float):
    """DPO loss_fn for `make_accumulating_step` (normaliser: the number of pairs); the batch carries the
    reference's log-probs (REFERENCE)."""

    def loss_fn(params, buffers, batch, num_pairs, rng):
        chosen_P, rejected_P, aux = pair_logprobs(model, {'params': params, **buffers}, batch, False, rng)
        per_pair_P, chosen_reward_P, rejected_reward_P = dpo_loss(chosen_P, rejected_P, batch['ref_chosen'],
                                                                  batch['ref_rejected'], beta)
        w_P = batch['pair_weight'] / jnp.maximum(num_pairs, 1.0)
        share = w_P.sum()
        metrics = {'dpo_loss': (per_pair_P * w_P).sum(),
                   'reward_accuracy': (losses.pairwise_accuracy(chosen_reward_P, rejected_reward_P) * w_P).sum(),
                   'chosen_reward': (chosen_reward_P * w_P).sum(), 'rejected_reward': (rejected_reward_P * w_P).sum(),
                   'balance_loss': share * aux['balance_loss']}
        return (per_pair_P * w_P).sum() + share * aux['balance_loss'], (metrics, aux['load'])

    return loss_fn


def make_eval_sums(model, beta: float):
    """(variables, batch with REFERENCE) -> sums over the batch's pairs: DPO loss, implicit-reward accuracy,
    log-likelihood preference accuracy, pairs."""

    def eval_sums(variables, batch):
        chosen_P, rejected_P, _ = pair_logprobs(model, variables, batch)
        per_pair_P, chosen_reward_P, rejected_reward_P = dpo_loss(chosen_P, rejected_P, batch['ref_chosen'],
                                                                  batch['ref_rejected'], beta)
        w_P = batch['pair_weight']
        return jnp.stack([(per_pair_P * w_P).sum(), (losses.pairwise_accuracy(chosen_reward_P, rejected_reward_P)
                                                     * w_P).sum(),
                          (losses.pairwise_accuracy(chosen_P, rejected_P) * w_P).sum(), w_P.sum()])

    return eval_sums


class Preferences:
    """The stage's batches and its evaluation, both of which need the frozen reference (`set_reference`)."""

    def __init__(self, model, train_rows, val_rows, config, mesh, proc):
        self.mesh = mesh
        self.train, self.val = reward_model.pair_batches(train_rows, val_rows, _empty_pair(config.data.seq_len),
                                                         config, proc)
        self.reference = None
        self._logprobs = jax.jit(lambda variables, batch: pair_logprobs(model, variables, batch)[:2])
        self._eval_sums = jax.jit(make_eval_sums(model, float(config.dpo.beta)))

    def set_reference(self, variables) -> None:
        self.reference = variables

    def _with_reference(self, host_batch) -> dict:
        batch = sharding.global_batch(host_batch, self.mesh)
        return {**batch, **dict(zip(REFERENCE, self._logprobs(self.reference, batch)))}

    def batch_source(self, state, step: int):
        """Batch `step` of the shuffled, repeated pairs, with the reference's log-probs (a function of the
        step: a resume draws the same pairs)."""
        del state
        return self._with_reference(self.train[step]), {}

    def evaluate(self, state) -> dict:
        """Validation DPO loss, implicit-reward accuracy and log-likelihood preference accuracy."""
        sums = sum(np.asarray(jax.device_get(self._eval_sums(state.variables(), self._with_reference(b))))
                   for b in self.val)
        pairs = max(float(sums[3]), 1.0)
        return {'val_loss': float(sums[0]) / pairs, 'val_reward_accuracy': float(sums[1]) / pairs,
                'val_preference_accuracy': float(sums[2]) / pairs}


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `dpo.*` field (`num_devices`: the stage-check interface's)."""
    del num_devices
    reward_model.validate_pairs(config, 'dpo')
    if not config.dpo.beta > 0:
        config_lib.fail('dpo.beta', config.dpo.beta, 'must be > 0 (the paper: 0.1)')


def build_stage(setup: loop.Setup) -> loop.Stage:
    """The loop's Stage for DPO; data.batch_size counts pairs."""
    config = setup.config
    p, d = config.dpo, config.data
    model = Transformer(setup.model_cfg)
    train = pair_rows(setup.tokenizer, tasks.task_problems(p.tasks, 'train', p.pairs, p.seed, 'dpo.tasks'),
                      d.seq_len, p.seed)
    val = pair_rows(setup.tokenizer, tasks.task_problems(p.tasks, 'test', p.val_pairs, p.seed, 'dpo.tasks'),
                    d.seq_len, p.seed + 1)
    prefs = Preferences(model, train, val, config, setup.mesh, setup.proc)
    step = step_lib.make_accumulating_step(make_loss_fn(model, float(p.beta)), setup.apply_gradients,
                                           config.train.micro_batches, normaliser='pair_weight')
    return loop.Stage(model=model, train_step=step, batch_source=prefs.batch_source, evaluate=prefs.evaluate,
                      reference=prefs.set_reference)


def run(config, workdir, devices=None) -> dict:
    """Aligns the policy of `init.checkpoint` with DPO in `workdir`; returns the last logged metrics."""
    return loop.run(config, workdir, devices, build_stage=build_stage, validate=validate)
