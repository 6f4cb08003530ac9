"""Cache layout and size: MLA keeps (kv_lora_rank + qk_rope_head_dim) values per token per layer."""
import jax
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.infer import cache as cache_lib


def _preset(name, **overrides):
    c = presets.apply_preset(config_lib.base_config(), name).model
    c.update(**overrides)
    return config_lib.freeze_model(c)


@pytest.mark.parametrize('dtype,size', [('float32', 4), ('bfloat16', 2)])
def test_mla_bytes_per_token_per_layer(tiny_model, dtype, size):
    cfg = tiny_model(mla_moe=True, dtype=dtype)
    assert cache_lib.bytes_per_token_per_layer(cfg) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    cache = cache_lib.init_cache(cfg, batch=3, length=10)
    assert cache_lib.cache_bytes(cache) == 3 * 10 * cfg.num_hidden_layers * (16 + 8) * size


def test_mha_and_gqa_cache_k_and_v_per_kv_head(tiny_model):
    cfg = tiny_model(num_key_value_heads=2)
    assert cache_lib.bytes_per_token_per_layer(cfg) == 2 * 2 * cfg.attn_head_dim * 4
    cache = cache_lib.init_cache(cfg, batch=2, length=7)
    assert jax.tree.map(lambda x: x.shape, cache) == {
        'dense_layers': {'k': (3, 2, 7, 2, 8), 'v': (3, 2, 7, 2, 8)}}


def test_layout_per_stack_and_mtp(tiny_model):
    cfg = tiny_model(mla_moe=True, num_nextn_predict_layers=1)
    shapes = jax.tree.map(lambda x: x.shape, cache_lib.init_cache(cfg, batch=2, length=5, mtp=True))
    assert shapes == {'dense_layers': {'latent': (1, 2, 5, 16), 'rope_key': (1, 2, 5, 8)},
                      'moe_layers': {'latent': (2, 2, 5, 16), 'rope_key': (2, 2, 5, 8)},
                      'mtp_0': {'latent': (2, 5, 16), 'rope_key': (2, 5, 8)}}
    with pytest.raises(ValueError, match='num_nextn_predict_layers >= 1'):
        cache_lib.init_cache(tiny_model(mla_moe=True), 1, 4, mtp=True)


@pytest.mark.parametrize('preset,heads', [('deepseek_v3', 128), ('deepseek_v2', 128), ('deepseek_v2_lite', 16)])
def test_full_size_mla_against_mha(preset, heads):
    """Spec section 1: V3 caches 576 values per token per layer where MHA would cache 2 x 128 x 128."""
    cfg = _preset(preset, dtype='bfloat16')
    assert cache_lib.values_per_token_per_layer(cfg) == 512 + 64
    assert cache_lib.mha_values_per_token_per_layer(cfg) == 2 * heads * 128
    assert cache_lib.bytes_per_token_per_layer(cfg) == 576 * 2


def test_shardings_split_rows_and_kv_heads(tiny_model):
    from dsjax import sharding
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=2, tensor=2))
    mla = cache_lib.cache_shardings(tiny_model(mla_moe=True), mesh)
    assert mla['moe_layers']['latent'].spec == jax.sharding.PartitionSpec(
        None, sharding.BATCH_AXES, None, None)
    mha = cache_lib.cache_shardings(tiny_model(num_key_value_heads=2), mesh)
    assert mha['dense_layers']['k'].spec == jax.sharding.PartitionSpec(
        None, sharding.BATCH_AXES, None, 'tensor', None)
