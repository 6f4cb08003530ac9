"""HF checkpoint files in and out (dsjax/interop/hf.py, safetensors_io.py, orbax_io.py, dsjax/convert.py).

Tiny random DeepSeek-LLM (Llama, GQA), R1-Distill layouts (Qwen2; Llama-3 RoPE scaling), DeepSeek-V2 and
DeepSeek-V3 (with a DeepSeek-style MTP layer) checkpoints written by transformers: round trips are bit-exact, transformers loads our exports with
the same logits, FP8 block scales dequantise exactly, and bad files fail naming the file and tensor.
"""
import json
import math
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
import transformers
from absl import flags
from absl.testing import flagsaver

from dsjax import config as config_lib
from dsjax import convert
from dsjax import sharding
from dsjax.interop import hf, hf_mapping, orbax_io
from dsjax.interop import safetensors_io as st
from dsjax.model.transformer import Transformer
from dsjax.train import checkpoint, loop
from dsjax.train.state import TrainState

TOL = 1e-4
_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, rms_norm_eps=1e-5,
               max_position_embeddings=128)
_MLA = dict(_COMMON, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1, kv_lora_rank=12,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6, num_key_value_heads=4, n_routed_experts=8)
FAMILIES = {
    # DeepSeek-LLM 67B's layout: Llama with grouped-query attention.
    'llm': ('llama', dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2)),
    # R1-Distill-Qwen's layout (q/k/v biases, GQA), here with the tied embeddings of the small Qwen2.5 models.
    'qwen2': ('qwen2', dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True)),
    # R1-Distill-Llama's layout: Llama-3.1's RoPE scaling.
    'llama3': ('llama', dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, rope_parameters=dict(
        rope_type='llama3', rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    # V2-Lite's layout (no q compression), group-limited routing as in V2.
    'v2': ('deepseek_v2', dict(_MLA, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3,
                               topk_method='group_limited_greedy', n_group=4, topk_group=2, routed_scaling_factor=2.0)),
    'v3': ('deepseek_v3', dict(_MLA, q_lora_rank=16, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
                               topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                               num_nextn_predict_layers=1)),
}


def hf_model(family: str, seed: int = 0):
    """A tiny transformers model with random weights (norms 1 +- 0.2, a signed V3 routing bias)."""
    model_type, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = transformers.CONFIG_MAPPING[model_type](attn_implementation='eager', **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith('norm.weight') else 0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith('e_score_correction_bias'):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def mtp_tensors(state: dict, num_layers: int, seed: int = 2) -> dict:
    """DeepSeek's MTP layer (stored as layer `num_layers`): a random MoE block plus enorm/hnorm/eh_proj
    and the copies of embedding and head, as DeepSeek-V3's checkpoint has them."""
    g = torch.Generator().manual_seed(seed)
    src, dst = f'model.layers.{num_layers - 1}.', f'model.layers.{num_layers}.'
    out = {}
    for name, x in state.items():
        if name.startswith(src):
            base = 1.0 if name.endswith('norm.weight') else 0.0
            out[dst + name[len(src):]] = (base + 0.08 * torch.randn(x.shape, generator=g)).to(x.dtype)
    d = state['model.embed_tokens.weight'].shape[1]
    dtype = state['model.embed_tokens.weight'].dtype
    for name in ('enorm.weight', 'hnorm.weight', 'shared_head.norm.weight'):
        out[dst + name] = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    out[dst + 'eh_proj.weight'] = (0.08 * torch.randn((d, 2 * d), generator=g)).to(dtype)
    out[dst + 'embed_tokens.weight'] = state['model.embed_tokens.weight'].clone()
    out[dst + 'shared_head.head.weight'] = state['lm_head.weight'].clone()
    return out


def write_checkpoint(directory: pathlib.Path, config: dict, state: dict):
    """config.json + model.safetensors as a DeepSeek release lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'config.json').write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, directory / 'model.safetensors',
                                metadata={'format': 'pt'})


def unfuse(state: dict) -> dict:
    """transformers v5's in-memory fused experts -> per-expert tensors (what save_pretrained writes)."""
    out = {}
    for name, x in state.items():
        if name.endswith('mlp.experts.gate_up_proj'):
            base, f = name[:-len('gate_up_proj')], x.shape[1] // 2
            for e in range(x.shape[0]):
                out[f'{base}{e}.gate_proj.weight'] = x[e, :f].clone()
                out[f'{base}{e}.up_proj.weight'] = x[e, f:].clone()
        elif name.endswith('mlp.experts.down_proj'):
            for e in range(x.shape[0]):
                out[f'{name[:-len("down_proj")]}{e}.down_proj.weight'] = x[e].clone()
        else:
            out[name] = x
    return out


def fuse(state: dict) -> dict:
    """Per-expert tensors -> transformers v5's fused `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj`."""
    out, experts = {}, {}
    for name, x in state.items():
        parts = name.split('.')
        if 'experts' in parts and parts[parts.index('experts') + 1].isdigit():
            i = parts.index('experts')
            base = '.'.join(parts[:i + 1])
            experts.setdefault(base, {}).setdefault(parts[i + 2], {})[int(parts[i + 1])] = x
        else:
            out[name] = x
    for base, by_weight in experts.items():
        stack = lambda w: torch.stack([by_weight[w][e] for e in sorted(by_weight[w])])
        out[f'{base}.gate_up_proj'] = torch.cat([stack('gate_proj'), stack('up_proj')], dim=1)
        out[f'{base}.down_proj'] = stack('down_proj')
    return out


def read_all(directory) -> dict:
    files = st.SafetensorsDir(directory)
    return {name: files.read(name) for name in files.tensors}


def assert_same_files(got_dir, want_dir):
    got, want = read_all(got_dir), read_all(want_dir)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert np.array_equal(got[name].view(np.uint8), want[name].view(np.uint8)), name


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """family -> {'model': HF model (fp32), 'fp32': dir, 'bf16': dir}; V3's files carry an MTP layer,
    V2's bf16 copy is split into shards with an index."""
    root = tmp_path_factory.mktemp('hf')
    out = {}
    for family in FAMILIES:
        model = hf_model(family)
        entry = {'model': model}
        for dtype in ('fp32', 'bf16'):
            directory = root / f'{family}_{dtype}'
            m = model if dtype == 'fp32' else hf_model(family).to(torch.bfloat16)
            if family == 'v3':
                state = unfuse({k: v.detach() for k, v in m.state_dict().items()})  # DeepSeek's per-expert names
                state.update(mtp_tensors(state, m.config.num_hidden_layers))
                for name in [n for n in state if n.endswith('e_score_correction_bias')]:
                    state[name] = state[name].float()  # DeepSeek keeps the routing bias in fp32
                config = m.config.to_dict()
                config['architectures'] = ['DeepseekV3ForCausalLM']
                del config['dtype']
                config['torch_dtype'] = 'float32' if dtype == 'fp32' else 'bfloat16'  # the hub configs' older key
                write_checkpoint(directory, config, state)
            else:
                m.save_pretrained(directory, max_shard_size='20KB' if (family, dtype) == ('v2', 'bf16') else '5GB')
            entry[dtype] = directory
        out[family] = entry
    assert (out['v2']['bf16'] / st.INDEX_FILE).is_file()
    return out


def tokens_for(vocab: int):
    return np.random.default_rng(1).integers(0, vocab, (2, 10)).astype(np.int32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


# ---------------------------------------------------------------- round trips and transformers parity


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_round_trip_is_bit_exact(checkpoints, tmp_path, family):
    """bf16 HF -> dsjax (bf16, and fp32 exported as bf16) -> HF: every tensor equal, byte for byte."""
    src = checkpoints[family]['bf16']
    model, variables = hf.load(src)
    assert model.cfg.param_dtype == 'bfloat16'
    assert model.cfg.num_nextn_predict_layers == (1 if family == 'v3' else 0)
    if family in ('v2', 'v3'):
        assert variables['moe_bias']['moe_layers']['layers']['mlp']['bias'].dtype == jnp.float32
    hf.save(model, variables, tmp_path / 'bf16')
    assert_same_files(tmp_path / 'bf16', src)
    if family == 'v3':
        with pytest.raises(ValueError, match=r'variables lack moe_bias/'):
            hf.save(model, {'params': variables['params']}, tmp_path / 'no_bias')
    model32, variables32 = hf.load(src, dtype='float32')
    hf.save(model32, variables32, tmp_path / 'from_fp32', dtype='bfloat16')
    assert_same_files(tmp_path / 'from_fp32', src)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_transformers_loads_our_export(checkpoints, tmp_path, family):
    """fp32: our logits == HF's on its own checkpoint, and == transformers' on our export (1e-4)."""
    entry = checkpoints[family]
    model, variables = hf.load(entry['fp32'], dtype='float32')
    tokens = tokens_for(model.cfg.vocab_size)
    ours, aux = jax.jit(model.apply)(variables, tokens)
    ours = np.asarray(ours)
    if family == 'v3':
        assert aux['mtp_logits'].shape == (1,) + ours.shape  # the MTP layer loaded and runs
    layouts = (False, True) if family == 'v3' else (False,)
    for fused in layouts:
        out = tmp_path / f'fused_{fused}'
        hf.save(model, variables, out, fused_experts=fused)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
        diff_export = float(np.abs(hf_logits(reloaded, tokens) - ours).max())
        print(f'{family} fused={fused}: transformers on our export vs ours: max |diff| = {diff_export:.2e}')
        assert diff_export < TOL
    diff = float(np.abs(hf_logits(entry['model'], tokens) - ours).max())
    print(f'{family}: ours vs transformers on its checkpoint: max |diff| = {diff:.2e}')
    assert diff < TOL


def test_fused_expert_layout_round_trips(checkpoints, tmp_path):
    """transformers v5's fused experts load to the same arrays and export back byte for byte."""
    src = checkpoints['v3']['bf16']
    state = safetensors.torch.load_file(src / 'model.safetensors')
    write_checkpoint(tmp_path / 'fused', json.loads((src / 'config.json').read_text()), fuse(state))
    _, per_expert = hf.load(src)
    model, fused = hf.load(tmp_path / 'fused')
    jax.tree.map(np.testing.assert_array_equal, per_expert, fused)
    hf.save(model, fused, tmp_path / 'out', fused_experts=True)
    assert_same_files(tmp_path / 'out', tmp_path / 'fused')


# ---------------------------------------------------------------- FP8


@pytest.mark.parametrize('shape, block', [((300, 200), (128, 128)), ((3, 130, 257), (128, 128)),
                                          ((128, 256), (128, 128)), ((70, 45), (64, 32))])
def test_fp8_dequantisation_is_the_plain_formula(shape, block):
    """W[i, j] = W8[i, j] * S[i // b0, j // b1] exactly, partial edge blocks included."""
    rng = np.random.default_rng(0)
    w8 = (rng.standard_normal(shape) * 100).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
    scales = rng.uniform(1e-4, 1e-2, st.scale_shape(shape, block)).astype(np.float32)
    i = np.arange(shape[-2])[:, None] // block[0]
    j = np.arange(shape[-1])[None, :] // block[1]
    want = w8.astype(np.float32) * scales[..., i, j]
    got = st.dequantize_fp8(w8, scales, block)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match='do not fit'):
        st.dequantize_fp8(w8, scales[..., :-1], block)


def test_fp8_checkpoint_loads_dequantised(checkpoints, tmp_path):
    """A DeepSeek-style FP8 V3 checkpoint loads as its dequantised weights; our FP8 export reloads."""
    src = checkpoints['v3']['fp32']
    config = json.loads((src / 'config.json').read_text())
    state = {k: v.numpy() for k, v in safetensors.torch.load_file(src / 'model.safetensors').items()}
    fp8, plain = {}, {}
    for name, x in state.items():
        if hf.fp8_quantised(name):
            w8, scales = st.quantize_fp8(x * 40, (16, 16))  # 16x16 blocks: every tiny weight has several
            fp8[name], fp8[st.scale_name(name)] = w8, scales
            plain[name] = st.dequantize_fp8(w8, scales, (16, 16))
        else:
            fp8[name] = plain[name] = x
    assert any(x.shape[-1] % 16 for x in fp8.values() if x.dtype == ml_dtypes.float8_e4m3fn)  # edge blocks
    to_torch = lambda d: {k: torch.from_numpy(v.view(np.uint8)).view(torch.float8_e4m3fn)
                          if v.dtype == ml_dtypes.float8_e4m3fn else torch.from_numpy(v) for k, v in d.items()}
    fp8_config = dict(config, quantization_config=dict(quant_method='fp8', fmt='e4m3', activation_scheme='dynamic',
                                                      weight_block_size=[16, 16]))
    write_checkpoint(tmp_path / 'fp8', fp8_config, to_torch(fp8))
    write_checkpoint(tmp_path / 'plain', config, to_torch(plain))
    model, got = hf.load(tmp_path / 'fp8', dtype='float32')
    _, want = hf.load(tmp_path / 'plain', dtype='float32')
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert hf.load(tmp_path / 'fp8')[0].cfg.param_dtype == 'bfloat16'  # FP8 runs in bf16 by default

    # Our FP8 export: e4m3 projections with block scales, bf16 elsewhere; it reloads to within FP8 precision.
    hf.save(model, got, tmp_path / 'ours_fp8', fp8=True)
    files = st.SafetensorsDir(tmp_path / 'ours_fp8')
    assert files.tensors['model.layers.1.mlp.experts.3.up_proj.weight'].dtype == ml_dtypes.float8_e4m3fn
    assert files.tensors['model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv'].shape == (1, 1)
    assert files.tensors['model.embed_tokens.weight'].dtype == ml_dtypes.bfloat16
    assert files.tensors['model.layers.1.mlp.gate.e_score_correction_bias'].dtype == np.float32
    _, back = hf.load(tmp_path / 'ours_fp8', dtype='float32')
    w = np.asarray(got['params']['moe_layers']['layers']['attn']['q_b'])
    np.testing.assert_allclose(np.asarray(back['params']['moe_layers']['layers']['attn']['q_b']), w,
                               atol=np.abs(w).max() / 16)


# ---------------------------------------------------------------- errors name the file and tensor


def test_bad_checkpoints_fail_naming_file_and_tensor(checkpoints, tmp_path):
    sharded = tmp_path / 'sharded'
    shutil.copytree(checkpoints['v2']['bf16'], sharded)
    index = json.loads((sharded / st.INDEX_FILE).read_text())['weight_map']
    shard = sorted(set(index.values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf'missing shard .*{shard}'):
        hf.load(sharded)

    src = checkpoints['v3']['bf16']
    for name, keep in (('data', -100), ('header', 20)):
        cut = tmp_path / f'truncated_{name}'
        shutil.copytree(src, cut)
        raw = (cut / 'model.safetensors').read_bytes()
        (cut / 'model.safetensors').write_bytes(raw[:keep])
        pattern = r'model.safetensors is truncated: tensor \S+ needs bytes' if name == 'data' else 'truncated'
        with pytest.raises(ValueError, match=pattern):
            hf.load(cut)

    def with_config(label, **changes):
        directory = tmp_path / label
        shutil.copytree(src, directory)
        config = json.loads((directory / 'config.json').read_text())
        config.update(changes)
        (directory / 'config.json').write_text(json.dumps(config))
        return directory

    with pytest.raises(ValueError, match=r'model.layers.0.mlp.gate_proj.weight in \S+model.safetensors has shape '
                                         r'\(48, 32\), but \S+config.json implies \(40, 32\)'):
        hf.load(with_config('shape', intermediate_size=40))
    with pytest.raises(ValueError, match=r"config.json: architectures=\['MixtralForCausalLM'\] is not supported"):
        hf.load(with_config('arch', architectures=['MixtralForCausalLM']))
    with pytest.raises(ValueError, match=r"config.json: HF model_type='mixtral' is not supported"):
        hf.load(with_config('model_type', architectures=None, model_type='mixtral'))

    pickled = tmp_path / 'pickled'
    pickled.mkdir()
    shutil.copy(src / 'config.json', pickled)
    (pickled / 'pytorch_model.bin').write_bytes(b'\x80\x04not really a pickle')
    assert hf.is_hf_checkpoint(pickled)
    with pytest.raises(ValueError, match=r'pytorch_model.bin.*safetensors only'):
        hf.load(pickled)

    no_mtp = checkpoints['llm']['bf16']
    with pytest.raises(KeyError, match=r'model.layers.4.enorm.weight is missing.*has 1 MTP layers: load with '
                                       r'num_nextn_predict_layers=1'):
        hf.load(checkpoints['v3']['bf16'], num_nextn_predict_layers=2)
    assert not hf.is_hf_checkpoint(tmp_path) and hf.is_hf_checkpoint(no_mtp)


def test_fp8_weight_without_scales_is_named(checkpoints, tmp_path):
    src = checkpoints['v3']['fp32']
    state = safetensors.torch.load_file(src / 'model.safetensors')
    name = 'model.layers.0.self_attn.o_proj.weight'
    state[name] = state[name].to(torch.float8_e4m3fn)
    config = dict(json.loads((src / 'config.json').read_text()),
                  quantization_config=dict(quant_method='fp8', weight_block_size=[128, 128]))
    write_checkpoint(tmp_path / 'fp8', config, state)
    with pytest.raises(KeyError, match=rf'{name} in \S+ has no block scales {name}_scale_inv'):
        hf.load(tmp_path / 'fp8')


# ---------------------------------------------------------------- sharded loading


def test_sharded_load_gives_each_device_only_its_slice(checkpoints, monkeypatch):
    src = checkpoints['v3']['fp32']
    _, whole = hf.load(src, dtype='float32')
    built = []
    real = hf.host_block

    def recording(read, pieces, shape, index, dtype):
        block = real(read, pieces, shape, index, dtype)
        built.append((shape, block.shape))
        return block

    monkeypatch.setattr(hf, 'host_block', recording)
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
    # 2 KB forces the layer-by-layer device fill for every stacked leaf bigger than that.
    model, sharded = hf.load(src, dtype='float32', mesh=mesh, max_host_bytes=2048)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    want_shardings = sharding.logical_sharding(boxed, mesh)
    for got, want, spec in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole), jax.tree.leaves(want_shardings)):
        assert got.sharding == spec
        whole_np = np.asarray(want)
        for shard in got.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), whole_np[shard.index])
    experts = sharded['params']['moe_layers']['layers']['mlp']['gate']  # [M, E, D, F] over (-, expert, fsdp, tensor)
    assert experts.addressable_shards[0].data.shape == (2, 4, 16, 8)
    # The host never built more than one device's slice of a leaf, nor more than 2 KB of it (or one row) at once.
    shard_size = {}
    for spec, x in zip(jax.tree.leaves(want_shardings), jax.tree.leaves(whole)):
        shard_size[x.shape] = max(shard_size.get(x.shape, 0), math.prod(spec.shard_shape(x.shape)))
    for shape, block in built:
        assert math.prod(block) <= shard_size[shape], (shape, block)
        assert math.prod(block) * 4 <= 2048 or block[0] == 1, (shape, block)
    assert any(len(shape) == 4 and block[0] == 1 for shape, block in built)


# ---------------------------------------------------------------- Orbax conversion and init.checkpoint


def test_convert_cli_round_trip_through_orbax(checkpoints, tmp_path):
    """HF -> Orbax (restores onto a mesh like `init.checkpoint`) -> HF, bit-exact, through the CLI."""
    src = checkpoints['v3']['bf16']
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(to='orbax', hf_dir=str(src), orbax_dir=str(tmp_path / 'orbax')):
        convert.convert()
    model, variables = hf.load(src)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    shardings = sharding.logical_sharding(boxed, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                            shardings)
    restored = checkpoint.restore_params(tmp_path / 'orbax', abstract['params'])
    jax.tree.map(np.testing.assert_array_equal, restored, variables['params'])
    with flagsaver.flagsaver(to='hf', hf_dir=str(tmp_path / 'back'), orbax_dir=str(tmp_path / 'orbax'),
                             max_shard_size='30KB', tokenizer_from=str(src)):
        convert.convert()
    assert (tmp_path / 'back' / st.INDEX_FILE).is_file()
    assert_same_files(tmp_path / 'back', src)
    with pytest.raises(FileExistsError, match='already exists'):
        orbax_io.hf_to_orbax(src, tmp_path / 'orbax')
    assert convert.parse_size('5GB') == 5 * 10**9 and convert.parse_size('2 MiB') == 2 << 20


def test_export_of_a_training_checkpoint(checkpoints, tmp_path):
    """A run's own checkpoint (Orbax OCDBT, fp32 params, TrainState) exports to the original bf16 files."""
    src = checkpoints['v2']['bf16']
    model, variables = hf.load(src, dtype='float32')
    c = config_lib.base_config()
    c.model.rope_scaling.update(**dict(model.cfg.rope_scaling.__dict__))
    c.model.update(**{k: v for k, v in model.cfg.__dict__.items() if k != 'rope_scaling'})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], opt_state={},
                       rng=jax.random.PRNGKey(0), buffers={'moe_bias': variables['moe_bias']})
    ckpt = checkpoint.Checkpointer(tmp_path / 'run' / 'checkpoints', keep=1, async_save=False)
    ckpt.save(7, state, config=c.to_dict())
    ckpt.close()
    orbax_io.orbax_to_hf(tmp_path / 'run', tmp_path / 'hf', dtype='bfloat16')
    assert_same_files(tmp_path / 'hf', src)


def test_init_checkpoint_from_a_hf_directory(checkpoints):
    """`init.checkpoint=<HF dir>`: params and routing bias land in the train state's shardings; an
    architecture that differs from config.model is refused, naming the fields."""
    src = checkpoints['v3']['bf16']
    c = config_lib.base_config()
    c.model.update(hf_mapping.model_fields_from_hf(json.loads((src / 'config.json').read_text())))
    c.model.update(moe_dispatch='capacity', remat_policy='full')  # training choices may differ
    model_cfg = config_lib.freeze_model(c.model)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, abstract, _ = loop.build_state_fns(Transformer(model_cfg), optax.sgd(0.1), mesh, seq_len=8)
    params, buffers = loop.start_from(str(src), model_cfg, abstract)
    _, want = hf.load(src, dtype='float32')
    for got, spec, ref in zip(jax.tree.leaves(params), jax.tree.leaves(abstract.params),
                              jax.tree.leaves(want['params'])):
        assert got.sharding == spec.sharding and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(buffers['moe_bias']['moe_layers']['layers']['mlp']['bias']),
                                  np.asarray(want['moe_bias']['moe_layers']['layers']['mlp']['bias']))
    wrong = c.model.copy_and_resolve_references()
    wrong.update(kv_lora_rank=10, routed_scaling_factor=2.0)
    with pytest.raises(config_lib.ConfigError, match=r'init.checkpoint=.*kv_lora_rank=10 \(checkpoint: 12\), '
                                                     r'routed_scaling_factor=2.0 \(checkpoint: 2.5\)'):
        loop.start_from(str(src), config_lib.freeze_model(wrong), abstract)


def test_tied_checkpoint_loads_untied(checkpoints):
    """A tied base (Qwen2.5-Math-1.5B) into an untied model (R1-Distill-Qwen-1.5B): the head starts as the
    embedding, so the logits are the tied model's; the other way round would drop a trained head and is refused."""
    src = checkpoints['qwen2']['fp32']
    tied_model, tied = hf.load(src, dtype='float32')
    model, variables = hf.load(src, dtype='float32', tie_word_embeddings=False)
    np.testing.assert_array_equal(variables['params']['lm_head'], variables['params']['embed']['embedding'].T)
    tokens = tokens_for(model.cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, tokens)[0]),
                                  np.asarray(tied_model.apply(tied, tokens)[0]))
    hf_config = json.loads((src / 'config.json').read_text())
    hf.check_architecture(hf_config, model.cfg, 'init.checkpoint')
    untied_config = dict(hf_config, tie_word_embeddings=False)
    with pytest.raises(config_lib.ConfigError, match=r'tie_word_embeddings=True \(checkpoint: False\)'):
        hf.check_architecture(untied_config, tied_model.cfg, 'init.checkpoint')
