"""Every experiment file builds and validates; full-size ones match DeepSeek's parameter counts."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets, stages
from dsjax.model import flops
from dsjax.model.transformer import Transformer

EXPERIMENTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'experiments').glob('*.py'))

# (devices of the pod the file is laid out for, total B, activated B, tolerance) — DeepSeek's numbers.
FULL_SIZE = {
    'llm_7b': (256, 6.9, 6.9, 0.05),
    'llm_67b': (256, 67.4, 67.4, 0.05),
    'v2': (256, 236.0, 21.0, 0.03),
    'v2_lite': (256, 15.7, 2.4, 0.03),
    'v3': (512, 671.0, 37.0, 0.02),
    'r1': (128, 671.0, 37.0, 0.02),
    # The R1-Distill students: the Hub's parameter counts of the released checkpoints (test_presets_match_...).
    'r1_distill_qwen_1_5b': (16, 1.78, 1.78, 0.003),
    'r1_distill_qwen_7b': (32, 7.62, 7.62, 0.003),
    'r1_distill_qwen_14b': (64, 14.8, 14.8, 0.003),
    'r1_distill_qwen_32b': (128, 32.8, 32.8, 0.003),
    'r1_distill_llama_8b': (32, 8.03, 8.03, 0.003),
    'r1_distill_llama_70b': (256, 70.6, 70.6, 0.003),
}

# Parameters of the released checkpoints (the Hub's safetensors totals: exact where the model page gives them,
# else its rounded "model size"), and DeepSeekMoE 16B's paper (16.4B total, 2.8B activated: the activated count
# includes the embedding, which gives 2.83B; without it 2.62B).
PRESET_PARAMS = {
    'r1_distill_qwen_1_5b': (1.78e9, 0.003),
    'r1_distill_qwen_7b': (7.62e9, 0.001),
    'r1_distill_qwen_14b': (14.8e9, 0.004),
    'r1_distill_qwen_32b': (32_763_876_352, 0),
    'r1_distill_llama_8b': (8_030_261_248, 0),
    'r1_distill_llama_70b': (70.6e9, 0.001),
    'deepseek_moe_16b': (16.4e9, 0.003),
}


def _load(name, arg=None):
    return presets.load_experiment(str(pathlib.Path(__file__).parents[1] / 'experiments' / 'x.py'), name, arg)


def _validated_stages(c, devices: int):
    """A chain's stage configs in order, as the chain resolves and validates them (on this process's 8
    devices, the small experiments' size), or the config itself, validated on `devices`."""
    if c.stage == 'chain':
        assert devices == len(jax.devices())
        return [stage for _, stage, _ in stages.chain_configs(c, '/nonexistent/chain')]
    stages.validate(c, num_devices=devices)
    return [c]


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_builds(name):
    devices = FULL_SIZE.get(name, (8,))[0]
    *_, c = _validated_stages(_load(name), devices)
    cfg = config_lib.freeze_model(c.model)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    leaves = jax.tree_util.tree_leaves_with_path(shapes['params'])
    main = sum(np.prod(x.shape) for p, x in leaves if 'mtp' not in jax.tree_util.keystr(p))
    if name in FULL_SIZE:
        _, total, activated, tol = FULL_SIZE[name]
        got_activated = flops.activated_matmul_params(cfg, include_mtp=False)
        if cfg.n_routed_experts == 0:  # dense models count their embedding too
            got_activated = main
        assert abs(main / 1e9 - total) / total < tol, main
        assert abs(got_activated / 1e9 - activated) / activated < tol, got_activated


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_smoke_variant_validates_on_eight_devices(name):
    _validated_stages(_load(name, 'smoke'), 8)


def _param_count(cfg) -> int:
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['params'])))


@pytest.mark.parametrize('name', sorted(PRESET_PARAMS))
def test_presets_match_released_counts(name):
    cfg = config_lib.freeze_model(presets.apply_preset(config_lib.base_config(), name).model)
    want, tol = PRESET_PARAMS[name]
    got = _param_count(cfg)
    assert abs(got - want) <= tol * want, got
    if name == 'deepseek_moe_16b':
        activated = flops.activated_matmul_params(cfg, include_mtp=False) + cfg.vocab_size * cfg.hidden_size
        assert abs(activated - 2.8e9) < 0.02 * 2.8e9, activated


def test_distill_small_qwen2_student():
    """`distill_small:qwen2`: every student stage is Qwen2-shaped (q/k/v biases, GQA, tied head); the teacher not."""
    c = _load('distill_small', 'qwen2,smoke')
    _validated_stages(c, 8)
    for name in ('student_base', 'student_alone', 'student_seq', 'student_logit'):
        m = c.stages[name].model
        assert m.qkv_bias and m.tie_word_embeddings and m.num_key_value_heads == 2, name
    assert not c.stages.teacher.model.qkv_bias
