"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS above)

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from dsjax import config as config_lib  # noqa: E402

TINY_MLA_MOE = dict(
    attention_type='mla', q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, rope_interleave=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    moe_intermediate_size=16, first_k_dense_replace=1, scoring_func='sigmoid', topk_method='noaux_tc',
    n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)


@pytest.fixture(scope='session')
def tiny_model():
    """Factory of tiny frozen ModelConfigs: dense MHA by default, `mla_moe=True` for a V3-like one."""

    def make(mla_moe: bool = False, **overrides):
        c = config_lib.base_config().model
        c.update(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, initializer_range=0.1)
        if mla_moe:
            c.update(**TINY_MLA_MOE)
        c.update(**overrides)
        return config_lib.freeze_model(c)

    return make
