"""Golden one-step metrics (as nanodo keeps them): the pre-training step and the GRPO update on fixed tiny
configs and fixed batches give pinned values, so a refactor cannot silently change the math.

The values were pinned from the code before the loop refactor (one loop, one apply_gradients) and must
not move; if a deliberate change of the math moves them, say so in the commit and re-pin. Re-pinned once:
weight decay no longer shrinks the norm scales of scanned stacks (optim.decay_mask by name), which moves
every second step.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model.transformer import Transformer
from dsjax.posttrain import grpo
from dsjax.train import loop, optim
from dsjax.train import step as step_lib
from tests.conftest import TINY_MLA_MOE

B, L = 4, 16


def _config(moe: bool):
    c = config_lib.base_config()
    c.model.update(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, initializer_range=0.1, max_position_embeddings=64)
    if moe:
        c.model.update(**TINY_MLA_MOE, aux_loss_alpha=0.01, seq_aux=True, num_nextn_predict_layers=1)
        c.train.update(bias_update_rate=0.01, mtp_loss_weight=0.3)
    c.data.update(seq_len=L, batch_size=B)
    c.optim.update(lr=1e-2, warmup_steps=0, schedule='constant')
    c.mesh.update(data=1)
    return c


def _state(c, model):
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    init, _, _ = loop.build_state_fns(model, optim.make_optimizer(c.optim), mesh, c.data.seq_len)
    return init(jax.random.PRNGKey(0))


def _apply_gradients(c):
    return step_lib.make_apply_gradients(optim.make_optimizer(c.optim), optim.make_schedule(c.optim), c.train)


def _text_batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 97, size=(B, L + 1)).astype(np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones((B, L), np.int32),
            'positions': np.tile(np.arange(L, dtype=np.int32), (B, 1)), 'weights': np.ones((B, L), np.float32)}


# (loss, grad_norm) of two consecutive steps; the MoE one also the routing bias' sum of |b| after them.
PRETRAIN = {
    'dense': dict(loss=(4.7289147, 3.9483070), grad_norm=(1.9932514, 1.6073587)),
    'moe': dict(loss=(4.7007155, 3.9437051), grad_norm=(2.4740391, 1.8567878), bias_abs_sum=0.24),
}


@pytest.mark.parametrize('kind', PRETRAIN)
def test_pretrain_steps_match_golden_values(kind):
    c = _config(kind == 'moe')
    model = Transformer(config_lib.freeze_model(c.model))
    with jax.set_mesh(sharding.make_mesh(c.mesh, jax.devices()[:1])), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state = _state(c, model)
        train_step = jax.jit(step_lib.make_train_step(model, _apply_gradients(c), c.train))
        got = {'loss': [], 'grad_norm': []}
        for _ in range(2):
            state, metrics = train_step(state, _text_batch())
            got['loss'].append(float(metrics['loss']))
            got['grad_norm'].append(float(metrics['grad_norm']))
    want = PRETRAIN[kind]
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
    np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-5)
    if 'bias_abs_sum' in want:
        bias = sum(float(jnp.abs(b).sum()) for b in jax.tree.leaves(state.buffers['moe_bias']))
        np.testing.assert_allclose(bias, want['bias_abs_sum'], rtol=1e-5)


def _grpo_batch(c, model, params):
    """Four completions of two prompts; ref and old log-probs a fixed offset from the policy's own."""
    prompt_BxW = np.array([[1, 11, 12, 13], [1, 21, 22, 0], [1, 11, 12, 13], [1, 21, 22, 0]], np.int32)
    lengths_B = np.array([4, 3, 4, 3])
    tokens_BxN = np.array([[31, 32, 2, 0], [41, 42, 43, 44], [33, 2, 0, 0], [45, 46, 2, 0]], np.int32)
    mask_BxN = tokens_BxN != 0
    mask_BxN[:, 0] = True
    batch = grpo.sequences(prompt_BxW, lengths_B, tokens_BxN, mask_BxN, pad_id=0)
    batch.update(completions=tokens_BxN, mask=mask_BxN, advantages=np.array([1.0, -0.5, -1.0, 0.5], np.float32))
    own = grpo.make_logprob_fn(model, 4, c.grpo.temperature)({'params': params}, batch)
    offsets = np.linspace(-0.2, 0.2, 16, dtype=np.float32).reshape(4, 4)
    batch['ref_logprobs'] = own + offsets
    batch['old_logprobs'] = own - 2 * offsets  # ratios exp(+-0.4): some clipped
    return batch


# loss, grad_norm, kl and clip_fraction of two updates on one batch (num_iterations=2).
GRPO = dict(loss=(0.040061124, 0.0097575337), grad_norm=(4.9269466, 4.0175147), kl=(0.0071726344, 0.0081052780),
            clip_fraction=(1 / 6, 1 / 3))


def test_grpo_updates_match_golden_values():
    c = _config(moe=False)
    c.grpo.update(beta=0.04, num_iterations=2, temperature=0.9, epsilon=0.2, epsilon_high=0.28,
                  loss_type='grpo', max_completion_length=4)
    c.optim.lr = 1e-4
    model = Transformer(config_lib.freeze_model(c.model))
    with jax.set_mesh(sharding.make_mesh(c.mesh, jax.devices()[:1])), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state = _state(c, model)
        batch = _grpo_batch(c, model, state.params)
        update = jax.jit(grpo.make_update_step(model, _apply_gradients(c), c.grpo))
        got = {k: [] for k in GRPO}
        for _ in range(2):
            state, metrics = update(state, batch)
            for k in GRPO:
                got[k].append(float(metrics[k]))
    for k, want in GRPO.items():
        np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-7, err_msg=k)
