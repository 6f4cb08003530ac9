"""dsjax.aot: the loop's train step compiled for a TPU topology (libtpu, no TPU) and a simulated CPU mesh."""
import math
import pathlib

import jax
import numpy as np
import pytest

from dsjax import aot
from dsjax import config as config_lib
from dsjax import presets

EXPERIMENTS = pathlib.Path(__file__).parents[1] / 'experiments'


def _v3_smoke(**data):
    c = presets.load_experiment(str(EXPERIMENTS / 'x.py'), 'v3_small', 'smoke')
    c.data.update(**data)
    return c


def _param_bytes(config) -> int:
    """Parameter bytes of the whole model, counted from its abstract init."""
    import jax.numpy as jnp
    from dsjax.model.transformer import Transformer
    cfg = config_lib.freeze_model(config.model)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_torus_shapes_follow_the_slice_names():
    assert aot._torus(4, 3) == (2, 2, 1)
    assert aot._torus(64, 3) == (4, 4, 4)
    assert aot._torus(128, 3) == (4, 4, 8)  # v5p-256
    assert aot._torus(512, 3) == (8, 8, 8)  # v5p-1024
    assert aot._torus(4, 2) == (2, 2)
    assert aot._torus(128, 2) == (8, 16)  # v5e-128
    assert len(aot.topology('v5p-256').devices) == 128
    assert len(aot.topology('v5e-4').devices) == 4
    with pytest.raises(ValueError, match='v5p-<cores>'):
        aot.topology('v5p-100')


HLO = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %a = f32[4,16]{1,0} parameter(1)
  %b = f32[16,8]{1,0} parameter(2)
  %d = f32[4,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = bf16[4,1024]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %ar-start = f32[256]{0} all-reduce-start(%y), channel_id=2, to_apply=%add
  %ar-done = f32[256]{0} all-reduce-done(%ar-start)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(61)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%fused (a: f32[8]) -> f32[8] {
  %rs = f32[2,8]{1,0} reduce-scatter(%a), channel_id=3, dimensions={0}, to_apply=%add
  %lhs = bf16[8,128,32]{2,1,0} parameter(0)
  %rhs = bf16[8,64,32]{2,1,0} parameter(1)
  ROOT %conv = bf16[8,128,64]{2,1,0} convolution(%lhs, %rhs), window={size=8 lhs_dilate=8}, dim_labels=0bf_0oi->0bf
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %f = f32[8] fusion(%x), kind=kCustom, calls=%fused
  %a2a = (f32[16,8]{1,0}, f32[16,8]{1,0}) all-to-all(%u, %v), channel_id=4
}
"""


def test_hlo_totals_count_loop_bodies_once_per_iteration():
    totals = aot.hlo_totals(HLO)
    # 61 iterations of the body's all-gather (8 KiB) and all-reduce (1 KiB, counted at its -done);
    # the fusion's reduce-scatter once; the tuple all-to-all counts both results.
    assert aot.collectives(totals) == {
        'all-reduce': (61, 61 * 256 * 4),
        'all-gather': (61, 61 * 4 * 1024 * 2),
        'reduce-scatter': (1, 2 * 8 * 4),
        'all-to-all': (1, 2 * 16 * 8 * 4),
    }
    # The body's [4, 16] x [16, 8] dot 61 times; the batched matmul written as a dilated convolution
    # (8 x [128, 32] x [32, 64]) once.
    assert totals['flops'] == 61 * 2 * 4 * 8 * 16 + 2 * 8 * 128 * 64 * 32


def test_train_step_compiles_for_a_tpu_topology():
    config = _v3_smoke()
    report = aot.compile_program('v3_small:smoke', config, aot.topology('v5e-4'))
    assert report.mesh == {'data': 4, 'fsdp': 1, 'expert': 1, 'tensor': 1}
    # TPU resolves 'auto' as a TPU would: no remat.
    assert report.remat == 'none'
    # Pure data parallelism: every device holds all parameters (float32) and AdamW's two moments.
    params = _param_bytes(config)
    assert report.params_bytes == params
    assert 2 * params <= report.opt_state_bytes < 2 * params + 4096
    m = report.memory
    assert m.argument_size_in_bytes >= params * 3
    assert report.total_bytes == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                  + m.temp_size_in_bytes)
    assert report.fits and 'fits' in report.verdict()
    # The compiled matmuls are the FLOP model's, give or take what it leaves out (capacity buffers at
    # v3_small's factor 2 compute twice the routed rows).
    assert 1 < report.hlo_flops / report.model_flops < 4 and report.flops > 0
    # Gradients are summed over the data axis.
    assert report.collectives['all-reduce'][0] >= 1
    tokens_per_s = report.tokens_per_second(0.4)
    per_device_tokens = report.tokens / 4
    np.testing.assert_allclose(tokens_per_s, 0.4 * 197e12 / report.model_flops * per_device_tokens)
    assert report.lines()[-1].startswith('collectives per device per step: all-reduce')


def test_oversized_batch_is_reported_as_not_fitting():
    config = _v3_smoke(batch_size=1024, seq_len=2048)
    config.model.max_position_embeddings = 2048
    with pytest.raises(aot.DoesNotFit) as e:
        aot.compile_program('v3_small:smoke', config, aot.topology('v5e-4'))
    message = str(e.value)
    assert '\n' not in message
    assert 'v5e-4' in message and 'batch 1024 x 2048' in message and 'HBM (15.75G)' in message


def test_simulated_cpu_mesh_shards_params_and_experts():
    config = _v3_smoke()
    config.mesh.update(data=1, fsdp=2, expert=4)
    config.model.moe_dispatch = 'expert_parallel'
    report = aot.compile_program('v3_small:smoke', config, aot.topology('cpu:8', hbm_gib=80))
    assert report.mesh == {'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1}
    # Everything is split at least over fsdp; the experts over expert too.
    assert report.params_bytes < _param_bytes(config) / 2
    assert 'all-to-all' in report.collectives
    assert report.fits and np.isnan(report.tokens_per_second(0.4))


def test_decode_step_compiles_for_a_tpu_topology():
    """One decode step of one row over a 256-slot cache: rows that do not split stay whole, so every
    device holds the parameters and the cache, and the step reads them all."""
    from dsjax.infer import cache as cache_lib
    config = _v3_smoke()
    report = aot.compile_program('v3_small:smoke', config, aot.topology('v5e-4'), 'decode', context=256, batch=1)
    cfg = config_lib.freeze_model(config.model)
    cache = cache_lib.cache_bytes(jax.eval_shape(lambda: cache_lib.init_cache(cfg, 1, 256)))
    assert report.params_bytes == _param_bytes(config) and report.opt_state_bytes == 0
    assert report.memory.argument_size_in_bytes >= report.params_bytes + cache
    assert report.fits and report.tokens == 1 and report.hlo_flops > 0
