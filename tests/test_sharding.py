"""The logical-axis rules at full size: every large parameter is split over fsdp x expert at least, over
axes that divide it."""
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax import sharding
from dsjax.model.transformer import Transformer

EXPERIMENTS = pathlib.Path(__file__).parents[1] / 'experiments'
# The pod layouts of README's scaling table (data, fsdp, expert, tensor).
LAYOUTS = {
    'v3': dict(data=1, fsdp=8, expert=64, tensor=1),
    'v2': dict(data=1, fsdp=16, expert=8, tensor=1),
    'llm_67b': dict(data=1, fsdp=8, expert=1, tensor=8),
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_every_large_parameter_is_split_over_fsdp_and_expert(name):
    config = presets.load_experiment(str(EXPERIMENTS / 'x.py'), name)
    cfg = config_lib.freeze_model(config.model)
    sizes = LAYOUTS[name]
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), sharding.DEFAULT_RULES)
    shapes = nn.unbox(boxed)
    for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(
            x, jax.sharding.PartitionSpec)), jax.tree.leaves(shapes)):
        where = f'{name} {jax.tree_util.keystr(path)} {shape.shape} {spec}'
        split = 1
        for dim, axes in zip(shape.shape, spec):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            ways = math.prod(sizes[a] for a in axes)
            assert dim % ways == 0, where
            split *= ways
        if math.prod(shape.shape) >= 2 ** 20:
            # Nothing large sits whole on every expert shard (V3's dense weights did: 2.6x the bytes).
            assert split >= sizes['fsdp'] * sizes['expert'], where
