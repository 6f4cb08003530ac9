"""External check of the architectures: tiny random HF Llama (Llama-3 RoPE scaling too) / Qwen2 / DeepSeek-V2 /
DeepSeek-V3 models, mapped with dsjax.interop.hf_mapping, give the same float32 logits, training gradients and
greedy generations in dsjax; and the mapping is exactly invertible."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from dsjax.config import base_config, freeze_model
from dsjax.infer import decode
from dsjax.interop import hf_mapping
from dsjax.model import rope
from dsjax.model.transformer import Transformer
from dsjax.train import step as step_lib

B, L = 2, 12
TOL = 1e-4

_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              rms_norm_eps=1e-5, max_position_embeddings=64,
              rope_parameters=dict(rope_type='default', rope_theta=500.0))
# Llama-3.1's scaling over a head of 8 (4 pairs): with theta 500 the wavelengths are 6, 30, 140 and 664
# tokens, so against an original context of 64 (low/high factors 1 and 4: bounds 64 and 16) one pair is
# kept, one blended and two divided by the factor.
_LLAMA3 = dict(rope_type='llama3', rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=64)
# Qwen2: q/k/v biases (o_proj has none), GQA.
_QWEN2 = dict(_LLAMA, num_key_value_heads=2, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type='default', rope_theta=10000.0))
# rope_theta=100 with a rope width of 8 puts YaRN's ramp across all four pairs (0, 1/3, 2/3, 1) instead
# of leaving every pair on one side of it; max_position_embeddings = factor x original as in the hub configs.
_YARN = dict(rope_type='yarn', rope_theta=100.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
             beta_slow=1)
# rms_norm_eps differs from the 1e-6 that HF hard-codes for q_a/kv_a norms, so mixing them up shows.
_MLA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=6, num_key_value_heads=4, n_routed_experts=8, rms_norm_eps=1e-5, max_position_embeddings=256)
_V2 = dict(_MLA, n_shared_experts=2, num_experts_per_tok=2, routed_scaling_factor=2.0,
           rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))
_V3 = dict(_MLA, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
           routed_scaling_factor=2.5, num_mtp_layers=0, rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0))

CASES = {
    'llama_mha_tied': ('llama', dict(_LLAMA, num_key_value_heads=4, tie_word_embeddings=True)),
    'llama_gqa': ('llama', dict(_LLAMA, num_key_value_heads=2, head_dim=12)),
    'llama3_rope_scaling': ('llama', dict(_LLAMA, num_key_value_heads=2, rope_parameters=_LLAMA3)),
    'qwen2_gqa_tied': ('qwen2', dict(_QWEN2, tie_word_embeddings=True)),
    'qwen2_gqa_untied': ('qwen2', dict(_QWEN2, tie_word_embeddings=False)),
    'v2_qlora_greedy': ('deepseek_v2', dict(_V2, q_lora_rank=16, topk_method='greedy')),
    # 3 experts from 2 of 4 groups: with k <= topk_group the group limit could never bind.
    'v2_noqlora_group_limited': ('deepseek_v2', dict(_V2, q_lora_rank=None, topk_method='group_limited_greedy',
                                                     n_group=4, topk_group=2, num_experts_per_tok=3)),
    'v3_qlora': ('deepseek_v3', dict(_V3, q_lora_rank=16)),
    # mscale != mscale_all_dim makes HF's attention_factor on cos/sin differ from 1 (it is 1 in DeepSeek's configs).
    'v3_noqlora': ('deepseek_v3', dict(_V3, q_lora_rank=None,
                                       rope_parameters=dict(_V3['rope_parameters'], mscale=0.8))),
    'v3_halfsplit_plain_rope': ('deepseek_v3', dict(_V3, q_lora_rank=16, rope_interleave=False,
                                                    rope_parameters=dict(rope_type='default', rope_theta=100.0))),
}


def hf_model(case: str, seed: int = 0, **overrides):
    """A tiny HF model with random weights: std 0.08, norm weights 1 +- 0.2, a signed V3 routing bias."""
    model_type, kwargs = CASES[case]
    torch.manual_seed(seed)
    config = transformers.CONFIG_MAPPING[model_type](attn_implementation='eager', **dict(kwargs, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith('e_score_correction_bias'):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def state_of(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_config(hf_config: dict, **overrides):
    m = base_config().model
    m.update(hf_mapping.model_fields_from_hf(hf_config))
    m.update(overrides)
    return freeze_model(m)


def our_logits(cfg, params, moe_bias, tokens, next_tokens=None):
    variables = {'params': params, **({'moe_bias': moe_bias} if moe_bias else {})}
    logits, aux = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens), next_tokens_BxL=next_tokens)
    return np.asarray(logits), aux


def tokens_for(vocab: int, seed: int = 1):
    return np.random.default_rng(seed).integers(0, vocab, (B, L)).astype(np.int32)


def unfuse(state: dict) -> dict:
    """transformers v5 fused experts -> DeepSeek's per-expert tensors."""
    out = {}
    for name, x in state.items():
        if name.endswith('mlp.experts.gate_up_proj'):
            base, f = name[:-len('gate_up_proj')], x.shape[1] // 2
            for e in range(x.shape[0]):
                out[f'{base}{e}.gate_proj.weight'] = x[e, :f].copy()
                out[f'{base}{e}.up_proj.weight'] = x[e, f:].copy()
        elif name.endswith('mlp.experts.down_proj'):
            base = name[:-len('down_proj')]
            for e in range(x.shape[0]):
                out[f'{base}{e}.down_proj.weight'] = x[e].copy()
        else:
            out[name] = x
    return out


def assert_same_state(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert np.array_equal(got[k].view(np.uint8), np.ascontiguousarray(want[k]).view(np.uint8)), k


# ---------------------------------------------------------------- logits parity


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_hf(case):
    model = hf_model(case)
    state = state_of(model)
    cfg = our_config(model.config.to_dict())
    if cfg.topk_method == 'noaux_tc':
        biases = np.concatenate([v for k, v in state.items() if k.endswith('e_score_correction_bias')])
        assert (biases < 0).any() and (biases > 0).any()
    tokens = tokens_for(cfg.vocab_size)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens).long()).logits.numpy()
    params, moe_bias = hf_mapping.params_from_hf(state, cfg)
    got, _ = our_logits(cfg, params, moe_bias, tokens)
    diff = float(np.abs(got - want).max())
    print(f'{case}: max |logit diff| = {diff:.2e} (logit scale {np.abs(want).max():.2f})')
    assert diff < TOL


def test_mla_softmax_scale_matches_installed_hf():
    """HF's DeepseekV2 once left YaRN's mscale^2 out of the softmax scale; pin that it now agrees with ours."""
    for case in ('v2_qlora_greedy', 'v3_qlora'):
        model = hf_model(case)
        cfg = our_config(model.config.to_dict())
        ours = rope.softmax_scale(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.rope_scaling)
        assert ours != pytest.approx((cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)  # YaRN is on
        assert model.model.layers[0].self_attn.scaling == pytest.approx(ours, rel=1e-12)


# ---------------------------------------------------------------- training gradients


@pytest.mark.parametrize('case', ['qwen2_gqa_tied', 'llama3_rope_scaling', 'v3_qlora'])
def test_training_gradients_match_hf(case):
    """The pre-training loss's gradient (chunked head, tied head, MLA, routed experts through the training
    dispatch) equals torch autograd's of HF's next-token loss, every parameter, mapped to HF's layout."""
    model = hf_model(case)
    state = state_of(model)
    cfg = our_config(model.config.to_dict(), aux_loss_alpha=0.0)  # HF's models add no balance loss
    tokens = tokens_for(cfg.vocab_size)
    model(torch.from_numpy(tokens).long(), labels=torch.from_numpy(tokens).long()).loss.backward()
    params, moe_bias = hf_mapping.params_from_hf(state, cfg)
    buffers = {'moe_bias': moe_bias} if moe_bias else {}
    weights = np.ones((B, L), np.float32)
    weights[:, -1] = 0.0
    batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, axis=1), 'weights': weights,
             'segment_ids': np.ones((B, L), np.int32),
             'positions': np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))}
    loss_fn = step_lib.make_pretrain_loss(Transformer(cfg), mtp_weight=0.0)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, buffers, batch, step_lib.pretrain_denominators(batch, 0),
                                               jax.random.PRNGKey(0))[0]))(params)
    got = hf_mapping.hf_from_params(grads, moe_bias, cfg, fused_experts=True)
    checked = 0
    for name, p in model.named_parameters():
        want = p.grad.numpy()
        scale = float(np.abs(want).max())
        assert scale > 0, name  # every parameter takes part
        diff = float(np.abs(got[name] - want).max())
        assert diff <= 2e-5 * scale, f'{name}: max |grad diff| {diff:.2e}, grad scale {scale:.2e}'
        checked += 1
    assert checked == len(list(model.parameters()))


# ---------------------------------------------------------------- exact round trips


@pytest.mark.parametrize('case', ['llama_mha_tied', 'llama_gqa', 'qwen2_gqa_tied', 'v2_noqlora_group_limited',
                                  'v3_qlora'])
def test_state_round_trip_is_exact(case):
    model = hf_model(case)
    fused = state_of(model)
    cfg = our_config(model.config.to_dict())
    per_expert = unfuse(fused)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in fused.items()}
    loaded = {}
    for label, state, is_fused in (('fused', fused, True), ('per_expert', per_expert, False), ('bf16', bf16, True)):
        params, moe_bias = hf_mapping.params_from_hf(state, cfg)
        assert_same_state(hf_mapping.hf_from_params(params, moe_bias, cfg, fused_experts=is_fused), state)
        loaded[label] = (params, moe_bias)
    # Both expert layouts load to the same arrays.
    jax.tree.map(np.testing.assert_array_equal, loaded['fused'], loaded['per_expert'])


def test_export_of_boxed_params_round_trips():
    """Params shaped like `init`'s output (LogicallyPartitioned boxes of jax arrays) -> HF -> ours is exact."""
    model = hf_model('v3_noqlora')
    cfg = our_config(model.config.to_dict())
    # `init`'s boxes filled with random values: compiling init itself takes ~10 s on two cores.
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda box: box.replace_boxed(jnp.asarray(rng.standard_normal(box.value.shape), jnp.float32)),
        abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for fused in (True, False):
        state = hf_mapping.hf_from_params(variables['params'], variables['moe_bias'], cfg, fused_experts=fused)
        params, moe_bias = hf_mapping.params_from_hf(state, cfg)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nn.meta.unbox(variables)),
                     {'params': params, 'moe_bias': moe_bias})


# ---------------------------------------------------------------- MTP


def with_mtp_layer(state: dict, cfg, seed: int = 2) -> dict:
    """Adds a synthetic DeepSeek MTP layer (num_hidden_layers + 0): a random MoE block plus MTP extras."""
    rng = np.random.default_rng(seed)
    src, dst = f'model.layers.{cfg.num_hidden_layers - 1}.', f'model.layers.{cfg.num_hidden_layers}.'
    out = dict(state)
    for name, x in state.items():
        if name.startswith(src):
            base = 1.0 if name.endswith('norm.weight') else 0.0
            out[dst + name[len(src):]] = (base + 0.08 * rng.standard_normal(x.shape)).astype(x.dtype)
    d = cfg.hidden_size
    for name in ('enorm.weight', 'hnorm.weight', 'shared_head.norm.weight'):
        out[dst + name] = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    out[dst + 'eh_proj.weight'] = (0.08 * rng.standard_normal((d, 2 * d))).astype(np.float32)
    out[dst + 'embed_tokens.weight'] = state['model.embed_tokens.weight'].copy()
    out[dst + 'shared_head.head.weight'] = state['lm_head.weight'].copy()
    return out


def mtp_reference(model, state: dict, tokens, next_tokens):
    """DeepSeek's MTP (vLLM/checkpoint order) built from HF's own modules and the synthetic layer's weights."""
    cfg = model.config
    pre = f'model.layers.{cfg.num_hidden_layers}.'
    t = lambda name: torch.from_numpy(state[pre + name])
    layer = hf_v3.DeepseekV3DecoderLayer(cfg, layer_idx=cfg.num_hidden_layers).eval()
    extras = ('enorm.', 'hnorm.', 'eh_proj.', 'shared_head.', 'embed_tokens.')
    layer.load_state_dict({k[len(pre):]: torch.from_numpy(v) for k, v in state.items()
                           if k.startswith(pre) and not k[len(pre):].startswith(extras)}, strict=True)
    norms = {}
    for name in ('enorm', 'hnorm', 'shared_head.norm'):
        norms[name] = hf_v3.DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        norms[name].weight.data = t(f'{name}.weight')
    captured = {}
    model.model.norm.register_forward_hook(lambda mod, args, out: captured.setdefault('h', args[0]))
    with torch.no_grad():
        model(torch.from_numpy(tokens).long())
        emb = model.model.embed_tokens(torch.from_numpy(next_tokens).long())
        x = torch.cat([norms['enorm'](emb), norms['hnorm'](captured['h'])], dim=-1) @ t('eh_proj.weight').T
        positions = torch.arange(L)[None].expand(B, L)
        causal = torch.full((L, L), float('-inf')).triu(1)[None, None]
        y = layer(x, attention_mask=causal, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))
        return model.lm_head(norms['shared_head.norm'](y)).numpy()


def test_mtp_mapping_round_trip_and_forward():
    model = hf_model('v3_qlora')
    base = our_config(model.config.to_dict())
    cfg = dataclasses.replace(base, num_nextn_predict_layers=1)
    state = with_mtp_layer(state_of(model), cfg)
    for st, fused in ((state, True), (unfuse(state), False)):
        params, moe_bias = hf_mapping.params_from_hf(st, cfg)
        assert_same_state(hf_mapping.hf_from_params(params, moe_bias, cfg, fused_experts=fused), st)
    pre = f'model.layers.{cfg.num_hidden_layers}.'
    np.testing.assert_array_equal(params['mtp_0']['eh_proj'], state[pre + 'eh_proj.weight'].T)
    np.testing.assert_array_equal(params['mtp_0']['enorm']['scale'], state[pre + 'enorm.weight'])
    np.testing.assert_array_equal(params['mtp_0']['hnorm']['scale'], state[pre + 'hnorm.weight'])
    np.testing.assert_array_equal(params['mtp_0_norm']['scale'], state[pre + 'shared_head.norm.weight'])
    np.testing.assert_array_equal(moe_bias['mtp_0']['block']['mlp']['bias'],
                                  state[pre + 'mlp.gate.e_score_correction_bias'])

    tokens = tokens_for(cfg.vocab_size)
    next_tokens = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    logits, aux = our_logits(cfg, params, moe_bias, tokens, jnp.asarray(next_tokens))
    with torch.no_grad():
        main = model(torch.from_numpy(tokens).long()).logits.numpy()
    want = mtp_reference(model, state, tokens, next_tokens)
    main_diff = float(np.abs(logits - main).max())
    mtp_diff = float(np.abs(np.asarray(aux['mtp_logits'][0]) - want).max())
    print(f'mtp: main max |diff| = {main_diff:.2e}, mtp max |diff| = {mtp_diff:.2e}')
    assert main_diff < TOL and mtp_diff < TOL

    # The config asks for MTP but the checkpoint (as HF saves it) has none: say which tensor is missing.
    with pytest.raises(KeyError, match=rf'{pre}enorm.weight.*num_nextn_predict_layers=0'):
        hf_mapping.params_from_hf(state_of(model), cfg)
    # A checkpoint with an MTP layer loads into a config without MTP (the layer is skipped).
    params, _ = hf_mapping.params_from_hf(state, base)
    assert 'mtp_0' not in params


# ---------------------------------------------------------------- configs and errors


@pytest.mark.parametrize('case', sorted(CASES))
def test_config_round_trip(case):
    model_type, kwargs = CASES[case]
    hf = transformers.CONFIG_MAPPING[model_type](**kwargs).to_dict()
    fields = hf_mapping.model_fields_from_hf(hf)
    exported = hf_mapping.hf_config_from_model(our_config(hf))
    assert exported['model_type'] == model_type
    assert hf_mapping.model_fields_from_hf(exported) == fields
    # HF reads the export as the same model.
    reread = transformers.CONFIG_MAPPING[model_type](**{k: v for k, v in exported.items() if k != 'model_type'})
    assert hf_mapping.model_fields_from_hf(reread.to_dict()) == fields


def test_old_style_rope_scaling_config():
    """A DeepSeek-V3 hub config.json (top-level rope_theta, `rope_scaling` with `type`) maps like v5's form."""
    hub = dict(CASES['v3_qlora'][1], model_type='deepseek_v3', rope_theta=100.0, num_nextn_predict_layers=1,
               n_routed_experts=8, topk_method='noaux_tc', scoring_func='sigmoid', moe_layer_freq=1,
               rope_scaling=dict(type='yarn', factor=4, original_max_position_embeddings=64, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
    del hub['rope_parameters'], hub['num_mtp_layers']
    fields = hf_mapping.model_fields_from_hf(hub)
    v5 = transformers.CONFIG_MAPPING['deepseek_v3'](**dict(CASES['v3_qlora'][1], num_mtp_layers=1)).to_dict()
    assert fields == hf_mapping.model_fields_from_hf(v5)
    assert fields['rope_scaling']['type'] == 'yarn' and fields['rope_theta'] == 100.0
    assert fields['num_nextn_predict_layers'] == 1


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type='mixtral'"):
        hf_mapping.model_fields_from_hf({'model_type': 'mixtral'})
    dynamic = dict(CASES['llama_gqa'][1], model_type='llama',
                   rope_parameters=dict(rope_type='dynamic', rope_theta=500.0, factor=8.0))
    with pytest.raises(ValueError, match="'dynamic'"):
        hf_mapping.model_fields_from_hf(dynamic)
    with pytest.raises(ValueError, match='use_sliding_window'):
        hf_mapping.model_fields_from_hf(dict(CASES['qwen2_gqa_tied'][1], model_type='qwen2', use_sliding_window=True))
    with pytest.raises(ValueError, match='attention_bias'):  # Llama's bias includes o_proj's
        hf_mapping.model_fields_from_hf(dict(CASES['llama_gqa'][1], model_type='llama', attention_bias=True))

    model = hf_model('v2_noqlora_group_limited')
    state = state_of(model)
    cfg = our_config(model.config.to_dict())
    name = 'model.layers.1.self_attn.kv_b_proj.weight'
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(KeyError, match=name):
        hf_mapping.params_from_hf(missing, cfg)
    bad = dict(state, **{name: state[name][:-1]})
    with pytest.raises(ValueError, match=rf'{name} has shape \(55, 12\), expected \(56, 12\)'):
        hf_mapping.params_from_hf(bad, cfg)
    with pytest.raises(ValueError, match='no place'):
        hf_mapping.params_from_hf(dict(state, **{'model.layers.0.self_attn.q_proj.bias': state[name]}), cfg)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize('case', ['qwen2_gqa_untied', 'llama3_rope_scaling'])
def test_greedy_generation_matches_hf_generate(case):
    """dsjax's cached greedy decoding continues two prompts with exactly the tokens HF's generate picks."""
    model = hf_model(case)
    cfg = our_config(model.config.to_dict())
    params, _ = hf_mapping.params_from_hf(state_of(model), cfg)
    prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 5))
    new = 12
    with torch.no_grad():
        want = model.generate(torch.from_numpy(prompts).long(), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0).numpy()[:, prompts.shape[1]:]
    got = decode.generate(cfg, {'params': params}, [list(p) for p in prompts], max_new_tokens=new)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
