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
