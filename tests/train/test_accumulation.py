"""Gradient accumulation in pre-training (dsjax/train/step.py): M micro-batches make exactly the update of one
step on the whole batch (cross-entropy, MTP, the balance losses, the routing bias), and micro-batches that the
batch ramp leaves as padding are skipped without changing anything."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import loop, optim
from dsjax.train import step as step_lib
from tests.conftest import TINY_MLA_MOE

B, L = 8, 16


def _config(micro_batches: int):
    """V3-like: MLA, sigmoid routing with the bias, the sequence-wise balance loss, two MTP depths."""
    c = config_lib.base_config()
    c.model.update(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, initializer_range=0.1, max_position_embeddings=64, **TINY_MLA_MOE,
                   aux_loss_alpha=0.01, seq_aux=True, num_nextn_predict_layers=2)
    c.train.update(bias_update_rate=0.01, mtp_loss_weight=0.3, micro_batches=micro_batches)
    c.data.update(seq_len=L, batch_size=B)
    # Adam's eps raised: its first step is otherwise ~sign(g), which turns float noise in gradients near 0 into
    # whole-lr differences; with it the update is a smooth function of the gradient.
    c.optim.update(lr=1e-2, warmup_steps=0, schedule='constant', eps=1e-3)
    c.mesh.update(data=1)
    return c


def _batch(rows: int, seed: int = 0):
    """Packed rows of random documents: two per row, so segments and MTP's in-document targets matter."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, 97, size=(rows, L + 1)).astype(np.int32)
    segments = np.where(np.arange(L + 1) < 1 + rng.randint(4, L - 4, size=(rows, 1)), 1, 2).astype(np.int32)
    positions = np.where(segments == 1, np.arange(L + 1), np.arange(L + 1) - (segments == 1).sum(1, keepdims=True))
    weights = (segments[:, :-1] == segments[:, 1:]).astype(np.float32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segments[:, :-1],
            'positions': positions[:, :-1].astype(np.int32), 'weights': weights}


@functools.lru_cache(maxsize=None)
def _step_and_state(micro_batches: int, batch_size: int = B):
    c = _config(micro_batches)
    c.data.batch_size = batch_size
    model = Transformer(config_lib.freeze_model(c.model))
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        optimizer = optim.make_optimizer(c.optim)
        init, _, _ = loop.build_state_fns(model, optimizer, mesh, c.data.seq_len)
        apply_gradients = step_lib.make_apply_gradients(optimizer, optim.make_schedule(c.optim), c.train)
        return jax.jit(step_lib.make_train_step(model, apply_gradients, c.train)), init(jax.random.PRNGKey(0))


def _one_step(micro_batches, batch):
    step, state = _step_and_state(micro_batches, len(batch['inputs']))
    return jax.tree.map(np.asarray, step(jax.tree.map(jnp.copy, state), batch))  # the step donates nothing here


def _assert_same_update(got, want):
    (state_a, metrics_a), (state_b, metrics_b) = got, want
    for k in ('loss', 'total_loss', 'balance_loss', 'mtp_loss', 'tokens', 'grad_norm'):
        np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=2e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state_a.params, state_b.params)
    jax.tree.map(np.testing.assert_array_equal, state_a.buffers, state_b.buffers)


def test_micro_batches_equal_one_big_batch():
    batch = _batch(B)
    whole = _one_step(1, batch)
    assert whole[1]['balance_loss'] > 0 and whole[1]['mtp_loss'] > 0
    _assert_same_update(_one_step(4, batch), whole)


def test_padding_micro_batches_are_skipped():
    """The batch ramp's layout: real rows in micro-batches 0 and 1 of 4 (rows r with r % 4 < 2), the others
    padding. The update equals the step on the 4 real rows alone, and the step holds a cond that skips."""
    real = _batch(B // 2)
    padded = {k: np.zeros((B,) + v.shape[1:], v.dtype) for k, v in real.items()}
    rows = np.arange(B)[np.arange(B) % 4 < 2]  # micro-batch m holds rows m, m + 4
    for k in padded:
        padded[k][rows] = real[k]
    _assert_same_update(_one_step(4, padded), _one_step(2, real))
    step, state = _step_and_state(4)
    assert 'stablehlo.case' in step.lower(state, padded).as_text()  # the micro-batch loop branches
