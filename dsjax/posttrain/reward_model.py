"""The reward-model stage: a scalar head on the transformer, trained with Bradley-Terry on pairs.

Axis legend: P pairs, B rows, L length, D model width.

Run:  python -m dsjax.main --config=<experiment> --config.stage=reward --config.init.checkpoint=RUN --workdir=DIR
Pairs: for train-split problems of `reward.tasks`, the chosen answer is the worked solution and the
rejected one the same solution with a wrong final answer (a near miss) or without the think/answer
format; validation pairs come from the test split. Each pair is one batch row of shape [2, L]
(chosen, rejected), so pairs never split over devices or micro-batches. The loss is
-log sigmoid(r_chosen - r_rejected - margin), averaged over pairs; `pair_accuracy` is logged.

The reward is read at the last non-pad token of each sequence, from the final hidden state through
its own RMSNorm and a [D] head. The backbone's parameters keep the Transformer's names (shared
scope), so `init.checkpoint` (a pre-training or SFT run) loads straight into it.

As a GRPO reward: `ModelReward(run_dir)` is a `f(prompts, completions, **fields) -> scores [N]` callable;
`rewards.REWARDS['reward_model']` builds it from `grpo.reward_model`.
"""
import random

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax.config import ModelConfig
from dsjax.data import chat, tasks
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.corpus import DataError
from dsjax.infer import loading
from dsjax.model.layers import RMSNorm, param
from dsjax.model.transformer import Transformer
from dsjax.posttrain import losses, sft
from dsjax.train import checkpoint, loop
from dsjax.train import step as step_lib

HEAD_PARAMS = ('reward_norm', 'reward_head')


class RewardModel(nn.Module):
    """Transformer -> final hidden state at each row's last real token -> scalar reward [B]."""
    cfg: ModelConfig

    def setup(self):
        self.backbone = Transformer(self.cfg)
        nn.share_scope(self, self.backbone)
        self.reward_norm = RMSNorm(self.cfg)
        self.reward_head = param(self, 'reward_head', (self.cfg.hidden_size,), ('embed',), self.cfg)

    def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic: bool = True):
        _, aux = self.backbone(tokens_BxL, positions_BxL, segment_ids_BxL, deterministic=deterministic)
        b, length = tokens_BxL.shape
        real_BxL = jnp.ones((b, length), bool) if segment_ids_BxL is None else segment_ids_BxL != 0
        last_B = jnp.max(jnp.where(real_BxL, jnp.arange(length)[None, :], 0), axis=1)
        h_BxD = jnp.take_along_axis(aux['hidden'], last_B[:, None, None], axis=1)[:, 0]
        h_BxD = self.reward_norm(h_BxD).astype(jnp.float32)
        return h_BxD @ self.reward_head.astype(jnp.float32), aux


def near_miss(problem, rng: random.Random) -> str:
    """A wrong answer close to the right one: the value off by a little, or a countdown expression
    with one number changed."""
    if problem.task == 'countdown':
        expression = problem.answer
        numbers = [t for t in expression.replace('(', ' ').replace(')', ' ').split() if t.isdigit()]
        old = rng.choice(numbers)
        return expression.replace(old, str(int(old) + rng.choice((-1, 1, 2))), 1)
    value = int(problem.answer)
    return str(value + rng.choice((-10, -2, -1, 1, 2, 10)))


def preference_pair(problem, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) completions of one problem."""
    chosen = tasks.worked_solution(problem)
    if rng.random() < 0.25:
        rejected = f'{problem.answer}'  # right answer, no format
    else:
        wrong = near_miss(problem, rng)
        rejected = chosen.replace(f'<answer> {problem.answer} </answer>', f'<answer> {wrong} </answer>')
    return chosen, rejected


def pair_rows(tokenizer, problems, seq_len: int, seed: int) -> list[dict]:
    """One row per pair: inputs, positions, segment_ids [2, seq_len] (chosen, rejected), pair_weight."""
    rng = random.Random(seed)
    rows, dropped = [], 0
    for p in problems:
        seqs = [chat.tokenize_conversation(tokenizer, sft.conversation(p, c))[0] for c in preference_pair(p, rng)]
        if max(map(len, seqs)) > seq_len:
            dropped += 1
            continue
        rows.append(_pad_pair(seqs, seq_len))
    if dropped:
        logging.warning('Reward pairs: %d of %d longer than data.seq_len=%d were dropped', dropped, len(problems),
                        seq_len)
    if not rows:
        raise DataError(f'reward: no preference pair fits data.seq_len={seq_len}')
    return rows


def _pad_pair(seqs, seq_len: int, weight: float = 1.0) -> dict:
    tokens = np.zeros((2, seq_len), np.int32)
    segments = np.zeros((2, seq_len), np.int32)
    for k, s in enumerate(seqs):
        tokens[k, :len(s)] = s
        segments[k, :len(s)] = 1
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (2, 1))
    return {'inputs': tokens, 'positions': positions, 'segment_ids': segments,
            'pair_weight': np.float32(weight)}


def pair_batches(train: list[dict], val: list[dict], empty: dict, config, proc: dict):
    """This host's batches of pair rows: the training pairs shuffled and repeated (a grain MapDataset of
    batches: batch i is `dataset[i]`), and up to train.eval_batches fixed validation batches, the last
    filled with `empty` (pair_weight 0)."""
    d = config.data
    per_host = d.batch_size // proc['process_count']
    mine = train[proc['process_index']::proc['process_count']] or train
    train_batches = grain.MapDataset.source(mine).shuffle(seed=d.shuffle_seed).repeat().batch(per_host,
                                                                                              batch_fn=_stack)
    val = val[:config.train.eval_batches * d.batch_size]
    val += [empty] * (-len(val) % d.batch_size)
    start = proc['process_index'] * per_host
    return train_batches, [_stack(val[b:b + d.batch_size][start:start + per_host])
                           for b in range(0, len(val), d.batch_size)]


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def score_pairs(model, variables, batch, deterministic=True, rng=None):
    """Rewards of the chosen and rejected rows [P] each, and the model's aux."""
    p, two, length = batch['inputs'].shape
    flat = {k: batch[k].reshape(p * two, length) for k in ('inputs', 'positions', 'segment_ids')}
    rewards_B, aux = model.apply(variables, flat['inputs'], flat['positions'], flat['segment_ids'],
                                 deterministic=deterministic, rngs=None if rng is None else {'dropout': rng})
    rewards_Px2 = rewards_B.reshape(p, two)
    return rewards_Px2[:, 0], rewards_Px2[:, 1], aux


def make_loss_fn(model, margin: float):
    """Bradley-Terry loss_fn for `make_accumulating_step` (normaliser: the number of pairs)."""

    def loss_fn(params, buffers, batch, num_pairs, rng):
        chosen_P, rejected_P, aux = score_pairs(model, {'params': params, **buffers}, batch, False, rng)
        w_P = batch['pair_weight']
        bt = (losses.bradley_terry(chosen_P, rejected_P, margin) * w_P).sum() / jnp.maximum(num_pairs, 1.0)
        accuracy = (losses.pairwise_accuracy(chosen_P, rejected_P) * w_P).sum() / jnp.maximum(num_pairs, 1.0)
        share = w_P.sum() / jnp.maximum(num_pairs, 1.0)
        metrics = {'pair_accuracy': accuracy, 'reward_margin': ((chosen_P - rejected_P) * w_P).sum()
                   / jnp.maximum(num_pairs, 1.0), 'balance_loss': share * aux['balance_loss']}
        return bt + share * aux['balance_loss'], (metrics, aux['load'])

    return loss_fn


def make_eval_step(model, margin: float):
    def eval_step(state, batch):
        chosen_P, rejected_P, _ = score_pairs(model, state.variables(), batch)
        w_P = batch['pair_weight']
        return {'bt_sum': (losses.bradley_terry(chosen_P, rejected_P, margin) * w_P).sum(),
                'correct_sum': (losses.pairwise_accuracy(chosen_P, rejected_P) * w_P).sum(), 'pairs': w_P.sum()}

    return eval_step


def summarize(totals) -> dict:
    """Validation Bradley-Terry loss and pairwise accuracy over every validation pair."""
    pairs = max(float(totals['pairs']), 1.0)
    return {'val_loss': float(totals['bt_sum']) / pairs, 'val_pair_accuracy': float(totals['correct_sum']) / pairs}


def start_from(path, model_cfg, abstract_state):
    """The backbone from a previous stage's checkpoint (params without the reward head, which keeps its
    initialisation) and its routing bias (None if it has none)."""
    backbone = {k: v for k, v in abstract_state.params.items() if k not in HEAD_PARAMS}
    restored = checkpoint.restore_subtrees(path, {'params': backbone, 'buffers': abstract_state.buffers})
    return restored['params'], restored.get('buffers')


def validate_pairs(config, section: str) -> None:
    """Raises ConfigError naming the first bad field of a section of preference pairs (reward, dpo)."""
    s = config[section]
    config_lib.parse_task_entries(s.tasks, f'{section}.tasks')
    for f in ('pairs', 'val_pairs'):
        if not (isinstance(s[f], int) and s[f] > 0):
            config_lib.fail(f'{section}.{f}', s[f], 'must be a positive integer')


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `reward.*` field (`num_devices`: the stage-check interface's)."""
    del num_devices
    validate_pairs(config, 'reward')
    if config.model.num_nextn_predict_layers:
        config_lib.fail('model.num_nextn_predict_layers', config.model.num_nextn_predict_layers,
                        'a reward model has no use for MTP: set it to 0')


def build_stage(setup: loop.Setup) -> loop.Stage:
    """The loop's Stage for reward modelling; data.batch_size counts pairs."""
    config, proc = setup.config, setup.proc
    r, d = config.reward, config.data
    model = RewardModel(setup.model_cfg)
    train = pair_rows(setup.tokenizer, tasks.task_problems(r.tasks, 'train', r.pairs, r.seed, 'reward.tasks'),
                      d.seq_len, r.seed)
    val = pair_rows(setup.tokenizer, tasks.task_problems(r.tasks, 'test', r.val_pairs, r.seed, 'reward.tasks'),
                    d.seq_len, r.seed + 1)
    train_batches, eval_batches = pair_batches(train, val, _pad_pair([[], []], d.seq_len, 0.0), config, proc)
    step = step_lib.make_accumulating_step(make_loss_fn(model, r.margin), setup.apply_gradients,
                                           config.train.micro_batches, normaliser='pair_weight')
    return loop.Stage(model=model, train_step=step, train_iter=iter(train_batches), eval_step=make_eval_step(model, r.margin),
                      eval_batches=eval_batches, summarize=summarize, start_from=start_from)


def run(config, workdir, devices=None) -> dict:
    """Trains the reward model in `workdir`; returns the last logged metrics."""
    return loop.run(config, workdir, devices, build_stage=build_stage, validate=validate)


class ModelReward:
    """A trained reward model as a GRPO reward function: f(prompts, completions, **fields) -> scores [N].

    Each (prompt, completion) is rendered as the chat conversation the model was trained on; scores
    are computed in batches of `batch` rows padded to `width` tokens (one compile).
    """

    def __init__(self, run_dir, *, batch: int = 64, width: int | None = None):
        self.loaded = _load_reward_model(run_dir)
        self.model = RewardModel(self.loaded.cfg)
        self.batch = batch
        self.width = width or min(self.loaded.cfg.max_position_embeddings, 256)
        self._score = jax.jit(lambda v, t, p, s: self.model.apply(v, t, p, s)[0])

    def __call__(self, prompts, completions, **fields) -> np.ndarray:
        del fields
        tok = self.loaded.tokenizer
        seqs = []
        for prompt, c in zip(prompts, completions):
            messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)
            seqs.append(chat.tokenize_conversation(tok, messages + [{'role': 'assistant', 'content': c.strip()}])[0]
                        [-self.width:])
        scores = []
        for start in range(0, len(seqs), self.batch):
            chunk = seqs[start:start + self.batch]
            tokens = np.zeros((self.batch, self.width), np.int32)
            segments = np.zeros((self.batch, self.width), np.int32)
            for k, s in enumerate(chunk):
                tokens[k, :len(s)], segments[k, :len(s)] = s, 1
            segments[len(chunk):, 0] = 1  # padding rows score something finite, then are dropped
            positions = np.tile(np.arange(self.width, dtype=np.int32), (self.batch, 1))
            scores.append(np.asarray(self._score(self.loaded.variables, tokens, positions, segments))[:len(chunk)])
        return np.concatenate(scores).astype(np.float32)


def _load_reward_model(run_dir) -> loading.Loaded:
    """A reward run's model config, variables (backbone + head) and tokenizer, on one device."""
    run = checkpoint.read_run(run_dir, what='grpo.reward_model', module=RewardModel)
    return loading.Loaded(run.model_cfg, run.variables, tokenizer_lib.get_tokenizer(run.config.data))
