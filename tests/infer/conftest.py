"""Shared tiny models (dense GQA, V2-like, V3-like with MTP) and their greedy generations.

Each distinct generate compile costs seconds on 2 cores, so tests share these session fixtures and
keep one prompt batch shape.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.infer import decode
from dsjax.model.transformer import Transformer

# Four rows of different lengths (a multiple of the 4 batch shards of the mesh tests).
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16], [20, 30, 40, 50]]
NEW_TOKENS = 6

V2_LIKE = dict(attention_type='mla', q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
               v_head_dim=8, rope_interleave=True, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
               moe_intermediate_size=16, first_k_dense_replace=1, scoring_func='softmax',
               topk_method='group_limited_greedy', n_group=4, topk_group=2, routed_scaling_factor=2.0,
               rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                 beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))
# vocab 96 (not the fixture's 97) so the vocabulary splits over tensor=2 in the mesh tests.
MODELS = {
    'dense': dict(num_key_value_heads=2, vocab_size=96),
    'v2': dict(V2_LIKE, vocab_size=96),
    'v3': dict(mla_moe=True, num_nextn_predict_layers=1, vocab_size=96),
}


def init_variables(cfg, seed=0):
    variables = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32)))
    if 'moe_bias' in variables:  # a non-zero routing bias exercises V3's biased selection
        variables['moe_bias'] = jax.tree.map(
            lambda b: jax.random.normal(jax.random.PRNGKey(7), b.shape) * 0.1, variables['moe_bias'])
    return variables


class _Models(dict):
    """name -> (cfg, variables), built on first use."""

    def __init__(self, tiny_model):
        super().__init__()
        self.tiny_model = tiny_model

    def __missing__(self, name):
        cfg = self.tiny_model(**MODELS[name])
        self[name] = (cfg, init_variables(cfg))
        return self[name]


@pytest.fixture(scope='session')
def models(tiny_model):
    return _Models(tiny_model)


class _Greedy(dict):
    """name -> greedy Generation of PROMPTS on one device, computed on first use."""

    def __init__(self, models):
        super().__init__()
        self.models = models

    def __missing__(self, name):
        cfg, variables = self.models[name]
        self[name] = decode.generate(cfg, variables, PROMPTS, max_new_tokens=NEW_TOKENS)
        return self[name]


@pytest.fixture(scope='session')
def greedy(models):
    return _Greedy(models)


def teacher_forced_logits(cfg, variables, prompts, continuations):
    """Full-forward logits [B, N, V] at the positions that predict each continuation token."""
    seqs = [list(p) + [int(t) for t in c] for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    segments = np.zeros((len(seqs), width), np.int32)
    for row, s in enumerate(seqs):
        tokens[row, :len(s)] = s
        segments[row, :len(s)] = 1
    logits, _ = _forward(cfg)(variables, tokens, None, segments)
    n = len(continuations[0])
    idx = np.array([[len(p) - 1 + j for j in range(n)] for p in prompts])
    return np.asarray(logits)[np.arange(len(prompts))[:, None], idx]


_FORWARDS = {}


def _forward(cfg):
    if cfg not in _FORWARDS:
        _FORWARDS[cfg] = jax.jit(Transformer(cfg).apply)
    return _FORWARDS[cfg]
