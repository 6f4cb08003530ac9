"""The device mesh, the logical-axis rules that map model axes onto it, and sharding helpers.

Mesh axes: data (pure data parallel), fsdp (data parallel + parameters sharded along `embed`),
expert (data parallel for dense parts, experts split across it), tensor (heads / ffn / vocab split).
A new parallel layout is a new rules table, never new model code.
"""
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dsjax import config as config_lib

BATCH_AXES = ('data', 'fsdp', 'expert')

# Logical axis -> mesh axis (or axes). Params and activations use distinct names so each can be
# laid out on its own (e.g. `embed` of a weight is fsdp-sharded, `act_embed` is replicated).
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('act_exp', 'expert'),
    ('vocab', 'tensor'),
    # Routed experts split over `expert` first; every other weight splits D (`embed`) over fsdp x expert,
    # the experts' over fsdp (a mesh axis splits one dimension only, and flax takes the first rule whose
    # axes are still free). Over fsdp alone, V3's dense weights sat on all 64 expert shards: 2.6x its
    # parameter bytes per device (benchmarks/results/aot.md).
    ('exp', 'expert'),
    ('embed', ('fsdp', 'expert')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    # MLA's up-projections [R, heads, K] split their latent rank as `embed` splits the others'; the
    # down-projections [D, R] already split D.
    ('q_lora', ('fsdp', 'expert')),
    ('kv_lora', ('fsdp', 'expert')),
    ('layers', None),
    ('norm', None),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, expert, tensor); sizes from config, -1 fills."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config_lib.mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in config_lib.MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), config_lib.MESH_AXES,
                axis_types=(AxisType.Auto,) * len(shape))


def logical_sharding(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of logically-partitioned values (or their abstract shapes)."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_shapes(boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """ShapeDtypeStructs of an eval_shape'd tree of logically-partitioned values, placed by the rules
    (no sharding constraint is applied: the mesh's devices may be a TPU topology that is not here)."""
    shardings = logical_sharding(boxed, mesh, rules)
    unboxed = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                           boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays split over every data-parallel axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
    """This host's rows (numpy) -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in host_batch.items()}
