"""The training loop, read top to bottom: build, restore, step, log, evaluate, checkpoint, stop.

Every stage trains through `run`: its builder gets a `Setup` (config, model config, tokenizer, mesh and the
one optimizer tail, `step.make_apply_gradients`) and returns a `Stage`: its model, its pure step, where its
batches come from (a data iterator, or a batch source such as GRPO's rollouts) and how it is evaluated.
Pre-training's is `pretrain_stage`; SFT, reward modelling, distillation and GRPO build their own.
"""
import dataclasses
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.data import batch_ramp, pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.interop import hf, hub
from dsjax.model import flops, moe
from dsjax.model.transformer import Transformer
from dsjax.train import checkpoint, logger, optim, preemption
from dsjax.train import workdir as workdir_lib
from dsjax.train import step as step_lib
from dsjax.train.state import TrainState


# Key of the metrics `run` returns when a signal stopped it early (the value names the signal).
STOPPED = 'stopped_by'


class NonFiniteError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def build_state_fns(model, optimizer, mesh, seq_len: int):
    """Jitted init(rng[, params, buffers]) placed by the logical rules (see init_state), plus the abstract
    (sharded) state for restores and its shardings."""

    def init_boxed(rng):
        params_rng, state_rng = jax.random.split(rng)
        variables = model.init(params_rng, jnp.zeros((1, seq_len), jnp.int32))
        params = variables.pop('params')
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=state_rng, buffers=dict(variables), nonfinite_skips=jnp.zeros((), jnp.int32))

    def init_state(rng, params=None, buffers=None):
        """A fresh state; with a checkpoint's `params` (the whole tree, or some of its top-level entries:
        the rest keep their initialisation) and `buffers`, the optimizer starts from those, and the random
        parameters they replace are never drawn (unused, XLA drops them): one copy of the weights in memory."""
        state = nn.unbox(init_boxed(rng))
        if params is None:
            return state
        params = {**state.params, **params}
        return state.replace(params=params, opt_state=optimizer.init(params),
                             buffers=state.buffers if buffers is None else buffers)

    rng_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    boxed = jax.eval_shape(init_boxed, rng_shape)
    shardings = sharding.logical_sharding(boxed, mesh)
    init = jax.jit(init_state, out_shardings=shardings, donate_argnums=(1, 2))
    return init, sharding.sharded_shapes(boxed, mesh), shardings


def optimizer_tail(config, ramp):
    """The run's optimizer and the one tail every stage's step ends with (step.make_apply_gradients);
    `ramp` (batch_ramp) gives the token clock of optim.schedule='phases'."""
    tokens_before = ramp.tokens_before_traced
    optimizer = optim.make_optimizer(config.optim, tokens_before=tokens_before)
    return optimizer, step_lib.make_apply_gradients(optimizer, optim.make_schedule(config.optim, tokens_before),
                                                    config.train)


def jit_train_step(train_step, state_shardings, mesh):
    """The step as the loop runs it (and dsjax.aot compiles it): state in place (donated), batch split
    over the batch axes."""
    return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


POSITION_BUCKETS = 4


def evaluate(eval_step, state, eval_batches, mesh, summarize) -> dict:
    """`summarize` of the sums of the (jitted) `eval_step` over the whole validation set."""
    totals = None
    for host_batch in eval_batches:
        out = _host(eval_step(state, sharding.global_batch(host_batch, mesh)))
        totals = out if totals is None else jax.tree.map(np.add, totals, out)
    return summarize(totals)


def language_model_metrics(totals) -> dict:
    """Validation loss (overall and by position-in-document quarter) and MaxVio (expert load summed
    over the batches) of `step.make_eval_step`'s sums."""
    loss_p, tokens_p, load = totals['loss_by_pos'], totals['tokens_by_pos'], totals['load']
    metrics = {'val_loss': float(loss_p.sum() / max(tokens_p.sum(), 1.0))}
    for chunk_loss, chunk_tokens, chunk_pos in zip(np.array_split(loss_p, POSITION_BUCKETS),
                                                   np.array_split(tokens_p, POSITION_BUCKETS),
                                                   np.array_split(np.arange(len(loss_p)), POSITION_BUCKETS)):
        if chunk_tokens.sum():
            metrics[f'val_loss_pos{chunk_pos[0]}_{chunk_pos[-1]}'] = float(chunk_loss.sum() / chunk_tokens.sum())
    metrics['val_ppl'] = float(np.exp(min(metrics['val_loss'], 50.0)))
    if load and 'moe_layers' in load:
        metrics['maxvio_global'] = float(np.mean(moe.max_violation(load['moe_layers'])))
        metrics['val_load'] = load['moe_layers']  # [layers, experts], for heatmaps
    return metrics


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `run` hands a stage's builder: the config, its frozen model section, the tokenizer, the mesh,
    the optimizer tail its train_step ends with (`step.make_apply_gradients`), and this process's place."""
    config: Any
    model_cfg: config_lib.ModelConfig
    tokenizer: Any
    mesh: Any
    apply_gradients: Callable
    process_index: int = 0
    process_count: int = 1

    @property
    def proc(self) -> dict:
        return dict(process_index=self.process_index, process_count=self.process_count)


@dataclasses.dataclass
class Stage:
    """What a stage gives the loop (its builder, `build_stage(setup: Setup) -> Stage`, makes it).

    model: the module whose `init(rng, tokens [1, data.seq_len])` gives the params.
    train_step: pure (state, batch) -> (state, metrics), ending in `setup.apply_gradients`; metrics hold
      at least `loss` and `grad_norm`.
    Batches, one per `updates_per_batch` optimizer steps, come from one of:
      train_iter: host batches (a grain iterator, so its position is checkpointed with the state);
      batch_source: (state, step) -> (batch, metrics): a batch made from the current state on the host
        and placed on the mesh (GRPO: rollouts, rewards, advantages), with metrics of its own, logged
        with the steps that train on it. It must be a function of (state, step) for resumes to be exact.
    updates_per_batch: optimizer steps taken on each batch (GRPO's num_iterations); train.steps and
      train.checkpoint_every count optimizer steps and must be multiples of it (checkpoints fall
      between batches).
    Evaluation, at step 0, every train.eval_every steps and at the end, is one of:
      eval_step and eval_batches: pure (state, batch) -> sums, summed over the fixed host batches and
        turned into metrics by `summarize` (default: validation loss by position and MaxVio);
      evaluate: state -> metrics (GRPO answers held-out prompts).
    reference: if given, called once before training with the step-0 variables (params and buffers of
      the initial policy: the frozen reference of GRPO's KL), rebuilt the same way on a resume.
    start_from: (init.checkpoint path, model_cfg, abstract_state) -> (params, buffers or None), which
      `init(rng, params, buffers)` builds the first state around (params may be a subset of the top level).
    """
    model: Any
    train_step: Callable
    train_iter: Iterator[dict] | None = None
    batch_source: Callable | None = None
    updates_per_batch: int = 1
    eval_step: Callable | None = None
    eval_batches: list = dataclasses.field(default_factory=list)
    summarize: Callable = language_model_metrics
    evaluate: Callable | None = None
    reference: Callable | None = None
    start_from: Callable = None

    def __post_init__(self):
        if (self.train_iter is None) == (self.batch_source is None):
            raise ValueError('a Stage takes its batches from one of train_iter and batch_source')
        if (self.evaluate is None) == (self.eval_step is None):
            raise ValueError('a Stage evaluates with one of eval_step (and eval_batches) and evaluate')
        self.start_from = self.start_from or start_from


def pretrain_stage(setup: Setup) -> Stage:
    """Next-token training on packed text (the pre-training stage)."""
    config = setup.config
    model = Transformer(setup.model_cfg)
    return Stage(
        model=model,
        train_step=step_lib.make_train_step(model, setup.apply_gradients, config.train),
        train_iter=pipeline.make_train_iterator(config.data, setup.tokenizer, micro_batches=config.train.micro_batches,
                                                **setup.proc),
        eval_step=step_lib.make_eval_step(model),
        eval_batches=pipeline.make_eval_batches(config.data, setup.tokenizer, num_batches=config.train.eval_batches,
                                                **setup.proc))


def run(config, workdir, devices=None, build_stage=pretrain_stage, validate=None) -> dict:
    """Runs the stage `build_stage` makes of `config` (default pre-training) in `workdir` (on
    `devices`, default all); returns the last logged metrics. `validate(config, num_devices)` checks
    the stage's own section, after the shared ones and before anything is written."""
    devices = jax.devices() if devices is None else devices
    config_lib.validate(config, len(devices))
    if validate is not None:
        validate(config, len(devices))
    workdir = workdir_lib.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))

    mesh = sharding.make_mesh(config.mesh, devices)
    model_cfg = config_lib.freeze_model(config.model)
    tokenizer = tokenizer_lib.get_tokenizer(config.data)
    _check_init_tokenizer(config, tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f'config.model.vocab_size={model_cfg.vocab_size} is invalid: the tokenizer has '
            f'{tokenizer.vocab_size} tokens')
    # Sequences per step (V3's batch ramp, else data.batch_size): the clock of optim.schedule='phases'.
    ramp = batch_ramp.from_config(config.data, config.train.micro_batches)
    optimizer, apply_gradients = optimizer_tail(config, ramp)
    stage = build_stage(Setup(config, model_cfg, tokenizer, mesh, apply_gradients, jax.process_index(),
                              jax.process_count()))
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
                                   async_save=config.train.async_checkpoint, remove_unfinished=True)
    tcfg, mu = config.train, stage.updates_per_batch

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        init, abstract_state, state_shardings = build_state_fns(stage.model, optimizer, mesh, config.data.seq_len)

        def initial_state():
            weights = (stage.start_from(config.init.checkpoint, model_cfg, abstract_state)
                       if config.init.checkpoint else ())
            return init(jax.random.PRNGKey(tcfg.seed), *weights)

        restored = ckpt.restore_latest(abstract_state, data_iterator=stage.train_iter)
        if restored is not None:
            logging.info('Resuming from %s step %d', ckpt.directory, restored[0])
            state = restored[1]
        else:
            state = initial_state()
        if stage.reference is not None:
            # A copy: the first step donates the state's buffers.
            stage.reference(jax.tree.map(jnp.copy, (state if restored is None else initial_state()).variables()))
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        logging.info('Model: %s parameters, %s activated matmul parameters per token', f'{n_params:,}',
                     f'{flops.activated_matmul_params(model_cfg):,}')

        batch_shardings = sharding.batch_sharding(mesh)
        train_step = jit_train_step(stage.train_step, state_shardings, mesh)
        if stage.evaluate is not None:
            evaluate_state = stage.evaluate
        else:
            eval_step = jax.jit(stage.eval_step, in_shardings=(state_shardings, batch_shardings))
            evaluate_state = lambda s: evaluate(eval_step, s, stage.eval_batches, mesh, stage.summarize)

        def next_batch(state, step):
            if stage.batch_source is not None:
                return stage.batch_source(state, step)
            return sharding.global_batch(next(stage.train_iter), mesh), {}

        # Throughput of the data iterator's batches (the ramp's sizes); a batch source reports its own (e.g.
        # generated tokens/s).
        counts_tokens = stage.train_iter is not None
        flops_per_token = flops.train_flops_per_token(model_cfg, config.data.seq_len)
        peak = (tcfg.peak_flops or flops.measured_matmul_peak(model_cfg.dtype)) if counts_tokens else 0.0
        metrics_log = logger.MetricsLogger(workdir, total_steps=tcfg.steps,
                                           enable_progress=tcfg.progress_bar and jax.process_index() == 0)
        stop = preemption.StopSignal()
        start = int(state.step)
        last, good_step = {}, start
        try:
            if start == 0:
                last = evaluate_state(state)
                metrics_log.log(0, _scalars(last))
                _save_expert_load(workdir, 0, last)
            # Metrics of step t are fetched once step t+1 is queued, so the host never stalls the device;
            # only steps that must sync anyway (eval, checkpoint, the last, a signal) fetch their own.
            pending, clock = None, {'t': time.perf_counter(), 'step': start, 'data_wait': 0.0}
            data_wait, stopping = 0.0, None

            def fetch(done, metrics, batch_metrics, log_it):
                host = _check_finite(done, metrics, good_step, ckpt, tcfg.nonfinite_policy)
                if not log_it:
                    return None
                now = time.perf_counter()
                elapsed = now - clock['t']
                host = {**batch_metrics, **host}
                if counts_tokens:
                    tokens = ramp.tokens_before(done) - ramp.tokens_before(clock['step'])
                    host['tokens_per_s'] = tokens / elapsed
                    host['mfu'] = tokens * flops_per_token / elapsed / peak
                # Share of the wall time since the last log spent waiting for batches (0 when the pipeline
                # keeps up; a batch source's generation time otherwise): both up to now, so it is in [0, 1).
                host['data_wait_frac'] = (data_wait - clock['data_wait']) / elapsed
                clock.update(t=now, step=done, data_wait=data_wait)
                metrics_log.log(done, host)
                return host

            for step in range(start, tcfg.steps):
                if step % mu == 0:  # a new batch every `updates_per_batch` optimizer steps
                    t_data = time.perf_counter()
                    batch, batch_metrics = next_batch(state, step)
                    data_wait += time.perf_counter() - t_data
                state, metrics = train_step(state, batch)
                done = step + 1
                stopping = stopping or stop.agreed()  # the same step on every process
                if pending is not None:
                    last = fetch(*pending) or last
                    pending = None
                log_it = due(done, tcfg.log_every, tcfg.steps)
                evaluate_now = due(done, tcfg.eval_every, tcfg.steps)
                save_due = due(done, tcfg.checkpoint_every, tcfg.steps)
                if evaluate_now or save_due or stopping:
                    last = fetch(done, metrics, batch_metrics, log_it) or last
                else:
                    pending = (done, metrics, batch_metrics, log_it)
                if evaluate_now:
                    evaluated = evaluate_state(state)
                    metrics_log.log(done, _scalars(evaluated))
                    _save_expert_load(workdir, done, evaluated)
                    last = {**last, **evaluated}
                    # Evaluation time is not training throughput.
                    clock.update(t=time.perf_counter(), step=done, data_wait=data_wait)
                # Checkpoints fall between batches (a batch source's batch is not saved), and so does a stop.
                between_batches = done % mu == 0
                if between_batches and (save_due or stopping):
                    ckpt.save(done, state, data_iterator=stage.train_iter, config=config.to_dict(), force=True)
                    good_step = done
                if stopping and between_batches:
                    logging.warning('%s: saved step %d, exiting.', stopping, done)
                    last = {**last, STOPPED: stopping}  # so a chain stops too, not only this stage
                    break
        finally:
            close_stage(stop, ckpt, metrics_log)
    return last


def due(done: int, every: int, total: int) -> bool:
    """True on every `every`-th step and on the last one (`total`): when to log, evaluate or save."""
    return done % every == 0 or done == total


def close_stage(stop: preemption.StopSignal, ckpt, metrics_log) -> None:
    """A stage loop's way out, finished, stopped or failing: restores the signal handlers, waits for
    checkpoint writes in flight, closes the checkpointer and the metrics log."""
    stop.restore()
    ckpt.wait()
    ckpt.close()
    metrics_log.close()


def start_from(path: str, model_cfg, abstract_state):
    """The weights of `init.checkpoint`, a HF directory or a previous stage's Orbax checkpoint, placed as
    `abstract_state` places them (each device reads only its slice): (params, buffers), buffers None where
    the checkpoint holds no MoE routing bias. `init(rng, params, buffers)` builds the state around them.
    A Hub id (owner/name[@revision]) is downloaded first."""
    path = hub.resolve(path, 'init.checkpoint')
    if hf.is_hf_checkpoint(path):
        logging.info('Starting from the HF checkpoint %s', path)
        return hf.load_into(path, model_cfg, abstract_state.params, abstract_state.buffers)
    restored = checkpoint.restore_subtrees(path, {'params': abstract_state.params, 'buffers': abstract_state.buffers})
    if abstract_state.buffers and 'buffers' not in restored:
        logging.warning('init.checkpoint=%s holds no routing bias: it starts at zero', path)
    return restored['params'], restored.get('buffers')


def _check_init_tokenizer(config, tokenizer) -> None:
    """A stage starting from a previous dsjax run reads text as that run did. Where both train their
    sentencepiece model on the corpus, another training split (data.val_fraction, paths, ...) trains another
    vocabulary, which would silently remap every id the weights learnt: an error naming the fields."""
    path, data = config.init.checkpoint, config.data
    if not path or data.tokenizer != 'sentencepiece' or data.tokenizer_path or hub.is_repo_id(path) or \
            hf.is_hf_checkpoint(path):
        return
    try:
        _, saved = checkpoint.read_config(path, what='init.checkpoint')
    except FileNotFoundError:  # an Orbax checkpoint without a saved config: nothing to compare with
        return
    if saved.data.tokenizer != 'sentencepiece' or saved.data.tokenizer_path:
        return
    def plain(value):  # a saved config's tuples come back from JSON as lists
        return list(value) if isinstance(value, (tuple, list)) else value

    differ = [f'data.{k}={data[k]!r} (there {saved.data[k]!r})' for k in sorted(data.keys())
              if k in saved.data and plain(data[k]) != plain(saved.data[k])]
    if not differ:  # the same fields train the same model: no second corpus read at start-up
        return
    theirs = tokenizer_lib.get_tokenizer(saved.data)  # cached where that run trained it
    if epath.Path(theirs.model_path).read_bytes() != epath.Path(tokenizer.model_path).read_bytes():
        raise config_lib.ConfigError(
            f'init.checkpoint={path!r} was trained with another sentencepiece model than this config.data trains '
            f'(differing: {", ".join(differ)}); keep the data fields that shape the tokenizer as that run had '
            f'them, or set data.tokenizer_path={theirs.model_path!r}')


def _save_expert_load(workdir: epath.Path, step: int, metrics: dict) -> None:
    """Validation expert load [layers, experts] of this evaluation, for the report's heatmaps."""
    if 'val_load' in metrics and jax.process_index() == 0:
        (workdir / 'expert_load').mkdir(exist_ok=True)
        with (workdir / 'expert_load' / f'step_{step:08d}.npy').open('wb') as f:
            np.save(f, metrics['val_load'])


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if np.ndim(v) == 0}


def _check_finite(step: int, metrics, good_step: int, ckpt, policy: str) -> dict:
    """Host copy of one step's metrics. On NaN/Inf: policy 'stop' raises NonFiniteError (no checkpoint
    is written); 'skip' logs that the step already dropped its update."""
    host = {k: float(v) for k, v in _host(metrics).items()}
    if np.isfinite(host['loss']) and np.isfinite(host['grad_norm']):
        return host
    if policy == 'skip':
        logging.warning('Non-finite loss (%s) or grad norm (%s) at step %d: update skipped (%d skipped so '
                        'far).', host['loss'], host['grad_norm'], step, host['nonfinite_skips'])
        return host
    raise NonFiniteError(
        f'Non-finite loss ({host["loss"]}) or grad norm ({host["grad_norm"]}) at step {step}. Stopped '
        f'without saving; the last good checkpoint is step {good_step} in {ckpt.directory}. '
        'Lower optim.lr, raise optim.warmup_steps, check the data, or set '
        "train.nonfinite_policy='skip' to drop such steps' updates.")
