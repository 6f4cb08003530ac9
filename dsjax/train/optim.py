"""Optimizer and learning-rate schedules from `config.optim`: AdamW, global-norm clipping, warmup + decay.

Schedules after the linear warmup (in steps): 'cosine' and 'multistep' over `decay_steps`, 'constant', and
'phases': V3's multi-phase schedule, whose phases end at given token counts (optim.phase_*), measured by the
tokens trained before a step (so a growing batch moves through them faster per step).
"""
import math

import jax
import jax.numpy as jnp
import optax

from dsjax import config as config_lib

def _phases(c, tokens_before) -> optax.Schedule:
    """lr of the phase holding the tokens trained before the step: phase i spans [end_{i-1}, end_i) (from 0)
    and ends at lr x phase_factors[i]; a 'constant' phase holds that value, a 'cosine' one falls to it along
    a half cosine from where the previous phase ended (lr for the first). The last value is held after."""
    ends = (0.0,) + tuple(float(e) for e in c.phase_ends)
    lrs = (c.lr,) + tuple(c.lr * f for f in c.phase_factors)

    def phases(step):
        trained = tokens_before(step)
        lr = jnp.asarray(lrs[-1], jnp.float32)
        for i in reversed(range(len(c.phase_ends))):
            value = lrs[i + 1]
            if c.phase_shapes[i] == 'cosine':
                frac = jnp.clip((trained - ends[i]) / (ends[i + 1] - ends[i]), 0.0, 1.0)
                value = lrs[i + 1] + (lrs[i] - lrs[i + 1]) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
            lr = jnp.where(trained < ends[i + 1], value, lr)
        return lr
    return phases


def _decay(c, tokens_before) -> optax.Schedule:
    """The schedule after warmup, as a function of the step counted from step 0."""
    if c.schedule == 'constant':
        return optax.constant_schedule(c.lr)
    if c.schedule == 'phases':
        if tokens_before is None:
            raise ValueError("optim.schedule='phases' measures its phases in tokens: pass tokens_before "
                             '(dsjax.data.batch_ramp.BatchRamp.tokens_before_traced)')
        return _phases(c, tokens_before)
    if c.schedule == 'multistep':
        # Factors are absolute multipliers of the peak lr (not cumulative): DeepSeek-LLM's
        # (0.316, 0.1) means 31.6% of peak from 80% of the steps on and 10% from 90% on.
        bounds = jnp.array([round(m * c.decay_steps) for m in c.milestones])
        values = jnp.array((1.0,) + tuple(c.milestone_factors)) * c.lr

        def multistep(step):
            return values[jnp.sum(step >= bounds)]
        return multistep
    span, floor = c.decay_steps - c.warmup_steps, c.lr * c.min_lr_ratio

    def cosine(step):
        frac = jnp.clip((step - c.warmup_steps) / span, 0.0, 1.0)
        return floor + (c.lr - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return cosine


def make_schedule(optim_cfg, tokens_before=None) -> optax.Schedule:
    """Linear warmup 0 -> `lr` over `warmup_steps`, then the named decay (its end value held after).
    `tokens_before(step)`: tokens trained before a (traced) step, the clock of schedule 'phases'."""
    config_lib.validate_optim(optim_cfg)
    c = optim_cfg
    decay = _decay(c, tokens_before)
    if c.warmup_steps == 0:
        return decay
    warmup = c.warmup_steps

    def schedule(step):
        return jnp.where(step < warmup, c.lr * step / warmup, decay(step))
    return schedule


def decay_mask(params):
    """True for the leaves that get weight decay: the weight matrices, not the RMSNorm scales (`scale`)
    nor the attention biases (`*_bias`)."""
    # Matrices (including the embedding and the output head) are decayed; norm scales and biases are
    # not, as in Megatron/DeepSeek-style AdamW: shrinking a norm scale or a bias towards 0 is not a
    # regulariser, it changes the function. Embeddings stay decayed because they are ordinary weight
    # matrices and the DeepSeek papers name no exception. The rule goes by name, not ndim: a scanned
    # stack's norm scales are [layers, D].
    def decayed(path, _):
        name = str(getattr(path[-1], 'key', path[-1]))
        return not (name == 'scale' or name.endswith('bias'))
    return jax.tree_util.tree_map_with_path(decayed, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's math, g * min(1, max_norm / ||g||), as a scalar multiply that XLA
    folds into AdamW's moment updates. optax writes it `where(norm < max_norm, g, g / norm * max_norm)`,
    whose two branches make XLA materialise the clipped gradients: on the CPU a fresh parameter-sized
    buffer every step (v3_small with 128 experts: 70K page faults and 2.1x the optimizer's time)."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype: str = 'float32') -> optax.GradientTransformation:
    """Adam's scaling (optax.scale_by_adam, same state) with both moments stored in `moment_dtype`, as V3
    stored them in bfloat16 (optax's mu_dtype covers only the first). Each step updates the moments in the
    gradient's float32, rounds them for storage and takes the update from the stored values, so no
    float32 copy of them outlives the step's fusions (with float32 copies kept for the update, XLA held
    them at the peak and saved nothing)."""
    if moment_dtype == 'float32':
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    dtype = jnp.dtype(moment_dtype)

    def init(params):
        def zeros():
            return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

    def update(updates, state, params=None):
        del params
        as_grads = lambda tree: optax.tree.cast_like(tree, updates)
        mu = optax.tree.cast(optax.tree.update_moment(updates, as_grads(state.mu), b1, 1), dtype)
        nu = optax.tree.cast(optax.tree.update_moment_per_elem_norm(updates, as_grads(state.nu), b2, 2), dtype)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(as_grads(mu), b1, count)
        nu_hat = optax.tree.bias_correction(as_grads(nu), b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg, params=None, tokens_before=None) -> optax.GradientTransformation:
    """Global-norm clipping (if `clip_norm` > 0), then AdamW on `make_schedule` with decay on the weight
    matrices (`decay_mask`) and its moments in `moment_dtype`.

    Args:
      optim_cfg: the `config.optim` section.
      params: optional parameter pytree (arrays or ShapeDtypeStructs); when given the weight-decay
        mask is fixed from it now, otherwise it is computed from the params at `init`/`update`.
      tokens_before: tokens trained before a step, for schedule 'phases' (see `make_schedule`).

    Returns:
      The optax transformation; the loop reads the lr of a step from `make_schedule`.
    """
    c = optim_cfg
    mask = decay_mask if params is None else decay_mask(params)
    # optax.adamw's chain, with the moments in `moment_dtype`.
    adamw = optax.chain(scale_by_adam(c.b1, c.b2, c.eps, c.moment_dtype),
                        optax.add_decayed_weights(c.weight_decay, mask),
                        optax.scale_by_learning_rate(make_schedule(c, tokens_before)))
    if c.clip_norm > 0:
        return optax.chain(clip_by_global_norm(c.clip_norm), adamw)
    return adamw
