"""The GRPO stage (R1-Zero, and R1's reasoning RL): rollouts, rule rewards, group advantages, clipped updates.

Axis legend: B completions per step (P prompts x G), W prompt width, N completion tokens (max_new_tokens),
T = W + N, V vocab.

One step, read top to bottom in `run`:
1. P training problems, a function of (seed, step) so a resumed run sees the same ones; each prompt G times.
2. G completions per prompt from the current policy at temperature T, with a fresh PRNG key per step.
3. Rewards r = sum_k w_k f_k (dsjax/posttrain/rewards.py) -> group-normalised advantages.
4. Log-probs of the frozen reference (the initial policy) once, then `updates_per_batch` jitted updates
   of the clipped objective; above one update the ratio uses the log-probs stored at rollout.
"""
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.data import chat, tasks
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.infer import decode
from dsjax.infer.sampling import SamplingConfig
from dsjax.model.transformer import Transformer
from dsjax.posttrain import losses, rewards
from dsjax.train import checkpoint, logger, loop, optim
from dsjax.train import step as step_lib

# name -> Problem -> prompt text: the R1-Zero template, or the chat template SFT stages train with
# (dsjax/data/chat.py; its [bos] + tokens are exactly those of the one-turn conversation's prompt).
TEMPLATES = {'zero': tasks.render_zero_prompt, 'chat': lambda p: chat.user_turn(p.prompt)}
# Prompt widths are padded to a multiple of this, so generation and updates compile for few shapes.
WIDTH_MULTIPLE = 32


def validate(config, num_devices: int, extra_rewards=()) -> None:
    """Raises ConfigError naming the first bad `grpo.*` field; reward names may be rule rewards or names
    in `extra_rewards`."""
    g = config.grpo
    config_lib.parse_task_entries(g.tasks, 'grpo.tasks')
    if g.template not in TEMPLATES:
        config_lib.fail('grpo.template', g.template, f'must be one of {tuple(TEMPLATES)}')
    for f in ('batch_size', 'group_size', 'max_new_tokens', 'updates_per_batch', 'eval_problems',
              'eval_samples'):
        if not (isinstance(g[f], int) and g[f] > 0):
            config_lib.fail(f'grpo.{f}', g[f], 'must be a positive integer')
    if g.batch_size % g.group_size:
        config_lib.fail('grpo.batch_size', g.batch_size, f'must be divisible by grpo.group_size={g.group_size} '
                        '(each prompt gets a group of G completions)')
    if g.group_size < 2:
        config_lib.fail('grpo.group_size', g.group_size, 'must be >= 2: advantages compare completions in a group')
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
    for f in ('beta', 'eps_high', 'overlong_buffer'):
        if g[f] < 0:
            config_lib.fail(f'grpo.{f}', g[f], 'must be >= 0')
    if not 0 <= g.eps_low < 1:
        config_lib.fail('grpo.eps_low', g.eps_low, 'must be in [0, 1)')
    if not g.eps_std > 0:
        config_lib.fail('grpo.eps_std', g.eps_std, 'must be > 0')
    if g.aggregation not in losses.AGGREGATIONS:
        config_lib.fail('grpo.aggregation', g.aggregation, f'must be one of {losses.AGGREGATIONS}')
    if not g.reward_names or len(g.reward_names) != len(g.reward_weights):
        config_lib.fail('grpo.reward_weights', g.reward_weights,
                        f'needs one weight per reward in grpo.reward_names={tuple(g.reward_names)}')
    known = tuple(rewards.REWARDS) + tuple(extra_rewards)
    for name in g.reward_names:
        if name not in known:
            config_lib.fail('grpo.reward_names', tuple(g.reward_names), f'{name!r} is unknown; valid: {known}')


def step_problems(entries, n: int, seed: int, step: int) -> list[tasks.Problem]:
    """The `n` training problems of `step`, dealt over the task:level entries in turn."""
    parsed = config_lib.parse_task_entries(entries, 'grpo.tasks')
    counts = [len(range(i, n, len(parsed))) for i in range(len(parsed))]
    per_entry = [tasks.make_problems(t, 'train', c, level=lv, seed=seed * 1_000_003 + step)
                 for (t, lv), c in zip(parsed, counts)]
    return [per_entry[i % len(parsed)][i // len(parsed)] for i in range(n)]


def encode_prompts(tokenizer, problems, template: str) -> list[list[int]]:
    """[bos] + the tokens of each problem in the prompt template."""
    return [[tokenizer.bos_id] + tokenizer.encode(TEMPLATES[template](p)) for p in problems]


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
    """(params, buffers, batch) -> log pi(completion tokens) [B, N] at temperature T (the reference pass)."""

    def logprobs(params, buffers, batch):
        logits, _ = model.apply({'params': params, **buffers}, batch['inputs'], batch['positions'],
                                batch['segment_ids'])
        return losses.token_logprobs(completion_logits(logits, batch['lengths'], n), batch['completions'],
                                     temperature)

    return logprobs


def make_update_step(model, optimizer, schedule, g, nonfinite_policy: str):
    """Returns update(state, batch) -> (state, metrics): one optimizer step on the GRPO objective.

    batch: inputs, positions, segment_ids [B, T]; lengths, advantages [B]; completions, mask [B, N];
    ref_logprobs [B, N] when beta > 0; old_logprobs [B, N] when updates_per_batch > 1.
    """
    n = g.max_new_tokens

    def update(state, batch):
        def loss_fn(params):
            logits, aux = model.apply({'params': params, **state.buffers}, batch['inputs'], batch['positions'],
                                      batch['segment_ids'])
            logits_BxNxV = completion_logits(logits, batch['lengths'], n)
            logp_BxN = losses.token_logprobs(logits_BxNxV, batch['completions'], g.temperature)
            old_BxN = batch['old_logprobs'] if g.updates_per_batch > 1 else jax.lax.stop_gradient(logp_BxN)
            loss, stats = losses.grpo_loss(
                logp_BxN, old_BxN, batch.get('ref_logprobs'), batch['advantages'], batch['mask'],
                eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta, mode=g.aggregation, max_len=n)
            entropy_BxN = losses.token_entropy(jax.lax.stop_gradient(logits_BxNxV), g.temperature)
            stats['entropy'] = losses.aggregate(entropy_BxN, batch['mask'], 'token-mean')
            return loss + aux['balance_loss'], stats

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skips = state.nonfinite_skips + jnp.where(finite, 0, 1).astype(state.nonfinite_skips.dtype)
        if nonfinite_policy == 'skip':
            params, opt_state = step_lib.keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))
        metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step), 'nonfinite_skips': skips,
                   **stats}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite_skips=skips), metrics

    return update


def rollout(model_cfg, variables, prompts, tokenizer, key, sampling, max_new_tokens: int, mesh):
    """Generates a completion per prompt: (prompt [B, W], lengths [B], Generation on the host, texts)."""
    prompt_BxW, lengths_B = decode.pad_prompts(prompts, tokenizer.pad_id)
    prompt_BxW = np.pad(prompt_BxW, ((0, 0), (0, -prompt_BxW.shape[1] % WIDTH_MULTIPLE)),
                        constant_values=tokenizer.pad_id)
    gen = decode.generate(model_cfg, variables, prompt_BxW, key, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, lengths=lengths_B, mesh=mesh)
    gen = jax.tree.map(np.asarray, jax.device_get(gen))
    texts = [tokenizer.decode(row[m]) for row, m in zip(gen.tokens, gen.mask)]
    return prompt_BxW, lengths_B, gen, texts


def evaluate(model_cfg, variables, problems, prompts, tokenizer, g, mesh, key, shards: int) -> dict:
    """Accuracy, format rate and completion length (tokens) on held-out problems, one batched pass of
    grpo.eval_samples completions per problem at grpo.eval_temperature (greedy by default) and
    grpo.eval_top_p. With k > 1 samples, accuracy is their mean (pass@1, the R1 paper's protocol) and
    eval_pass_at_k counts problems solved by any. eval_first_answer_accuracy grades the text up to the
    first </answer>: the credit a model that never stops after its answer would get for it."""
    k = g.eval_samples
    sampling = SamplingConfig(temperature=g.eval_temperature, top_p=g.eval_top_p if g.eval_temperature else 1.0)
    rows = [p for p in prompts for _ in range(k)]
    padded = rows + [rows[-1]] * (-len(rows) % shards)  # rows divide over the batch shards
    # One batch: generation on a CPU is several times faster per token at a few hundred rows than at 64.
    _, _, gen, texts = rollout(model_cfg, variables, padded, tokenizer, key, sampling, g.max_new_tokens, mesh)
    texts = texts[:len(rows)]
    problems_R = [p for p in problems for _ in range(k)]
    correct = np.array([tasks.grade(p, text) for p, text in zip(problems_R, texts)])
    first = [tasks.grade_first_answer(p, text) for p, text in zip(problems_R, texts)]
    metrics = {'eval_accuracy': float(correct.mean()),
               'eval_format_rate': float(np.mean([tasks.format_ok(text) for text in texts])),
               'eval_completion_len': float(gen.mask[:len(rows)].sum(axis=1).mean()),
               'eval_first_answer_accuracy': float(np.mean(first))}
    if k > 1:
        metrics[f'eval_pass_at_{k}'] = float(correct.reshape(-1, k).any(axis=1).mean())
    names = np.array([f'{p.task}{p.level}' for p in problems_R])
    if len(set(names)) > 1:
        for name in sorted(set(names)):
            metrics[f'eval_accuracy_{name}'] = float(correct[names == name].mean())
    return metrics


def group_health(correct_B, group_size: int) -> dict:
    """Fractions of groups all of whose completions are correct (solved) and none (hopeless)."""
    correct_PxG = np.asarray(correct_B, bool).reshape(-1, group_size)
    return {'solved_groups': float(correct_PxG.all(1).mean()), 'hopeless_groups': float((~correct_PxG).all(1).mean())}


def run(config, workdir, devices=None, extra_rewards=None) -> dict:
    """Runs the GRPO stage of `config` in `workdir`; returns the last logged metrics.

    `extra_rewards` maps reward names to callables (e.g. a trained reward model) usable in
    grpo.reward_names besides the rule rewards.
    """
    devices = jax.devices() if devices is None else devices
    config_lib.validate(config, len(devices))
    validate(config, len(devices), extra_rewards or ())
    g, tcfg = config.grpo, config.train
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(config.mesh, devices)
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    model_cfg = config_lib.freeze_model(config.model)
    model = Transformer(model_cfg)
    tokenizer = tokenizer_lib.get_tokenizer(config.data)
    reward_set = rewards.build(config, tokenizer, extra_rewards)
    eval_problems = tasks.task_problems(g.tasks, 'test', g.eval_problems, 0, 'grpo.tasks')
    eval_prompts = encode_prompts(tokenizer, eval_problems, g.template)
    schedule = optim.make_schedule(config.optim)
    optimizer = optim.make_optimizer(config.optim)
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=tcfg.keep_checkpoints,
                                   async_save=tcfg.async_checkpoint, remove_unfinished=True)
    sampling = SamplingConfig(temperature=g.temperature, top_p=g.top_p)
    prompts_per_step, mu = g.batch_size // g.group_size, g.updates_per_batch

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        init, abstract_state, state_shardings = loop.build_state_fns(model, optimizer, mesh, 8)

        def initial_state():
            weights = (loop.start_from(config.init.checkpoint, model_cfg, abstract_state)
                       if config.init.checkpoint else ())
            return init(jax.random.PRNGKey(tcfg.seed), *weights)

        restored = ckpt.restore_latest(abstract_state)
        state = restored[1] if restored is not None else initial_state()
        # The reference is the policy GRPO started from: rebuilt, not stored, on a resume.
        ref_params = initial_state().params if (restored is not None and g.beta > 0) else (
            jax.tree.map(jnp.copy, state.params) if g.beta > 0 else None)
        start = int(state.step) // mu
        if restored is not None:
            logging.info('Resuming GRPO from %s at step %d', ckpt.directory, start)

        rows = sharding.batch_sharding(mesh)
        update = jax.jit(make_update_step(model, optimizer, schedule, g, tcfg.nonfinite_policy),
                         in_shardings=(state_shardings, rows), out_shardings=(state_shardings, None),
                         donate_argnums=(0,))
        ref_logprobs = jax.jit(make_logprob_fn(model, g.max_new_tokens, g.temperature),
                               in_shardings=(state_shardings.params, state_shardings.buffers, rows))
        metrics_log = logger.MetricsLogger(workdir, total_steps=tcfg.steps,
                                           enable_progress=tcfg.progress_bar and jax.process_index() == 0)
        eval_key = jax.random.PRNGKey(tcfg.seed + 1)

        def run_eval(step):
            metrics = evaluate(model_cfg, state.variables(), eval_problems, eval_prompts, tokenizer, g, mesh,
                               eval_key, shards)
            metrics_log.log(step, metrics)
            logging.info('GRPO step %d: held-out accuracy %.3f, format rate %.3f', step, metrics['eval_accuracy'],
                         metrics['eval_format_rate'])
            return metrics

        stop = loop._StopSignal()
        last = {}
        try:
            if start == 0:
                last = run_eval(0)
            for step in range(start, tcfg.steps):
                done = step + 1
                # 1-2. Problems of this step, G completions each, a fresh key per rollout.
                problems = step_problems(g.tasks, prompts_per_step, tcfg.seed, step)
                problems_B = [p for p in problems for _ in range(g.group_size)]
                prompts_B = [p for p in encode_prompts(tokenizer, problems, g.template) for _ in range(g.group_size)]
                key = jax.random.fold_in(jax.random.PRNGKey(tcfg.seed), step)
                t0 = time.perf_counter()
                prompt_BxW, lengths_B, gen, texts = rollout(model_cfg, state.variables(), prompts_B, tokenizer, key,
                                                            sampling, g.max_new_tokens, mesh)
                t_gen = time.perf_counter() - t0
                # 3. Rewards and advantages.
                reward_B, parts = reward_set(problems_B, texts)
                advantages_B, zero_groups = losses.group_advantages(reward_B, g.group_size, g.eps_std)
                # 4. Updates.
                batch = sequences(prompt_BxW, lengths_B, gen.tokens, gen.mask, tokenizer.pad_id)
                batch.update(completions=gen.tokens, mask=gen.mask, advantages=np.asarray(advantages_B))
                if mu > 1:
                    batch['old_logprobs'] = gen.logprobs
                batch = sharding.global_batch(batch, mesh)
                t0 = time.perf_counter()
                if g.beta > 0:
                    batch['ref_logprobs'] = ref_logprobs(ref_params, state.buffers, batch)
                for _ in range(mu):
                    state, metrics = update(state, batch)
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                t_train = time.perf_counter() - t0
                _check_finite(host, done, tcfg.nonfinite_policy)

                correct_B = np.array([tasks.grade(p, t) for p, t in zip(problems_B, texts)])
                lengths = gen.mask.sum(axis=1)
                host.update(
                    reward=float(reward_B.mean()), accuracy=float(correct_B.mean()),
                    format_rate=float(np.mean([tasks.format_ok(t) for t in texts])),
                    completion_len_mean=float(lengths.mean()), completion_len_max=float(lengths.max()),
                    truncated=float(np.mean(~np.isin(gen.tokens, tokenizer.eos_id).any(axis=1))),
                    zero_advantage_groups=float(zero_groups) / prompts_per_step,
                    gen_tokens_per_s=float(lengths.sum()) / t_gen,
                    train_tokens_per_s=mu * float(batch['segment_ids'].sum()) / t_train,
                    **{f'reward_{name}': float(v.mean()) for name, v in parts.items()},
                    **group_health(correct_B, g.group_size))
                last = host
                if loop.due(done, tcfg.log_every, tcfg.steps):
                    metrics_log.log(done, host)
                if loop.due(done, tcfg.eval_every, tcfg.steps):
                    last = {**last, **run_eval(done)}
                if loop.due(done, tcfg.checkpoint_every, tcfg.steps) or stop.received:
                    ckpt.save(done * mu, state, config=config.to_dict(), force=True)
                if stop.received:
                    logging.warning('%s received: saved step %d, exiting.', stop.received, done)
                    last = {**last, loop.STOPPED: stop.received}
                    break
        finally:
            loop.close_stage(stop, ckpt, metrics_log)
    return last


def _check_finite(host: dict, step: int, policy: str) -> None:
    if policy == 'stop' and not (np.isfinite(host['loss']) and np.isfinite(host['grad_norm'])):
        raise loop.NonFiniteError(f'Non-finite GRPO loss ({host["loss"]}) or grad norm ({host["grad_norm"]}) at step '
                                  f'{step}; lower optim.lr or set train.nonfinite_policy="skip"')
