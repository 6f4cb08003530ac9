"""The whole pre-training loop on the embedded corpus: sharding layouts, resume, NaN stop, eval."""
import time

import jax
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.train import checkpoint, logger, loop

LAYOUTS = {
    'data': dict(data=8, fsdp=1, expert=1, tensor=1),
    'fsdp': dict(data=1, fsdp=8, expert=1, tensor=1),
    'data_fsdp_tensor': dict(data=2, fsdp=2, expert=1, tensor=2),
}


def _config(steps=4, **mesh):
    c = config_lib.base_config()
    presets.smoke(c)
    c.train.steps = steps
    c.train.async_checkpoint = False
    c.optim.decay_steps = 8
    c.mesh.update(**(mesh or dict(data=1)))
    return c


def _losses(workdir):
    return {r['step']: r['loss'] for r in logger.read_metrics(workdir) if 'loss' in r}


def _params(workdir, step):
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=5, async_save=False)
    restored = ckpt.restore_config(step)
    assert restored['train']['steps'] >= step
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').resolve())
    ckpt.close()
    return state['params']


@pytest.fixture(scope='module')
def single_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('one_device')
    last = loop.run(_config(), workdir, devices=jax.devices()[:1])
    return workdir, last


@pytest.mark.parametrize('layout', LAYOUTS)
def test_layouts_match_one_device(single_device_run, tmp_path, layout):
    reference, _ = single_device_run
    loop.run(_config(**LAYOUTS[layout]), tmp_path)
    ref, got = _losses(reference), _losses(tmp_path)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    # Same maths, different reduction order across devices: float32 agreement to ~1e-5 relative.
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5)


def test_resume_equals_straight_run(single_device_run, tmp_path):
    straight, _ = single_device_run
    loop.run(_config(steps=2), tmp_path, devices=jax.devices()[:1])
    loop.run(_config(steps=4), tmp_path, devices=jax.devices()[:1])  # resumes at step 2
    a, b = _params(straight, 4), _params(tmp_path, 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert _losses(tmp_path) == _losses(straight)


def test_init_from_a_run_with_another_tokenizer_is_an_error(single_device_run, tmp_path):
    """Another training split trains another sentencepiece model: starting from a run trained with the
    first one fails naming the field, before any step; the same data section starts fine."""
    previous, _ = single_device_run
    c = _config(steps=1)
    c.init.checkpoint = str(previous)
    c.data.val_fraction = 0.3
    with pytest.raises(config_lib.ConfigError, match=r"init.checkpoint=.* another sentencepiece model .*"
                                                     r"data.val_fraction=0.3 \(there 0.05\)"):
        loop.run(c, tmp_path / 'other', devices=jax.devices()[:1])
    assert not (tmp_path / 'other' / 'checkpoints').exists()
    c.data.val_fraction = _config().data.val_fraction
    loop.run(c, tmp_path / 'same', devices=jax.devices()[:1])
    assert checkpoint.complete_steps(tmp_path / 'same' / 'checkpoints') == [1]


def test_metrics_and_eval_logged(single_device_run):
    workdir, last = single_device_run
    records = logger.read_metrics(workdir)
    evals = [r['step'] for r in records if 'val_loss' in r]
    assert evals == [0, 2, 4]
    for key in ('loss', 'grad_norm', 'lr', 'tokens_per_s', 'mfu'):
        assert np.isfinite(last[key]), key
    assert (workdir / 'config.json').exists()
    assert list((workdir / 'tensorboard').iterdir())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = _config(steps=6)
    c.optim.lr, c.optim.clip_norm, c.optim.warmup_steps = 1e35, 0.0, 0
    c.train.checkpoint_every = 1
    with pytest.raises(loop.NonFiniteError, match='last good checkpoint is step'):
        loop.run(c, tmp_path, devices=jax.devices()[:1])
    saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved, 'the good steps before the blow-up were checkpointed'
    params = _params(tmp_path, saved[-1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_checkpoint_carries_params_and_routing_bias(tmp_path):
    """A stage started from a previous stage's checkpoint gets its params and its V3 routing bias."""
    import flax.linen as nn

    from dsjax import sharding
    from dsjax.model.transformer import Transformer
    from dsjax.train import optim

    c = presets.load_experiment(__file__.replace('tests/train/test_loop.py', 'experiments/x.py'), 'v3_small',
                                   'smoke')
    c.mesh.data = 1
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    model_cfg = config_lib.freeze_model(c.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        init, abstract, _ = loop.build_state_fns(Transformer(model_cfg), optim.make_optimizer(c.optim), mesh,
                                                 c.data.seq_len)
        previous = init(jax.random.PRNGKey(0))  # stands for the end of a first stage, with a moved bias
        previous = previous.replace(step=previous.step + 7, buffers=jax.tree.map(
            lambda b: jax.random.normal(jax.random.PRNGKey(2), b.shape, b.dtype), previous.buffers))
        ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', keep=2, async_save=False)
        ckpt.save(7, previous, force=True)
        ckpt.close()
        started = init(jax.random.PRNGKey(1), *loop.start_from(str(tmp_path), model_cfg, abstract))
    assert jax.tree.leaves(previous.buffers)
    jax.tree.map(np.testing.assert_array_equal, started.buffers, previous.buffers)
    jax.tree.map(np.testing.assert_array_equal, started.params, previous.params)
    assert int(started.step) == 0  # a new stage: fresh optimizer and step counter
    # The loaded weights become the state's (donated, aliased); no random parameters are drawn beside them.
    fresh = init.lower(jax.random.PRNGKey(0)).compile().memory_analysis()
    loading = init.lower(jax.random.PRNGKey(0), abstract.params, abstract.buffers).compile().memory_analysis()
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
    assert loading.alias_size_in_bytes >= param_bytes
    assert loading.output_size_in_bytes - loading.alias_size_in_bytes <= fresh.output_size_in_bytes - param_bytes


def test_metrics_are_fetched_one_step_late(tmp_path, monkeypatch):
    """Step t's metrics are read only once step t+1 is queued; only the last step (which evaluates and
    saves anyway) reads its own. The input pipeline's share of the time is logged."""
    events = []
    global_batch, check_finite = loop.sharding.global_batch, loop._check_finite

    def batch(*args):
        events.append('batch')
        if events.count('batch') == 4:  # one slow training batch: its wait must land in the interval holding it
            time.sleep(0.5)
        return global_batch(*args)

    def fetch(step, *args):
        events.append(f'fetch {step}')
        return check_finite(step, *args)

    monkeypatch.setattr(loop.sharding, 'global_batch', batch)
    monkeypatch.setattr(loop, '_check_finite', fetch)
    c = _config(steps=5)
    c.train.update(eval_every=100, checkpoint_every=100, log_every=1, eval_batches=1)
    loop.run(c, tmp_path, devices=jax.devices()[:1])
    # One evaluation batch at step 0 and one after the last step.
    assert events[1:-1] == ['batch', 'batch', 'fetch 1', 'batch', 'fetch 2', 'batch', 'fetch 3', 'batch',
                            'fetch 4', 'fetch 5']
    logged = [r for r in logger.read_metrics(tmp_path) if 'loss' in r]
    assert [r['step'] for r in logged] == [1, 2, 3, 4, 5]
    assert all(0 <= r['data_wait_frac'] < 1 for r in logged)
    assert max(r['data_wait_frac'] for r in logged) > 0.5
