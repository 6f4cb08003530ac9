"""Tests for dsjax/train/optim.py: schedule values, AdamW weight-decay mask, clipping, validation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax.data import batch_ramp
from dsjax.train import optim


def _cfg(**overrides):
    cfg = config_lib.base_config().optim
    cfg.update(lr=1e-3, schedule='cosine', warmup_steps=100, min_lr_ratio=0.1, decay_steps=1100, milestones=(),
               milestone_factors=(), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=0.0,
               moment_dtype='float32')
    cfg.update(overrides)
    return cfg


def _lr(cfg, step):
    return float(optim.make_schedule(cfg)(jnp.asarray(step)))


def test_warmup_and_cosine_values():
    cfg = _cfg()
    assert _lr(cfg, 0) == 0.0
    assert _lr(cfg, 50) == pytest.approx(5e-4)            # warmup midpoint
    assert _lr(cfg, 100) == pytest.approx(1e-3)           # peak
    assert _lr(cfg, 600) == pytest.approx(1e-4 + 0.5 * 9e-4)  # cosine midpoint: halfway to the floor
    assert _lr(cfg, 350) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert _lr(cfg, 1100) == pytest.approx(1e-4)          # floor at decay_steps
    assert _lr(cfg, 5000) == pytest.approx(1e-4)          # and held after


def test_multistep_values():
    cfg = _cfg(schedule='multistep', warmup_steps=10, decay_steps=1000,
               milestones=(0.8, 0.9), milestone_factors=(0.316, 0.1))
    assert _lr(cfg, 5) == pytest.approx(5e-4)
    assert _lr(cfg, 10) == pytest.approx(1e-3)
    assert _lr(cfg, 799) == pytest.approx(1e-3)
    assert _lr(cfg, 800) == pytest.approx(3.16e-4)
    assert _lr(cfg, 899) == pytest.approx(3.16e-4)
    assert _lr(cfg, 900) == pytest.approx(1e-4)           # factors are absolute, not cumulative
    assert _lr(cfg, 10_000) == pytest.approx(1e-4)


def test_constant_and_no_warmup():
    cfg = _cfg(schedule='constant', warmup_steps=0)
    assert _lr(cfg, 0) == pytest.approx(1e-3)
    assert _lr(cfg, 10_000) == pytest.approx(1e-3)


def test_weight_decay_only_on_matrices():
    cfg = _cfg(schedule='constant', warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    # A scanned stack's norm scales and q biases are 2-D ([layers, D], [layers, N, K]) and still not decayed.
    params = {'w': jnp.full((2, 3), 2.0), 'scale': jnp.full((4, 3), 2.0), 'q_bias': jnp.full((4, 2, 3), 2.0)}
    grads = {'w': jnp.full((2, 3), 0.3), 'scale': jnp.full((4, 3), 0.3), 'q_bias': jnp.full((4, 2, 3), 0.3)}
    tx = optim.make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    # First AdamW step by hand: m_hat = g, v_hat = g^2, so the Adam direction is g / (|g| + eps).
    adam = 0.3 / (0.3 + cfg.eps)
    np.testing.assert_allclose(updates['w'], -cfg.lr * (adam + 0.5 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(updates['scale'], -cfg.lr * adam, rtol=1e-6)
    np.testing.assert_allclose(updates['q_bias'], -cfg.lr * adam, rtol=1e-6)
    # A mask fixed up front from abstract params gives the same update.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx2 = optim.make_optimizer(cfg, abstract)
    updates2, _ = tx2.update(grads, tx2.init(params), params)
    jax.tree.map(np.testing.assert_allclose, updates, updates2)


def _adam_input(cfg, grads):
    """The gradient AdamW saw on its first step, read back from its first moment mu = (1 - b1) g."""
    tx = optim.make_optimizer(cfg)
    params = jax.tree.map(jnp.zeros_like, grads)
    _, state = tx.update(grads, tx.init(params), params)
    mu = optax.tree_utils.tree_get(state, 'mu')
    return jax.tree.map(lambda m: m / (1 - cfg.b1), mu)


def test_clipping_clips_global_norm():
    grads = {'a': jnp.full((2, 2), 3.0), 'b': jnp.full((4,), 4.0)}  # global norm 10
    seen = _adam_input(_cfg(clip_norm=1.0), grads)
    assert float(optax.tree.norm(seen)) == pytest.approx(1.0)
    np.testing.assert_allclose(seen['a'], 0.3, rtol=1e-5)
    # Below the threshold, and with clipping off, AdamW sees the raw gradient.
    small = jax.tree.map(lambda g: g / 100, grads)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5)  # noqa: E731
    jax.tree.map(close, _adam_input(_cfg(clip_norm=1.0), small), small)
    jax.tree.map(close, _adam_input(_cfg(clip_norm=0.0), grads), grads)


@pytest.mark.parametrize('max_norm', [0.5, 50.0])
def test_clip_matches_optax(max_norm):
    """Our scalar-multiply clip against optax's where-based one, clipping (0.5) and not (50): same
    updates to float rounding, and the same (empty) state, so checkpoints of either restore."""
    rng = np.random.default_rng(0)
    grads = {'w': jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
             'b': jnp.asarray(rng.standard_normal((16,)), jnp.float32)}
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    ours_out, ours_state = ours.update(grads, ours.init(grads))
    theirs_out, theirs_state = theirs.update(grads, theirs.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours_out, theirs_out)
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)


@pytest.mark.parametrize('field, value', [
    ('lr', 0.0), ('schedule', 'linear'), ('warmup_steps', -1), ('min_lr_ratio', 1.5),
    ('b1', 1.0), ('b2', -0.1), ('eps', 0.0), ('weight_decay', -0.1), ('clip_norm', -1.0),
    ('decay_steps', 0), ('moment_dtype', 'float16'),
])
def test_validation_names_field(field, value):
    with pytest.raises(ValueError, match=rf'optim\.{field}='):
        config_lib.validate_optim(_cfg(**{field: value}))


# V3's schedule as the paper gives it (4.2): warm up over 2K steps to 2.2e-4, hold until 10T tokens, cosine to
# 2.2e-5 over 4.3T, 2.2e-5 for 333B, then 7.3e-6 for the last 167B (14.8T in all).
V3_PHASES = dict(lr=2.2e-4, schedule='phases', warmup_steps=2000, phase_ends=(10e12, 14.3e12, 14.633e12, 14.8e12),
                 phase_shapes=('constant', 'cosine', 'constant', 'constant'),
                 phase_factors=(1.0, 0.1, 0.1, 7.3e-6 / 2.2e-4))
TOKENS_PER_STEP = 15360 * 4096  # V3's full batch


def test_v3_phases_by_hand():
    schedule = optim.make_schedule(_cfg(**V3_PHASES), lambda step: step * float(TOKENS_PER_STEP))
    lr = lambda tokens: float(schedule(jnp.asarray(round(tokens / TOKENS_PER_STEP))))
    assert float(schedule(jnp.asarray(0))) == 0.0
    assert float(schedule(jnp.asarray(1000))) == pytest.approx(1.1e-4)  # half-way through the warmup
    assert float(schedule(jnp.asarray(2000))) == pytest.approx(2.2e-4)
    assert lr(5e12) == pytest.approx(2.2e-4)
    assert lr(9.99e12) == pytest.approx(2.2e-4)  # still the peak just before 10T
    # Cosine over [10T, 14.3T): a quarter in, 2.2e-5 + 1.98e-4 (1 + cos(pi/4)) / 2 = 1.9100e-4; half-way 1.21e-4.
    assert lr(10e12 + 4.3e12 / 4) == pytest.approx(1.9100e-4, rel=1e-3)
    assert lr(10e12 + 4.3e12 / 2) == pytest.approx(1.21e-4, rel=1e-3)
    assert lr(14.29e12) == pytest.approx(2.2e-5, rel=1e-3)
    assert lr(14.4e12) == pytest.approx(2.2e-5)  # the 333B at 2.2e-5
    assert lr(14.7e12) == pytest.approx(7.3e-6)  # the last 167B
    assert lr(15e12) == pytest.approx(7.3e-6)  # held after


def test_v3_phases_follow_tokens_through_the_batch_ramp():
    """With the ramp the constant phase still ends at 10T tokens, which is more steps than 10T / 15360 x 4096."""
    ramp = batch_ramp.BatchRamp(start=3072, end=15360, tokens=469e9, granule=768, seq_len=4096)
    schedule = optim.make_schedule(_cfg(**V3_PHASES), ramp.tokens_before_traced)
    boundary = ramp.steps_for(10e12)
    assert boundary > 10e12 / TOKENS_PER_STEP
    assert float(schedule(jnp.asarray(boundary - 1))) == pytest.approx(2.2e-4)
    assert float(schedule(jnp.asarray(boundary + 1))) < 2.2e-4
    assert float(schedule(jnp.asarray(ramp.steps_for(14.8e12)))) == pytest.approx(7.3e-6)
    with pytest.raises(ValueError, match='tokens_before'):
        optim.make_schedule(_cfg(**V3_PHASES))


@pytest.mark.parametrize('overrides, field', [
    (dict(phase_ends=()), 'phase_ends'),
    (dict(phase_ends=(2e12, 1e12, 3e12, 4e12)), 'phase_ends'),
    (dict(phase_shapes=('constant', 'linear', 'constant', 'constant')), 'phase_shapes'),
    (dict(phase_factors=(1.0, 0.1, 0.1)), 'phase_factors'),
    (dict(phase_factors=(1.0, 0.1, 0.1, 2.0)), 'phase_factors'),
])
def test_validation_phases(overrides, field):
    with pytest.raises(ValueError, match=rf'optim\.{field}='):
        config_lib.validate_optim(_cfg(**dict(V3_PHASES, **overrides)))


@pytest.mark.parametrize('milestones, factors, field', [
    ((0.9, 0.8), (0.3, 0.1), 'milestones'),
    ((0.5, 1.0), (0.3, 0.1), 'milestones'),
    ((0.8, 0.9), (0.3,), 'milestone_factors'),
    ((0.8,), (1.5,), 'milestone_factors'),
    ((0.8,), (0.0,), 'milestone_factors'),
    ((), (), 'milestones'),
])
def test_validation_multistep(milestones, factors, field):
    cfg = _cfg(schedule='multistep', milestones=milestones, milestone_factors=factors)
    with pytest.raises(ValueError, match=rf'optim\.{field}='):
        config_lib.validate_optim(cfg)


def test_valid_configs_pass():
    config_lib.validate_optim(_cfg())
    config_lib.validate_optim(_cfg(schedule='multistep', milestones=(0.8, 0.9), milestone_factors=(0.316, 0.1)))


def test_bfloat16_moments_track_float32_adam():
    """moment_dtype='bfloat16' (V3's optimizer state): moments stored in bfloat16, the same state tree as
    optax's AdamW, the first update float32 AdamW's to bfloat16 rounding (it reads the rounded moments),
    and the parameters within bfloat16 rounding of float32 AdamW's after 20 steps on a quadratic."""
    rng = np.random.default_rng(0)
    target = {'w': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
              'b': jnp.asarray(rng.standard_normal((8,)), jnp.float32)}
    grad_fn = jax.grad(lambda p: sum(((p[k] - target[k]) ** 2).sum() for k in p))
    runs = {}
    for dtype in ('float32', 'bfloat16'):
        tx = optim.make_optimizer(_cfg(moment_dtype=dtype, warmup_steps=0, lr=1e-2, clip_norm=1.0))
        params = jax.tree.map(jnp.zeros_like, target)
        state = tx.init(params)
        updates = []
        for _ in range(20):
            u, state = tx.update(grad_fn(params), state, params)
            params = optax.apply_updates(params, u)
            updates.append(u)
        runs[dtype] = params, state, updates
    (p32, s32, u32), (p16, s16, u16) = runs['float32'], runs['bfloat16']
    assert jax.tree.structure(s16) == jax.tree.structure(s32)
    assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(s16, 'mu'))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(s16, 'nu'))} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2), u16[0], u32[0])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u16[-1]), jax.tree.leaves(u32[-1])))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), p16, p32)
