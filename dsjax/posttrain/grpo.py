"""The GRPO stage (R1-Zero, and R1's reasoning RL), trained by the one loop (dsjax/train/loop.py).

Axis legend: B completions per batch (P prompts x G), W prompt width, N completion tokens
(max_completion_length), T = W + N, V vocab.

`Rollouts` is the stage's batch source. Each batch, read top to bottom in `Rollouts.__call__`:
1. P prompt rows (`PromptSet`: generated task problems, or a user's JSONL rows), a function of (seed,
   batch index) so a resumed run sees the same ones; each G times.
2. G completions per prompt from the current policy at temperature T, a fresh PRNG key per batch
   (dsjax/posttrain/rollout.py).
3. Rewards r = sum_k w_k f_k (dsjax/posttrain/rewards.py) -> group-normalised advantages.
4. Log-probs of the frozen reference (the step-0 policy, which the loop hands over) once per batch.
The loop then takes `num_iterations` optimizer steps of the clipped objective on it (above one, the
ratio uses the log-probs stored at rollout); train.steps counts optimizer steps, as for every stage.
Field names follow TRL's GRPOConfig (README).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.data import chat, tasks
from dsjax.data.corpus import DataError
from dsjax.infer.sampling import SamplingConfig
from dsjax.model.transformer import Transformer
from dsjax.posttrain import losses, rewards, rollout
from dsjax.train import loop


SOURCES = ('tasks', 'jsonl')
# grpo.loss_type (TRL's names) -> the aggregation of per-token losses (posttrain/losses.py).
LOSS_TYPES = {'grpo': 'seq-mean-token-mean', 'dapo': 'token-mean', 'dr_grpo': 'seq-mean-token-sum-norm'}


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `grpo.*` field (or train.* field GRPO constrains)."""
    g = config.grpo
    if g.source not in SOURCES:
        config_lib.fail('grpo.source', g.source, f'must be one of {SOURCES}')
    if g.source == 'tasks':
        config_lib.parse_task_entries(g.tasks, 'grpo.tasks')
    elif not g.paths or not all(isinstance(p, str) and p for p in g.paths):
        config_lib.fail('grpo.paths', g.paths, "grpo.source='jsonl' needs one or more JSONL prompt files")
    if g.template not in rollout.TEMPLATES:
        config_lib.fail('grpo.template', g.template, f'must be one of {rollout.TEMPLATES}')
    for f in ('batch_size', 'num_generations', 'max_completion_length', 'num_iterations', 'eval_problems',
              'eval_samples'):
        if not (isinstance(g[f], int) and g[f] > 0):
            config_lib.fail(f'grpo.{f}', g[f], 'must be a positive integer')
    if g.batch_size % g.num_generations:
        config_lib.fail('grpo.batch_size', g.batch_size, 'must be divisible by grpo.num_generations='
                        f'{g.num_generations} (each prompt gets a group of G completions)')
    if g.num_generations < 2:
        config_lib.fail('grpo.num_generations', g.num_generations,
                        'must be >= 2: advantages compare completions in a group')
    sizes = config_lib.mesh_shape(config.mesh, num_devices)
    shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
    if g.batch_size % shards:
        config_lib.fail('grpo.batch_size', g.batch_size, f'must be divisible by the data-parallel size {shards}')
    if not g.temperature > 0:
        config_lib.fail('grpo.temperature', g.temperature, 'must be > 0: a group of greedy completions is one answer')
    for f in ('top_p', 'eval_top_p'):
        if not 0 < g[f] <= 1:
            config_lib.fail(f'grpo.{f}', g[f], 'must be in (0, 1]')
    if g.eval_temperature < 0:
        config_lib.fail('grpo.eval_temperature', g.eval_temperature, 'must be >= 0 (0 is greedy)')
    if g.eval_samples > 1 and not g.eval_temperature:
        config_lib.fail('grpo.eval_samples', g.eval_samples, 'must be 1 with greedy evaluation '
                        '(grpo.eval_temperature=0): every sample would be the same')
    for f in ('beta', 'epsilon_high', 'overlong_buffer'):
        if g[f] < 0:
            config_lib.fail(f'grpo.{f}', g[f], 'must be >= 0')
    if not 0 <= g.epsilon < 1:
        config_lib.fail('grpo.epsilon', g.epsilon, 'must be in [0, 1)')
    if not g.eps_std > 0:
        config_lib.fail('grpo.eps_std', g.eps_std, 'must be > 0')
    if g.loss_type not in LOSS_TYPES:
        config_lib.fail('grpo.loss_type', g.loss_type, f'must be one of {tuple(LOSS_TYPES)}')
    if not g.reward_funcs or len(g.reward_funcs) != len(g.reward_weights):
        config_lib.fail('grpo.reward_weights', g.reward_weights,
                        f'needs one weight per reward in grpo.reward_funcs={tuple(g.reward_funcs)}')
    for name in g.reward_funcs:
        if name not in rewards.REWARDS:
            rewards.import_function(name)  # fails naming grpo.reward_funcs if it cannot
    for f in ('steps', 'checkpoint_every'):
        if config.train[f] % g.num_iterations:
            config_lib.fail(f'train.{f}', config.train[f], f'must be a multiple of grpo.num_iterations='
                            f'{g.num_iterations}: it counts optimizer steps, and checkpoints fall between batches')


def batch_problems(entries, n: int, seed: int, index: int) -> list[tasks.Problem]:
    """The `n` training problems of batch `index`, dealt over the task:level entries in turn."""
    parsed = config_lib.parse_task_entries(entries, 'grpo.tasks')
    counts = [len(range(i, n, len(parsed))) for i in range(len(parsed))]
    per_entry = [tasks.make_problems(t, 'train', c, level=lv, seed=seed * 1_000_003 + index)
                 for (t, lv), c in zip(parsed, counts)]
    return [per_entry[i % len(parsed)][i // len(parsed)] for i in range(n)]


class PromptSet:
    """The prompt rows GRPO trains and evaluates on: generated task problems (train split to train, test
    split to evaluate), or the rows of a user's JSONL files (held out by a hash, as data.val_fraction says)."""

    def __init__(self, config):
        g, self.seed = config.grpo, config.train.seed
        self.source, self.tasks = g.source, g.tasks
        if g.source == 'tasks':
            self.eval = rollout.task_rows(tasks.task_problems(g.tasks, 'test', g.eval_problems, 0, 'grpo.tasks'))
            return
        rows = [row for path in g.paths for row in rollout.read_prompt_rows(path)]
        held_out = [chat.held_out(row, config.data.val_fraction) for row in rows]
        self.train = [row for row, h in zip(rows, held_out) if not h]
        self.eval = [row for row, h in zip(rows, held_out) if h][:g.eval_problems]
        if not self.train or not self.eval:
            raise DataError(f'grpo.paths: of {len(rows)} prompt rows, {len(self.train)} are for training and '
                            f'{len(self.eval)} held out (data.val_fraction={config.data.val_fraction}); each '
                            'needs at least one')

    def batch(self, index: int, n: int) -> list[dict]:
        """The `n` prompt rows of batch `index`: fresh problems, or the JSONL rows in an order reshuffled
        every epoch; a function of (seed, index), so a resumed run sees the same ones."""
        if self.source == 'tasks':
            return rollout.task_rows(batch_problems(self.tasks, n, self.seed, index))
        rows = []
        for position in range(index * n, (index + 1) * n):
            epoch, offset = divmod(position, len(self.train))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
            rows.append(self.train[order[offset]])
        return rows


def sequences(prompt_BxW, lengths_B, tokens_BxN, mask_BxN, pad_id: int) -> dict:
    """Each row's prompt followed by its completion, as one teacher-forced input.

    Row b holds its prompt at positions 0..len_b-1 and completion token j at len_b + j; the segment id
    is 1 on the prompt and the completion's tokens (EOS included), 0 on padding.
    Returns inputs, positions, segment_ids [B, T] and lengths [B] (numpy).
    """
    b, w = prompt_BxW.shape
    n = tokens_BxN.shape[1]
    t_1xT = np.arange(w + n)[None, :]
    j_BxT = t_1xT - lengths_B[:, None]
    in_prompt = t_1xT < lengths_B[:, None]
    in_completion = (j_BxT >= 0) & (j_BxT < n)
    j_clipped = np.clip(j_BxT, 0, n - 1)
    completion_BxT = np.take_along_axis(tokens_BxN, j_clipped, axis=1)
    real_BxT = in_prompt | (in_completion & np.take_along_axis(mask_BxN, j_clipped, axis=1))
    inputs = np.where(in_prompt, prompt_BxW[:, np.minimum(t_1xT[0], w - 1)], completion_BxT)
    return {'inputs': np.where(real_BxT, inputs, pad_id).astype(np.int32),
            'positions': np.broadcast_to(t_1xT, (b, w + n)).astype(np.int32),
            'segment_ids': real_BxT.astype(np.int32),
            'lengths': lengths_B.astype(np.int32)}


def completion_logits(logits_BxTxV, lengths_B, n: int):
    """The logits that predict completion tokens 0..n-1: those at positions len_b - 1 + j, [B, N, V]."""
    index_BxN = lengths_B[:, None] - 1 + jnp.arange(n)[None, :]
    return jnp.take_along_axis(logits_BxTxV, index_BxN[..., None], axis=1)


def make_logprob_fn(model, n: int, temperature: float):
    """(variables, batch) -> log pi(completion tokens) [B, N] at temperature T (the reference pass)."""

    def logprobs(variables, batch):
        logits, _ = model.apply(variables, batch['inputs'], batch['positions'], batch['segment_ids'])
        return losses.token_logprobs(completion_logits(logits, batch['lengths'], n), batch['completions'],
                                     temperature)

    return logprobs


def make_update_step(model, apply_gradients, g):
    """Returns update(state, batch) -> (state, metrics): one optimizer step on the GRPO objective (plus
    the policy's MoE balance loss), ending in the loop's `apply_gradients` (clip, AdamW, routing bias,
    non-finite policy).

    batch: inputs, positions, segment_ids [B, T]; lengths, advantages [B]; completions, mask [B, N];
    ref_logprobs [B, N] when beta > 0; old_logprobs [B, N] when num_iterations > 1.
    """
    n = g.max_completion_length

    def update(state, batch):
        def loss_fn(params):
            logits, aux = model.apply({'params': params, **state.buffers}, batch['inputs'], batch['positions'],
                                      batch['segment_ids'])
            logits_BxNxV = completion_logits(logits, batch['lengths'], n)
            logp_BxN = losses.token_logprobs(logits_BxNxV, batch['completions'], g.temperature)
            old_BxN = batch['old_logprobs'] if g.num_iterations > 1 else jax.lax.stop_gradient(logp_BxN)
            loss, stats = losses.grpo_loss(
                logp_BxN, old_BxN, batch.get('ref_logprobs'), batch['advantages'], batch['mask'],
                eps_low=g.epsilon, eps_high=g.epsilon_high, beta=g.beta, mode=LOSS_TYPES[g.loss_type], max_len=n)
            entropy_BxN = losses.token_entropy(jax.lax.stop_gradient(logits_BxNxV), g.temperature)
            stats['entropy'] = losses.aggregate(entropy_BxN, batch['mask'], 'token-mean')
            return loss + aux['balance_loss'], (stats, aux['load'])

        (loss, (stats, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state, metrics = apply_gradients(state, grads, loss, load)
        return state, {'loss': loss, **metrics, **stats}

    return update


def group_health(correct_B, group_size: int) -> dict:
    """Fractions of groups all of whose completions are correct (solved) and none (hopeless)."""
    correct_PxG = np.asarray(correct_B, bool).reshape(-1, group_size)
    return {'solved_groups': float(correct_PxG.all(1).mean()), 'hopeless_groups': float((~correct_PxG).all(1).mean())}


class Rollouts:
    """GRPO's batch source for the loop, `(state, step) -> (batch, metrics)`, with the held-out evaluation
    (`evaluate(state)`) and the reference policy the loop hands over (`set_reference`)."""

    def __init__(self, setup: loop.Setup, model):
        config = setup.config
        self.g, self.seed, self.mesh, self.tokenizer = config.grpo, config.train.seed, setup.mesh, setup.tokenizer
        self.model_cfg = setup.model_cfg
        self.shards = int(np.prod([setup.mesh.shape[a] for a in sharding.BATCH_AXES]))
        self.prompts = PromptSet(config)
        self.rewards = rewards.build(config, setup.tokenizer)
        self.sampling = SamplingConfig(temperature=self.g.temperature, top_p=self.g.top_p)
        self.ref_logprobs = jax.jit(make_logprob_fn(model, self.g.max_completion_length, self.g.temperature))
        self.reference = None

    def set_reference(self, variables) -> None:
        """Keeps the step-0 policy's variables for the KL term (none is needed with beta = 0)."""
        self.reference = variables if self.g.beta > 0 else None

    def __call__(self, state, step: int) -> tuple[dict, dict]:
        """The batch of optimizer step `step` (of batch index step // num_iterations), on the mesh."""
        g, tok = self.g, self.tokenizer
        index = step // g.num_iterations
        prompts_per_batch = g.batch_size // g.num_generations
        # 1-2. Prompt rows of this batch, G completions each, a fresh key per rollout.
        rows_B = [row for row in self.prompts.batch(index, prompts_per_batch) for _ in range(g.num_generations)]
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), index)
        t0 = time.perf_counter()
        prompt_BxW, lengths_B, gen, texts = rollout.rollout(
            self.model_cfg, state.variables(), rollout.encode_prompts(tok, [r['prompt'] for r in rows_B], g.template),
            tok, key, self.sampling, g.max_completion_length, self.mesh)
        t_gen = time.perf_counter() - t0
        # 3. Rewards and advantages.
        reward_B, parts = self.rewards(rows_B, texts)
        advantages_B, zero_groups = losses.group_advantages(reward_B, g.num_generations, g.eps_std)
        # 4. The batch, with the reference's log-probs.
        batch = sequences(prompt_BxW, lengths_B, gen.tokens, gen.mask, tok.pad_id)
        batch.update(completions=gen.tokens, mask=gen.mask, advantages=np.asarray(advantages_B))
        if g.num_iterations > 1:
            batch['old_logprobs'] = gen.logprobs
        batch = sharding.global_batch(batch, self.mesh)
        if g.beta > 0:
            batch['ref_logprobs'] = self.ref_logprobs(self.reference, batch)
        lengths = gen.mask.sum(axis=1)
        metrics = dict(
            reward=float(reward_B.mean()), format_rate=float(np.mean([tasks.format_ok(t) for t in texts])),
            completion_len_mean=float(lengths.mean()), completion_len_max=float(lengths.max()),
            truncated=float(np.mean(~np.isin(gen.tokens, tok.eos_id).any(axis=1))),
            zero_advantage_groups=float(zero_groups) / prompts_per_batch,
            gen_tokens_per_s=float(lengths.sum()) / t_gen,
            **{f'reward_{name}': float(v.mean()) for name, v in parts.items()})
        if 'problem' in rows_B[0]:
            correct_B = np.array([tasks.grade(r['problem'], t) for r, t in zip(rows_B, texts)])
            metrics.update(accuracy=float(correct_B.mean()), **group_health(correct_B, g.num_generations))
        return batch, metrics

    def evaluate(self, state) -> dict:
        """The current policy on the held-out rows: task accuracy and format rate (rollout.evaluate), or the
        mean of each reward on a user's held-out rows."""
        g, rows = self.g, self.prompts.eval
        prompts = rollout.encode_prompts(self.tokenizer, [r['prompt'] for r in rows], g.template)
        sampling = dict(max_new_tokens=g.max_completion_length, key=jax.random.PRNGKey(self.seed + 1),
                        samples=g.eval_samples, temperature=g.eval_temperature, top_p=g.eval_top_p, mesh=self.mesh,
                        shards=self.shards)
        if g.source == 'tasks':
            return rollout.evaluate(self.model_cfg, state.variables(), [r['problem'] for r in rows], prompts,
                                    self.tokenizer, **sampling)
        texts, lengths = rollout.sample_held_out(self.model_cfg, state.variables(), prompts, self.tokenizer,
                                                 **sampling)
        total, parts = self.rewards([r for r in rows for _ in range(g.eval_samples)], texts)
        return {'eval_reward': float(total.mean()), 'eval_completion_len': float(lengths.mean()),
                **{f'eval_reward_{name}': float(v.mean()) for name, v in parts.items()}}


def build_stage(setup: loop.Setup) -> loop.Stage:
    """The loop's Stage for GRPO: rollouts as the batch source, the clipped update as the step."""
    model = Transformer(setup.model_cfg)
    rollouts = Rollouts(setup, model)
    return loop.Stage(model=model, train_step=make_update_step(model, setup.apply_gradients, setup.config.grpo),
                      batch_source=rollouts, updates_per_batch=setup.config.grpo.num_iterations,
                      evaluate=rollouts.evaluate, reference=rollouts.set_reference)


def run(config, workdir, devices=None) -> dict:
    """Runs the GRPO stage of `config` in `workdir`; returns the last logged metrics."""
    return loop.run(config, workdir, devices, build_stage=build_stage, validate=validate)
