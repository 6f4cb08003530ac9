"""SFT: assistant-only masked loss, gradient accumulation == one big batch, the stage end to end."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.posttrain import losses, sft
from dsjax.model.transformer import Transformer
from dsjax.train import logger
from dsjax.train import step as step_lib
from dsjax.train.state import TrainState


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sft_loss_counts_only_masked_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    weights = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)
    nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    expected = (nll * weights).sum() / weights.sum()
    got = losses.sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), weights.sum())
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # Prompt positions (weight 0) do not matter, whatever the model predicts there.
    changed = logits.copy()
    changed[weights == 0] += rng.normal(size=changed[weights == 0].shape).astype(np.float32) * 5
    got2 = losses.sft_loss(jnp.asarray(changed), jnp.asarray(targets), jnp.asarray(weights), weights.sum())
    assert float(got2) == pytest.approx(expected, rel=1e-6)


def _state_and_batch(cfg):
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))['params']
    optimizer = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       rng=jax.random.PRNGKey(1), buffers={}, nonfinite_skips=jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, size=(4, 9)).astype(np.int32)
    # Very uneven assistant-token counts per row: a per-micro-batch mean would weight them wrongly.
    weights = np.zeros((4, 8), np.float32)
    weights[0, 1:] = 1
    weights[1, 7] = 1
    weights[2, 3:5] = 1
    weights[3, 2:] = 1
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones((4, 8), np.int32),
             'positions': np.tile(np.arange(8, dtype=np.int32), (4, 1)), 'weights': weights}
    return model, optimizer, state, jax.tree.map(jnp.asarray, batch)


def test_gradient_accumulation_equals_one_big_batch(tiny_model):
    cfg = tiny_model()
    model, optimizer, state, batch = _state_and_batch(cfg)
    train_cfg = config_lib.base_config().train
    schedule = optax.constant_schedule(1.0)
    results = {}
    apply_gradients = step_lib.make_apply_gradients(optimizer, schedule, train_cfg)
    for micro in (1, 2, 4):
        step = jax.jit(step_lib.make_accumulating_step(sft.make_loss_fn(model), apply_gradients, micro))
        results[micro] = step(state, batch)
    ref_state, ref_metrics = results[1]
    # Reference: the token mean over the whole batch, by hand.
    logits, _ = model.apply({'params': state.params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    nll = -np.take_along_axis(_log_softmax(np.asarray(logits)), np.asarray(batch['targets'])[..., None], -1)[..., 0]
    expected = float((nll * batch['weights']).sum() / batch['weights'].sum())
    assert float(ref_metrics['loss']) == pytest.approx(expected, rel=1e-5)
    for micro in (2, 4):
        new_state, metrics = results[micro]
        assert float(metrics['loss']) == pytest.approx(expected, rel=1e-5)
        assert float(metrics['grad_norm']) == pytest.approx(float(ref_metrics['grad_norm']), rel=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     new_state.params, ref_state.params)


def test_bad_fields_are_named():
    c = config_lib.base_config()
    c.stage = 'sft'
    with pytest.raises(config_lib.ConfigError, match='sft.paths'):
        sft.validate(c, 1)
    c.sft.source = 'cold_start'
    c.sft.tasks = ('arithmetic:9',)
    with pytest.raises(config_lib.ConfigError, match='sft.tasks'):
        sft.validate(c, 1)
    c.sft.tasks = ('countdown:3',)
    c.sft.template = 'r1'
    with pytest.raises(config_lib.ConfigError, match="sft.template='r1'.*'zero', 'chat'"):
        sft.validate(c, 1)
    c.sft.template, c.sft.system = 'zero', 'Be brief.'
    with pytest.raises(config_lib.ConfigError, match='sft.system.*R1-Zero template has no system prompt'):
        sft.validate(c, 1)


def test_cold_start_sft_stage_lowers_the_assistant_loss(tmp_path):
    c = presets.load_experiment(__file__.replace('tests/posttrain/test_sft.py', 'experiments/x.py'),
                                   'llm_small', 'smoke')
    c.stage = 'sft'
    c.sft.update(source='cold_start', tasks=('arithmetic:1',), examples=64, val_examples=16)
    c.train.micro_batches = 2
    c.data.seq_len = 64
    c.model.max_position_embeddings = 128
    c.train.update(steps=6, eval_every=6, checkpoint_every=6, async_checkpoint=False)
    c.optim.update(lr=3e-3, decay_steps=6)
    c.mesh.data = 1
    last = sft.run(c, tmp_path, devices=jax.devices()[:1])
    records = [r for r in logger.read_metrics(tmp_path) if 'val_loss' in r]
    assert records[0]['step'] == 0 and records[-1]['step'] == 6
    assert records[-1]['val_loss'] < records[0]['val_loss']
    assert np.isfinite(last['loss'])
    assert (tmp_path / 'checkpoints' / '6').is_dir()
