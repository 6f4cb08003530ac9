"""HF transformers <-> dsjax: config fields and tensor names/layouts for Llama, Qwen2, DeepSeek-V2 and V3.

Pure functions, numpy in and out, no file I/O. One table (`name_map`) describes every HF tensor of a
model as pieces of our (scanned, Flax-layout) arrays; loading and exporting both walk it, and a
checkpoint reader can use it to place tensors one at a time.

HF stores linear weights torch-style [out, in]; ours are [in, out] with heads split into their own
axis. Legend for the layouts: D model width, N heads, K head width, E experts, F ffn width.
"""
import dataclasses
import functools
import math
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, RopeScaling
from dsjax.model.rope import cos_sin_scale
from dsjax.model.transformer import Transformer

# ---------------------------------------------------------------- config

_MLA_TYPES = ('deepseek_v2', 'deepseek_v3')
_MHA_TYPES = ('llama', 'qwen2')
_SUPPORTED = _MHA_TYPES + _MLA_TYPES
_NO_SCALING = dict(type='none', factor=1.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                   mscale=1.0, mscale_all_dim=0.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _rope_fields(hf: dict) -> tuple[float, dict]:
    """rope_theta and our rope_scaling dict from `rope_parameters` (transformers v5) or `rope_scaling`."""
    rp = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    theta = float(rp.get('rope_theta', hf.get('rope_theta', 10000.0)))
    rope_type = rp.get('rope_type', rp.get('type', 'default'))
    if rope_type == 'default':
        return theta, dict(_NO_SCALING)
    if rope_type == 'llama3':
        return theta, dict(_NO_SCALING, type='llama3', factor=float(rp['factor']),
                           original_max_position_embeddings=int(rp['original_max_position_embeddings']),
                           low_freq_factor=float(rp['low_freq_factor']), high_freq_factor=float(rp['high_freq_factor']))
    if rope_type != 'yarn':
        raise ValueError(f"rope type {rope_type!r} of model_type={hf.get('model_type')!r} is not supported: "
                         "dsjax implements 'default', 'yarn' and 'llama3'")
    if not rp.get('truncate', True):
        raise ValueError("rope_parameters.truncate=False is not supported (YaRN's floor/ceil range is used)")
    max_pos = hf['max_position_embeddings']
    orig = int(rp.get('original_max_position_embeddings') or max_pos)
    scaling = dict(
        _NO_SCALING, type='yarn',
        factor=float(rp['factor'] if rp.get('factor') is not None else max_pos / orig),
        original_max_position_embeddings=orig,
        beta_fast=float(rp.get('beta_fast') or 32.0),  # HF: `or 32`, so 0/None mean the default
        beta_slow=float(rp.get('beta_slow') or 1.0),
        # Absent means 0 here: HF then scales cos/sin by mscale(factor, 1), and so does
        # rope.cos_sin_scale with a zero mscale. Defaulting to 1.0 would change that factor.
        mscale=float(rp.get('mscale') or 0.0),
        mscale_all_dim=float(rp.get('mscale_all_dim') or 0.0))
    if rp.get('attention_factor') is not None:
        implied = cos_sin_scale(RopeScaling(**scaling))
        if not math.isclose(rp['attention_factor'], implied, rel_tol=1e-6):
            raise ValueError(f"rope_parameters.attention_factor={rp['attention_factor']} differs from the "
                             f'{implied} that factor/mscale/mscale_all_dim imply; dsjax cannot represent it')
    return theta, scaling


def _require(hf: dict, key: str, ok: bool, valid: str):
    if not ok:
        raise ValueError(f"HF config {key}={hf.get(key)!r} (model_type={hf.get('model_type')!r}) is not "
                         f'supported: {valid}')


def model_fields_from_hf(hf_config: dict) -> dict:
    """Our `base_config().model` fields from a HF `config.json` dict (llama, qwen2, deepseek_v2, deepseek_v3).

    Only architecture is mapped; balance-loss coefficients (`aux_loss_alpha`, `seq_aux`) are
    training choices and stay with the experiment config. Apply with `config.model.update(fields)`.
    """
    hf = hf_config
    model_type = hf.get('model_type')
    if model_type not in _SUPPORTED:
        raise ValueError(f'HF model_type={model_type!r} is not supported; supported: {_SUPPORTED}')
    _require(hf, 'hidden_act', hf.get('hidden_act', 'silu') == 'silu', "only 'silu' (SwiGLU)")
    _require(hf, 'attention_bias', not hf.get('attention_bias', False),
             "dsjax attention has q/k/v biases only as Qwen2 lays them out (o_proj has none)")
    _require(hf, 'use_sliding_window', not hf.get('use_sliding_window', False),
             'dsjax attends over the whole context (no sliding window)')
    _require(hf, 'mlp_bias', not hf.get('mlp_bias', False), 'dsjax MLPs have no biases')
    theta, scaling = _rope_fields(hf)
    heads = hf['num_attention_heads']
    f = dict(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], intermediate_size=hf['intermediate_size'],
        num_hidden_layers=hf['num_hidden_layers'], num_attention_heads=heads,
        num_key_value_heads=hf.get('num_key_value_heads') or heads,
        rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)), rope_theta=theta,
        max_position_embeddings=hf['max_position_embeddings'], rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        initializer_range=float(hf.get('initializer_range', 0.02)))
    if model_type in _MHA_TYPES:
        head_dim = hf.get('head_dim') or 0
        # Qwen2 always biases q, k and v (its config has no switch for it).
        f.update(attention_type='mha', qkv_bias=model_type == 'qwen2', rope_interleave=False, n_routed_experts=0,
                 # 0 is our "hidden_size // heads": keeps cfg -> HF -> cfg an identity.
                 head_dim=0 if head_dim == hf['hidden_size'] // heads else head_dim)
        return f

    _require(hf, 'moe_layer_freq', hf.get('moe_layer_freq', 1) == 1, 'every layer past first_k_dense_replace is MoE')
    q_lora = hf.get('q_lora_rank')
    f.update(
        attention_type='mla', qkv_bias=False, head_dim=0, num_key_value_heads=heads, q_lora_rank=q_lora or 0,
        kv_lora_rank=hf['kv_lora_rank'], qk_nope_head_dim=hf['qk_nope_head_dim'],
        qk_rope_head_dim=hf['qk_rope_head_dim'], v_head_dim=hf['v_head_dim'],
        n_routed_experts=hf.get('n_routed_experts', hf.get('num_local_experts')) or 0,
        n_shared_experts=hf.get('n_shared_experts') or 0,
        num_experts_per_tok=hf.get('num_experts_per_tok') or 0,
        moe_intermediate_size=hf.get('moe_intermediate_size') or 0,
        first_k_dense_replace=hf.get('first_k_dense_replace') or 0,
        n_group=hf.get('n_group') or 1, topk_group=hf.get('topk_group') or 1,
        norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
        routed_scaling_factor=float(hf.get('routed_scaling_factor', 1.0)))
    if model_type == 'deepseek_v2':
        method = hf.get('topk_method', 'greedy')
        _require(hf, 'topk_method', method in ('greedy', 'group_limited_greedy'),
                 "DeepSeek-V2 routes with 'greedy' or 'group_limited_greedy'")
        # V2 rotates complex (interleaved) pairs and has no MTP. norm_topk_prob is kept as
        # DeepSeek's own V2 code honours it (HF's V2 ignores it; every V2 config has it false).
        f.update(rope_interleave=True, scoring_func='softmax', topk_method=method, num_nextn_predict_layers=0)
    else:
        f.update(rope_interleave=bool(hf.get('rope_interleave', True)), scoring_func='sigmoid',
                 topk_method='noaux_tc',
                 num_nextn_predict_layers=hf.get('num_nextn_predict_layers', hf.get('num_mtp_layers')) or 0)
    return f


def _check_export(ok: bool, field: str, value, why: str):
    if not ok:
        raise ValueError(f'config.model.{field}={value!r} cannot be exported to HF transformers: {why}')


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """A HF `config.json` dict for `cfg` (the inverse of `model_fields_from_hf`)."""
    rs = cfg.rope_scaling
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if rs.type == 'llama3':
        rope.update(rope_type='llama3', factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    if rs.type == 'yarn':
        rope.update(rope_type='yarn', factor=rs.factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                    beta_fast=rs.beta_fast, beta_slow=rs.beta_slow)
        # Zero and absent mean the same to HF and to model_fields_from_hf.
        rope.update({k: getattr(rs, k) for k in ('mscale', 'mscale_all_dim') if getattr(rs, k)})
    hf = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, hidden_act='silu', attention_bias=False)
    if cfg.attention_type == 'mha':
        _check_export(cfg.n_routed_experts == 0, 'n_routed_experts', cfg.n_routed_experts,
                      'HF Llama has no MoE')
        _check_export(not cfg.rope_interleave, 'rope_interleave', True, 'HF Llama rotates half-split pairs')
        _check_export(cfg.num_nextn_predict_layers == 0, 'num_nextn_predict_layers',
                      cfg.num_nextn_predict_layers, 'HF Llama has no MTP')
        hf.update(num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.attn_head_dim)
        if cfg.qkv_bias:  # Qwen2 biases q, k, v; its config has no attention_bias or mlp_bias
            del hf['attention_bias']
            hf.update(model_type='qwen2', architectures=['Qwen2ForCausalLM'], use_sliding_window=False)
        else:
            hf.update(model_type='llama', architectures=['LlamaForCausalLM'], mlp_bias=False)
        return hf

    v3 = cfg.topk_method == 'noaux_tc' or not cfg.rope_interleave or cfg.num_nextn_predict_layers > 0
    hf.update(
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        # HF has no "no experts" switch: a dense model is all first_k_dense_replace layers.
        first_k_dense_replace=cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers,
        n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, moe_layer_freq=1, topk_method=cfg.topk_method,
        scoring_func=cfg.scoring_func)
    if v3:
        _check_export(cfg.topk_method == 'noaux_tc' or not cfg.n_routed_experts, 'topk_method',
                      cfg.topk_method, "HF DeepseekV3 (needed for MTP or half-split RoPE) routes with 'noaux_tc'")
        _check_export(cfg.scoring_func == 'sigmoid' or not cfg.n_routed_experts, 'scoring_func',
                      cfg.scoring_func, 'HF DeepseekV3 scores experts with a sigmoid')
        hf.update(model_type='deepseek_v3', architectures=['DeepseekV3ForCausalLM'],
                  rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
                  topk_method='noaux_tc', scoring_func='sigmoid')
    else:
        _check_export(cfg.scoring_func == 'softmax', 'scoring_func', cfg.scoring_func,
                      "HF DeepseekV2 scores with a softmax; a sigmoid router needs topk_method='noaux_tc' (V3)")
        hf.update(model_type='deepseek_v2', architectures=['DeepseekV2ForCausalLM'])
    return hf


# ---------------------------------------------------------------- tensor layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a HF tensor (or a part of one) is laid out as one block of ours; both maps are exact."""
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]  # (hf block, our block shape) -> our block
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]  # our block shape -> the HF block shape


SAME = Layout(lambda x, s: x, lambda x: x, lambda s: tuple(s))
# [out, in] <-> [in, out]
LINEAR = Layout(lambda x, s: x.T, lambda x: x.T, lambda s: tuple(s[::-1]))
# [N*K, D] <-> [D, N, K]: projections into heads (q, k, v, q_b, kv_b)
HEADS_IN = Layout(lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T,
                  lambda s: (s[1] * s[2], s[0]))
# [D, N*K] <-> [N, K, D]: the output projection out of heads
HEADS_OUT = Layout(lambda x, s: x.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T,
                   lambda s: (s[2], s[0] * s[1]))
# [N*K] <-> [N, K]: a projection's bias per head (Qwen2's q, k, v)
HEADS_BIAS = Layout(lambda x, s: x.reshape(s), lambda x: x.reshape(-1), lambda s: (s[0] * s[1],))
# [E, out, in] <-> [E, in, out]: transformers v5 fused experts
EXPERTS = Layout(lambda x, s: x.swapaxes(1, 2), lambda x: x.swapaxes(1, 2), lambda s: (s[0], s[2], s[1]))


@dataclasses.dataclass(frozen=True)
class Target:
    """One piece of a HF tensor: our leaf `path`, the block `index` in it, and the layout.

    `part=(axis, i, n)` says the piece is the i-th of n equal slices of the HF tensor along `axis`
    (fused gate_up_proj). `copy=True` marks a duplicate HF keeps of a tensor mapped elsewhere (a
    tied lm_head, an MTP layer's embed_tokens / shared_head.head): written on export, not read on load.
    """
    path: tuple[str, ...]  # first element: the collection, 'params' or 'moe_bias'
    index: tuple[int, ...]
    layout: Layout
    part: tuple[int, int, int] | None = None
    copy: bool = False


def _p(*path):
    return ('params',) + tuple(p for part in path for p in part.split('/'))


# Per decoder layer: HF suffix, our path below the layer, layout. A rule applies when its path
# exists in our parameter tree, so MHA/MLA, q_lora_rank=0 and shared experts need no conditions.
_ATTN_AND_NORMS = (
    ('input_layernorm.weight', 'input_norm/scale', SAME),
    ('post_attention_layernorm.weight', 'post_attn_norm/scale', SAME),
    ('self_attn.q_proj.weight', 'attn/q', HEADS_IN),
    ('self_attn.k_proj.weight', 'attn/k', HEADS_IN),
    ('self_attn.v_proj.weight', 'attn/v', HEADS_IN),
    ('self_attn.q_proj.bias', 'attn/q_bias', HEADS_BIAS),
    ('self_attn.k_proj.bias', 'attn/k_bias', HEADS_BIAS),
    ('self_attn.v_proj.bias', 'attn/v_bias', HEADS_BIAS),
    ('self_attn.q_a_proj.weight', 'attn/q_a', LINEAR),
    ('self_attn.q_a_layernorm.weight', 'attn/q_a_norm/scale', SAME),
    ('self_attn.q_b_proj.weight', 'attn/q_b', HEADS_IN),
    ('self_attn.kv_a_proj_with_mqa.weight', 'attn/kv_a', LINEAR),
    ('self_attn.kv_a_layernorm.weight', 'attn/kv_a_norm/scale', SAME),
    ('self_attn.kv_b_proj.weight', 'attn/kv_b', HEADS_IN),
    ('self_attn.o_proj.weight', 'attn/o', HEADS_OUT),
)
_DENSE_MLP = tuple((f'mlp.{w}_proj.weight', f'mlp/{w}', LINEAR) for w in ('gate', 'up', 'down'))
_MOE_COMMON = (('mlp.gate.weight', 'mlp/router', LINEAR),) + tuple(
    (f'mlp.shared_experts.{w}_proj.weight', f'mlp/shared/{w}', LINEAR) for w in ('gate', 'up', 'down'))
_EXPERT_WEIGHTS = ('gate', 'up', 'down')
_MTP_EXTRA = (
    ('enorm.weight', 'enorm/scale', SAME),
    ('hnorm.weight', 'hnorm/scale', SAME),
    ('eh_proj.weight', 'eh_proj', LINEAR),
)


@functools.lru_cache(maxsize=16)
def our_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every leaf of our variables ({'params', 'moe_bias'}) -> its shape, from the model itself."""
    abstract = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                                            jnp.zeros((1, 1), jnp.int32)))
    return {tuple(k.key for k in kp): tuple(leaf.shape) for kp, leaf in
            jax.tree_util.tree_flatten_with_path(abstract)[0]}


def _block_rules(prefix: tuple[str, ...], index: tuple[int, ...], cfg: ModelConfig, shapes, fused: bool):
    """(HF suffix, targets) for one decoder layer whose params live under `prefix` at `index`."""
    def has(path):
        return _p(*prefix, path) in shapes

    rules = [(hf, (Target(_p(*prefix, ours), index, layout),)) for hf, ours, layout in _ATTN_AND_NORMS
             if has(ours)]
    if not has('mlp/router'):
        return rules + [(hf, (Target(_p(*prefix, ours), index, layout),)) for hf, ours, layout in _DENSE_MLP]
    rules += [(hf, (Target(_p(*prefix, ours), index, layout),)) for hf, ours, layout in _MOE_COMMON if has(ours)]
    if cfg.topk_method == 'noaux_tc':  # only V3's router has a selection bias
        rules.append(('mlp.gate.e_score_correction_bias',
                      (Target(('moe_bias',) + prefix + ('mlp', 'bias'), index, SAME),)))
    if fused:
        rules.append(('mlp.experts.gate_up_proj',
                      tuple(Target(_p(*prefix, f'mlp/{w}'), index, EXPERTS, part=(1, i, 2))
                            for i, w in enumerate(('gate', 'up')))))
        rules.append(('mlp.experts.down_proj', (Target(_p(*prefix, 'mlp/down'), index, EXPERTS),)))
    else:
        rules += [(f'mlp.experts.{e}.{w}_proj.weight', (Target(_p(*prefix, f'mlp/{w}'), index + (e,), LINEAR),))
                  for e in range(cfg.n_routed_experts) for w in _EXPERT_WEIGHTS]
    return rules


@functools.lru_cache(maxsize=16)
def name_map(cfg: ModelConfig, fused_experts: bool) -> dict[str, tuple[Target, ...]]:
    """Every HF tensor name of the model -> the pieces of our variables it holds.

    `fused_experts` picks transformers v5's `mlp.experts.{gate_up,down}_proj` over the per-expert
    `mlp.experts.N.*_proj.weight` of DeepSeek's and older HF checkpoints.
    """
    shapes = our_shapes(cfg)
    table = {'model.embed_tokens.weight': (Target(_p('embed/embedding'), (), SAME),),
             'model.norm.weight': (Target(_p('final_norm/scale'), (), SAME),)}
    # Tied models: HF's state_dict still lists lm_head.weight, a duplicate of the embedding.
    table['lm_head.weight'] = ((Target(_p('lm_head'), (), LINEAR),) if _p('lm_head') in shapes
                               else (Target(_p('embed/embedding'), (), SAME, copy=True),))
    for layer in range(cfg.num_hidden_layers):
        dense = layer < cfg.num_dense_layers
        prefix = ('dense_layers', 'layers') if dense else ('moe_layers', 'layers')
        index = (layer if dense else layer - cfg.num_dense_layers,)
        for suffix, targets in _block_rules(prefix, index, cfg, shapes, fused_experts):
            table[f'model.layers.{layer}.{suffix}'] = targets
    head = table['lm_head.weight'][0]
    for depth in range(cfg.num_nextn_predict_layers):
        # DeepSeek stores MTP depth i as decoder layer num_hidden_layers + i.
        name = f'model.layers.{cfg.num_hidden_layers + depth}.'
        for suffix, ours, layout in _MTP_EXTRA:
            table[name + suffix] = (Target(_p(f'mtp_{depth}', ours), (), layout),)
        table[name + 'shared_head.norm.weight'] = (Target(_p(f'mtp_{depth}_norm/scale'), (), SAME),)
        table[name + 'embed_tokens.weight'] = (Target(_p('embed/embedding'), (), SAME, copy=True),)
        table[name + 'shared_head.head.weight'] = (dataclasses.replace(head, copy=True),)
        for suffix, targets in _block_rules((f'mtp_{depth}', 'block'), (), cfg, shapes, fused_experts):
            table[name + suffix] = targets
    return table


def expected_hf_shape(targets: tuple[Target, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """The shape the HF tensor made of `targets` must have."""
    shapes = our_shapes(cfg)
    blocks = [t.layout.hf_shape(shapes[t.path][len(t.index):]) for t in targets]
    if targets[0].part is None:
        return blocks[0]
    axis = targets[0].part[0]
    return blocks[0][:axis] + (sum(b[axis] for b in blocks),) + blocks[0][axis + 1:]


# ---------------------------------------------------------------- load and export


def _is_fused(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.endswith('mlp.experts.gate_up_proj') for k in state)


def put(variables: dict, name: str, x: np.ndarray, cfg: ModelConfig, fused_experts: bool) -> None:
    """Places HF tensor `name` into `variables` ({path tuple: array}, allocated on first use)."""
    targets = name_map(cfg, fused_experts)[name]
    expected = expected_hf_shape(targets, cfg)
    if tuple(x.shape) != expected:
        raise ValueError(f'HF tensor {name} has shape {tuple(x.shape)}, expected {expected} for this config')
    shapes = our_shapes(cfg)
    for t in targets:
        if t.copy:
            continue
        block = x
        if t.part is not None:
            axis, i, n = t.part
            size = x.shape[axis] // n
            block = x[(slice(None),) * axis + (slice(i * size, (i + 1) * size),)]
        if t.path not in variables:
            variables[t.path] = np.empty(shapes[t.path], dtype=x.dtype)
        variables[t.path][t.index] = t.layout.to_ours(block, shapes[t.path][len(t.index):])


def take(variables: Mapping[tuple[str, ...], np.ndarray], name: str, cfg: ModelConfig,
         fused_experts: bool) -> np.ndarray:
    """HF tensor `name` assembled from `variables` ({path tuple: array})."""
    targets = name_map(cfg, fused_experts)[name]
    blocks = [t.layout.to_hf(np.asarray(variables[t.path])[t.index]) for t in targets]
    x = blocks[0] if targets[0].part is None else np.concatenate(blocks, axis=targets[0].part[0])
    return np.ascontiguousarray(x)


def nest(flat: dict) -> dict:
    """{(key, ..., leaf): x} -> the nested dict {key: {...: {leaf: x}}}."""
    out = {}
    for path, x in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    return out


def _flatten(tree, prefix=()) -> dict:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, prefix + (key,)).items()}


def _layer_of(name: str) -> int | None:
    parts = name.split('.')
    if len(parts) > 2 and parts[0] == 'model' and parts[1] == 'layers' and parts[2].isdigit():
        return int(parts[2])
    return None


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> tuple[dict, dict]:
    """HF state dict -> (params, moe_bias): nested dicts of numpy arrays in our layout.

    Either expert layout is accepted. Layers past the config's MTP depth (an MTP layer the config
    does not use) are skipped; any other tensor the config has no place for is an error. Routers
    without a bias (V2) get a zero `moe_bias`. A dense model returns an empty `moe_bias`.

    Raises:
        KeyError: a tensor the config needs is missing (the message names it).
        ValueError: a tensor's shape disagrees with the config, or a tensor is unexpected.
    """
    fused = _is_fused(state)
    table = name_map(cfg, fused)
    last_layer = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    unexpected = [k for k in state if k not in table and (_layer_of(k) is None or _layer_of(k) < last_layer)
                  and not k.endswith('rotary_emb.inv_freq')]
    if unexpected:
        raise ValueError(f'HF tensors with no place in this config: {sorted(unexpected)[:8]}'
                         f'{" ..." if len(unexpected) > 8 else ""}')
    flat = {}
    for name in table:
        if name not in state:
            if all(t.copy for t in table[name]):
                continue
            hint = (' (the checkpoint has no MTP layer: set num_nextn_predict_layers=0)'
                    if (_layer_of(name) or 0) >= cfg.num_hidden_layers else '')
            raise KeyError(f'HF tensor {name} is missing from the checkpoint{hint}')
        put(flat, name, np.asarray(state[name]), cfg, fused)
    for path, shape in our_shapes(cfg).items():
        if path not in flat:
            if path[0] != 'moe_bias':
                raise AssertionError(f'name table leaves {path} unmapped')  # a bug in the table, not the input
            flat[path] = np.zeros(shape, np.float32)
    nested = nest(flat)
    return nested.get('params', {}), nested.get('moe_bias', {})


def hf_from_params(params, moe_bias, cfg: ModelConfig, fused_experts: bool) -> dict[str, np.ndarray]:
    """(params, moe_bias) -> HF state dict (the exact inverse of `params_from_hf`).

    Accepts boxed (LogicallyPartitioned) or plain trees of jax or numpy arrays. Duplicates are
    written as HF lists them: a tied model's lm_head.weight, and each MTP layer's embed_tokens /
    shared_head.head (as DeepSeek ships them).
    """
    flat = _flatten({'params': nn.meta.unbox(params), 'moe_bias': nn.meta.unbox(moe_bias or {})})
    flat = {k: np.asarray(v) for k, v in flat.items()}
    return {name: take(flat, name, cfg, fused_experts) for name in name_map(cfg, fused_experts)}
