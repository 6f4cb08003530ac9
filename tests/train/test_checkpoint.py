"""Tests for dsjax/train/checkpoint.py: round trips across meshes, pruning, incomplete steps, iterator state."""
import logging

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsjax import config as config_lib
from dsjax.train import checkpoint, optim
from dsjax.train.state import TrainState

OPTIM = config_lib.base_config().optim
OPTIM.update(lr=1e-3, schedule='constant', warmup_steps=0, decay_steps=10, weight_decay=0.1, clip_norm=1.0)


def _mesh_1d():
    return Mesh(np.array(jax.devices()), ('data',))


def _mesh_2d():
    return Mesh(np.array(jax.devices()).reshape(2, 4), ('a', 'b'))


def _state(seed=0):
    """A small TrainState: a matrix sharded over 8 devices on axis 0, a replicated vector, MoE-like buffer."""
    mesh = _mesh_1d()
    w = jax.random.normal(jax.random.key(seed), (8, 4))
    params = {'w': jax.device_put(w, NamedSharding(mesh, P('data'))), 'scale': jnp.arange(4.0) + seed}
    tx = optim.make_optimizer(OPTIM)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments, count 1
    return TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key(seed), buffers={'moe_bias': {'b': jnp.full((4,), 0.5)}})


def _abstract(state, sharding_of):
    """ShapeDtypeStructs of `state`, each leaf placed by `sharding_of(leaf)`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(unkey(x), unkey(y)), a, b)


def test_round_trip_same_mesh_and_config(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, config={'model': {'d': 4}, 'name': 'tiny'})
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored = ckpt.restore(_abstract(state, lambda x: x.sharding))
    _assert_same(restored, state)
    assert restored.params['w'].sharding == state.params['w'].sharding
    assert ckpt.restore_config() == {'model': {'d': 4}, 'name': 'tiny'}
    ckpt.close()


def test_restore_onto_another_mesh(tmp_path):
    state = _state()
    with_ckpt = checkpoint.Checkpointer(tmp_path, keep=1, async_save=False)
    with_ckpt.save(7, state)
    with_ckpt.close()
    mesh2 = _mesh_2d()
    # Matrices sharded over both axes of a 2x4 mesh, everything else replicated on it.
    target = lambda x: NamedSharding(mesh2, P('a', 'b') if x.ndim == 2 else P())  # noqa: E731
    restored = checkpoint.Checkpointer(tmp_path, keep=1).restore(_abstract(state, target))
    _assert_same(restored, state)
    w = restored.params['w']
    assert w.sharding == NamedSharding(mesh2, P('a', 'b'))
    assert {s.data.shape for s in w.addressable_shards} == {(4, 1)}


def test_restore_needs_shardings(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1, async_save=False)
    ckpt.save(1, state)
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match="has no sharding"):
        ckpt.restore(bare)
    with pytest.raises(ValueError, match=r"step=5 is not a complete checkpoint .*\[1\]"):
        ckpt.restore(_abstract(state, lambda x: x.sharding), step=5)


def test_keep_prunes_older(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
    for step in (1, 2, 3):
        assert ckpt.save(step, state)
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['2', '3']
    assert ckpt.latest_step() == 3


def test_latest_step_skips_incomplete(tmp_path, caplog):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    ckpt.save(1, state)
    ckpt.close()
    # A step cut short (has an item dir, no commit file) and an Orbax save that never finalized.
    (tmp_path / '5' / 'state').mkdir(parents=True)
    (tmp_path / '9.orbax-checkpoint-tmp-1234').mkdir()
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    skipped = ' '.join(r.getMessage() for r in caplog.records if 'skipping incomplete' in r.getMessage())
    assert str(tmp_path / '5') in skipped and '9.orbax-checkpoint-tmp-1234' in skipped
    assert ckpt.latest_step() == 1
    _assert_same(ckpt.restore(_abstract(state, lambda x: x.sharding)), state)
    # Orbax counts the bare '5' as a step and would silently skip older saves: we refuse loudly instead.
    with pytest.raises(ValueError, match=r"incomplete checkpoint directories .*5.* block newer saves"):
        ckpt.save(2, state)
    assert ckpt.save(6, state)


def test_data_iterator_round_trip_async(tmp_path):
    dataset = grain.MapDataset.source(list(range(100))).to_iter_dataset()
    it = iter(dataset)
    for _ in range(5):
        next(it)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=True)
    saved = _state()
    assert ckpt.save(5, saved, data_iterator=it)
    # Once save returns, the loop may advance the iterator and donate the state's buffers.
    assert next(it) == 5
    jax.tree.map(lambda x: x.delete(), saved.params)
    ckpt.wait()
    assert (tmp_path / '5' / 'commit_success.txt').exists()
    fresh = iter(dataset)
    state = _state()
    _assert_same(ckpt.restore(_abstract(state, lambda x: x.sharding), data_iterator=fresh), state)
    assert next(fresh) == 5
    ckpt.close()


def test_restore_params_only(tmp_path):
    state = _state(seed=3)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, async_save=False)
    ckpt.save(4, state)
    ckpt.save(8, state.replace(params=jax.tree.map(lambda x: x * 2, state.params)))
    ckpt.close()
    mesh2 = _mesh_2d()
    target = lambda x: NamedSharding(mesh2, P('b', 'a') if x.ndim == 2 else P())  # noqa: E731
    abstract = _abstract(state.params, target)
    params = checkpoint.restore_params(tmp_path, abstract)
    _assert_same(params, jax.tree.map(lambda x: x * 2, state.params))  # newest step by default
    assert params['w'].sharding == NamedSharding(mesh2, P('b', 'a'))
    _assert_same(checkpoint.restore_params(tmp_path, abstract, step=4), state.params)


def test_restore_params_missing_names_init_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init\.checkpoint=.*nowhere.*no complete checkpoint"):
        checkpoint.restore_params(tmp_path / 'nowhere', {'w': jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert not (tmp_path / 'nowhere').exists()
