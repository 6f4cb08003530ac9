"""A checkpoint written on one mesh restores onto another (8 devices fsdp -> 4 devices data x tensor)."""
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax import sharding
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model.transformer import Transformer
from dsjax.train import checkpoint, logger, loop, optim
from dsjax.train import step as step_lib

FSDP_8 = dict(data=1, fsdp=8, expert=1, tensor=1)
DATA_TENSOR_4 = dict(data=2, fsdp=1, expert=1, tensor=2)


def _config(steps, mesh):
    c = config_lib.base_config()
    presets.smoke(c)
    c.train.update(steps=steps, async_checkpoint=False, peak_flops=1e12, keep_checkpoints=5)
    c.optim.decay_steps = 8
    c.mesh.update(**mesh)
    return c


@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory):
    """Four steps on 8 devices, parameters sharded over fsdp; checkpoints and evaluations at 2 and 4."""
    workdir = tmp_path_factory.mktemp('fsdp8')
    loop.run(_config(4, FSDP_8), workdir, devices=jax.devices())
    return workdir


def _restore_and_evaluate(config, workdir, step, devices):
    """The checkpoint's state restored onto `config.mesh` over `devices`, and its validation loss there."""
    mesh = sharding.make_mesh(config.mesh, devices)
    model = Transformer(config_lib.freeze_model(config.model))
    tokenizer = tokenizer_lib.get_tokenizer(config.data)
    eval_batches = pipeline.make_eval_batches(config.data, tokenizer, num_batches=config.train.eval_batches)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, abstract, shardings = loop.build_state_fns(model, optim.make_optimizer(config.optim), mesh,
                                                      config.data.seq_len)
        ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=5, async_save=False)
        state = ckpt.restore(abstract, step=step)
        ckpt.close()
        eval_step = jax.jit(step_lib.make_eval_step(model), in_shardings=(shardings, sharding.batch_sharding(mesh)))
        return state, loop.evaluate(eval_step, state, eval_batches, mesh, loop.language_model_metrics)['val_loss']


def test_restore_on_another_mesh_gives_the_same_loss(fsdp_run):
    config = _config(4, DATA_TENSOR_4)
    devices = jax.devices()[:4]
    state, val_loss = _restore_and_evaluate(config, fsdp_run, 2, devices)
    saved = ocp.StandardCheckpointer().restore((fsdp_run / 'checkpoints' / '2' / 'state').resolve())
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), saved['params'])
    # The arrays live on the new mesh: its 4 devices, split over `tensor` where the rules say so.
    leaves = jax.tree.leaves(state.params)
    assert all(set(x.sharding.device_set) == set(devices) for x in leaves)
    assert any('tensor' in str(x.sharding.spec) for x in leaves)
    logged = {r['step']: r['val_loss'] for r in logger.read_metrics(fsdp_run) if 'val_loss' in r}
    # Same weights and data; only the order of the sharded reductions differs between the meshes.
    np.testing.assert_allclose(val_loss, logged[2], rtol=1e-6)


def test_training_continues_on_another_mesh(fsdp_run, tmp_path):
    (tmp_path / 'checkpoints').mkdir()
    shutil.copytree(fsdp_run / 'checkpoints' / '2', tmp_path / 'checkpoints' / '2')
    loop.run(_config(4, DATA_TENSOR_4), tmp_path, devices=jax.devices()[:4])
    ref = {r['step']: r['loss'] for r in logger.read_metrics(fsdp_run) if 'loss' in r}
    got = {r['step']: r['loss'] for r in logger.read_metrics(tmp_path) if 'loss' in r}
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [ref[3], ref[4]], rtol=2e-5)
