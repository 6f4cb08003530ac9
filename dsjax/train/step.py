"""The optimizer tail every stage's step ends with (`make_apply_gradients`), the pre-training step, the
evaluation step and the accumulating step of the post-training stages: pure functions of (state, batch).

Batch (every array [B, L]): inputs, targets, segment_ids, positions, weights.
"""
import jax
import jax.numpy as jnp
import optax

from dsjax.model import moe
from dsjax.train import losses
from dsjax.train.state import TrainState


def _apply(model, params, buffers, batch, deterministic: bool, rng=None, apply_head: bool = True):
    return model.apply({'params': params, **buffers}, batch['inputs'], batch['positions'],
                       batch['segment_ids'], batch['targets'], deterministic=deterministic,
                       rngs=None if rng is None else {'dropout': rng}, apply_head=apply_head)


def _scheduled(value, final, switch_fraction, step, total_steps):
    """`value` until `switch_fraction` of the run, then `final` (V3's lambda and gamma schedules)."""
    return jnp.where(step < switch_fraction * total_steps, value, final)


def layer_maxvio(load):
    """MaxVio of the main MoE stack, averaged over its layers (0 for dense models)."""
    if 'moe_layers' not in load:
        return jnp.zeros((), jnp.float32)
    return moe.max_violation(load['moe_layers']).mean()


def update_routing_bias(buffers, load, rate):
    """Auxiliary-loss-free balancing: each MoE stack's bias moves against its measured load."""
    if 'moe_bias' not in buffers:
        return buffers
    new_bias = {}
    for name, subtree in buffers['moe_bias'].items():
        new_bias[name] = jax.tree.map(lambda b: moe.bias_update(b, load[name], rate), subtree)
    return {**buffers, 'moe_bias': new_bias}


def keep_if_finite(finite, new, old):
    """`new` where `finite` (a scalar bool), else `old`, leaf by leaf (a skipped update)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def pretrain_denominators(batch, mtp_depths: int) -> dict:
    """What a micro-batch's pre-training losses are divided by, for the whole batch: its target tokens,
    each MTP depth's targets, and its real rows (sequences with any target: the balance losses average
    over sequences)."""
    weights_BxL = batch['weights'].astype(jnp.float32)
    mtp = [losses.mtp_targets(batch['targets'], weights_BxL, k + 1)[1].sum() for k in range(mtp_depths)]
    return {'tokens': weights_BxL.sum(), 'mtp_tokens': jnp.asarray(mtp, jnp.float32).reshape(mtp_depths),
            'rows': (weights_BxL.sum(axis=-1) > 0).sum().astype(jnp.float32)}


def make_pretrain_loss(model, mtp_weight):
    """The pre-training objective as `make_accumulating_step`'s loss_fn: a micro-batch's share of the
    batch's mean next-token cross-entropy (through the chunked head, so the [B, L, V] logits never exist
    whole), of its MoE balance losses (means over sequences) and of mtp_weight x its MTP loss (each depth's
    token mean, averaged over depths). Denominators: `pretrain_denominators` of the whole batch."""

    def loss_fn(params, buffers, batch, denominators, rng):
        hidden, aux = _apply(model, params, buffers, batch, deterministic=False, rng=rng, apply_head=False)
        loss_sum, tokens = losses.head_cross_entropy(hidden, aux['head'], batch['targets'], batch['weights'])
        ce = loss_sum / jnp.maximum(denominators['tokens'], 1.0)
        # A computed micro-batch is all real rows (the batch ramp pads whole micro-batches, skipped).
        rows = batch['targets'].shape[0] / jnp.maximum(denominators['rows'], 1.0)
        mtp = jnp.zeros((), jnp.float32)
        if 'mtp_hidden' in aux:
            sums_D, _ = losses.mtp_cross_entropy(aux['mtp_hidden'], aux['head'], batch['targets'], batch['weights'])
            mtp = jnp.mean(sums_D / jnp.maximum(denominators['mtp_tokens'], 1.0))
        balance = rows * aux['balance_loss']
        total = ce + balance + mtp_weight * mtp
        metrics = {'loss': ce, 'total_loss': total, 'balance_loss': balance, 'mtp_loss': mtp, 'tokens': tokens,
                   'dropped': rows * aux['dropped']}
        return total, (metrics, aux['load'])

    return loss_fn


def make_apply_gradients(optimizer: optax.GradientTransformation, schedule, train_cfg):
    """The one optimizer tail every stage's step ends with.

    Returns apply_gradients(state, grads, loss, load) -> (state, metrics): the optimizer's update
    (optim.make_optimizer: global-norm clipping, then AdamW), the routing-bias update from the step's
    expert load `load` (V3's auxiliary-loss-free balancing; {} for a dense model), and the non-finite
    policy: with train.nonfinite_policy='skip' a step whose `loss` or gradient norm is NaN/Inf leaves
    params, optimizer moments and count (so its schedule) and the routing bias as they were, and counts
    it in `nonfinite_skips` (the loop logs it); only `step` moves on, so the data and a resumed run stay in
    step. Metrics: grad_norm, lr, maxvio_batch, nonfinite_skips.
    """
    total_steps = train_cfg.steps
    skip_nonfinite = train_cfg.nonfinite_policy == 'skip'

    def apply_gradients(state: TrainState, grads, loss, load):
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rate = _scheduled(train_cfg.bias_update_rate, 0.0, train_cfg.bias_update_until, state.step, total_steps)
        buffers = update_routing_bias(state.buffers, load, rate)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        skips = state.nonfinite_skips + jnp.where(finite, 0, 1).astype(state.nonfinite_skips.dtype)
        if skip_nonfinite:
            params, opt_state, buffers = keep_if_finite(
                finite, (params, opt_state, buffers), (state.params, state.opt_state, state.buffers))
        metrics = {'grad_norm': grad_norm, 'lr': schedule(state.step), 'maxvio_batch': layer_maxvio(load),
                   'nonfinite_skips': skips}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, buffers=buffers,
                                  nonfinite_skips=skips)
        return new_state, metrics

    return apply_gradients


def make_train_step(model, apply_gradients, train_cfg):
    """The pre-training step(state, batch) -> (state, metrics), accumulated over train.micro_batches (equal
    to one step on the whole batch); jit it with explicit shardings."""
    depths = model.cfg.num_nextn_predict_layers

    def step(state: TrainState, batch):
        mtp_weight = _scheduled(train_cfg.mtp_loss_weight, train_cfg.mtp_loss_weight_final,
                                train_cfg.mtp_weight_switch, state.step, train_cfg.steps)
        accumulate = make_accumulating_step(make_pretrain_loss(model, mtp_weight), apply_gradients,
                                            train_cfg.micro_batches, lambda b: pretrain_denominators(b, depths))
        return accumulate(state, batch)

    return step


def make_eval_step(model):
    """Returns eval(state, batch) -> sums to accumulate over a set: loss and tokens per position of
    the document (`batch['positions']`, so long-context gains show), expert load."""

    def eval_step(state: TrainState, batch):
        logits, aux = _apply(model, state.params, state.buffers, batch, deterministic=True)
        nll_BxL = losses.token_nll(logits, batch['targets']) * batch['weights']
        length = batch['positions'].shape[1]
        by_position = jax.nn.one_hot(batch['positions'], length, dtype=jnp.float32)  # [B, L, position]
        return {'loss_by_pos': jnp.einsum('BL,BLP->P', nll_BxL, by_position),
                'tokens_by_pos': jnp.einsum('BL,BLP->P', batch['weights'], by_position),
                'load': aux['load']}

    return eval_step


def split_micro_batches(batch, micro_batches: int):
    """[B, ...] arrays -> [micro_batches, B / micro_batches, ...]; micro-batch m holds rows m, m + M, ...
    so each one stays spread over the devices that hold the batch."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // micro_batches, micro_batches, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_accumulating_step(loss_fn, apply_gradients, micro_batches: int = 1, normaliser='weights'):
    """A training step with gradients accumulated over micro-batches (every stage's, pre-training's too).

    loss_fn(params, buffers, micro_batch, denominator, rng) -> (loss, (metrics, load)) must return
    the micro-batch's *share* of the big batch's loss: its sum divided by `denominator`, the whole
    batch's total of `batch[normaliser]` (target tokens for SFT and distillation, pairs for reward
    models), or `normaliser(batch)` when it is a function (pre-training's several denominators).
    Summing the shares then gives exactly the big batch's loss and gradient. `metrics` are summed over
    micro-batches (give shares too); `load` (expert load) is summed and moves the routing bias as in
    pre-training (`apply_gradients`). A micro-batch whose denominator is 0 (all padding, as the batch
    ramp leaves the micro-batches it does not use yet) is skipped, not computed. Returns
    step(state, batch) -> (state, metrics).
    """
    def denominators(batch):
        return normaliser(batch) if callable(normaliser) else batch[normaliser].sum().astype(jnp.float32)

    def step(state: TrainState, batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        denominator = denominators(batch)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        micro = split_micro_batches(batch, micro_batches)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: grad_fn(state.params, state.buffers, first, denominator, step_rng))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], *shapes[0][1], shapes[1]))

        def one(carry, indexed):
            m, micro = indexed

            def compute():
                (loss, (metrics, load)), grads = grad_fn(state.params, state.buffers, micro, denominator,
                                                         jax.random.fold_in(step_rng, m))
                return loss, metrics, load, grads
            active = sum(x.sum() for x in jax.tree.leaves(denominators(micro))) != 0  # NaN weights are not padding
            return jax.tree.map(jnp.add, carry, jax.lax.cond(active, compute, lambda: zeros)), None

        (total, metrics, load, grads), _ = jax.lax.scan(one, zeros, (jnp.arange(micro_batches), micro))
        state, tail = apply_gradients(state, grads, total, load)
        normalisers = {} if callable(normaliser) else {'normaliser': denominator}
        return state, {'loss': total, **metrics, **normalisers, **tail}

    return step
