"""Load and save HF checkpoints (safetensors) of DeepSeek-LLM, V2, V3 and the R1-Distill models (Qwen2,
Llama-3) as dsjax models.

    model, variables = hf.load('/ckpt/DeepSeek-V3', dtype='bfloat16', mesh=mesh)
    logits, aux = model.apply(variables, tokens_BxL)
    hf.save(model, variables, '/out/my-v3')

Loading walks `hf_mapping.name_map`: each of our leaves is assembled from the HF tensors holding its
pieces, one device slice at a time, so a device receives only its slice and the host holds that
slice (or, past `max_host_bytes`, a piece of it) plus one HF tensor. FP8 weights are dequantised
with their block scales as they are read. Saving streams each HF tensor out of the (possibly
sharded) arrays into shards on disk, one tensor in host memory at a time.
"""
import json
import math
import pathlib
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from dsjax import config as config_lib
from dsjax import sharding as sharding_lib
from dsjax.config import ModelConfig
from dsjax.interop import hf_files, hf_mapping, hub
from dsjax.interop import safetensors_io as st
from dsjax.model.transformer import Transformer

CONFIG_FILE = 'config.json'
# DeepSeek-LLM 7B / 67B ship as Llama; the R1-Distill models as Qwen2 (Qwen2.5 bases) or Llama (Llama-3.x).
ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2', 'DeepseekV2ForCausalLM': 'deepseek_v2',
                 'DeepseekV3ForCausalLM': 'deepseek_v3'}
DEFAULT_SHARD_BYTES = 5 * 10**9  # HF's usual shard size
DEFAULT_HOST_BYTES = 1 << 30
# Fields a run may set apart from the checkpoint: the context (a long-context stage changes RoPE
# scaling and positions), the init scale, and MTP depth (an absent MTP layer is reported as missing).
_FREE_FIELDS = ('rope_theta', 'rope_scaling', 'max_position_embeddings', 'initializer_range',
                'num_nextn_predict_layers')

Path = tuple[str, ...]


# ---------------------------------------------------------------- config.json


def is_hf_checkpoint(path) -> bool:
    """Whether `path` is a HF checkpoint directory (config.json beside safetensors or pickled weights)."""
    p = pathlib.Path(path)
    if not (p.is_dir() and (p / CONFIG_FILE).is_file()):
        return False
    return (any(p.glob('*.safetensors')) or (p / st.INDEX_FILE).is_file()
            or any(q.suffix in st.PICKLE_SUFFIXES for q in p.iterdir()))


def read_hf_config(path) -> dict:
    """The checkpoint's config.json, checked: a supported architecture, model_type and layout."""
    file = pathlib.Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f'{file} does not exist: a HF checkpoint directory holds config.json beside '
                                'its *.safetensors')
    hf = json.loads(file.read_text())
    archs = hf.get('architectures') or []
    for arch in archs:
        if arch not in ARCHITECTURES:
            raise ValueError(f'{file}: architectures={archs!r} is not supported; supported: {sorted(ARCHITECTURES)}')
        if ARCHITECTURES[arch] != hf.get('model_type'):
            raise ValueError(f'{file}: architecture {arch} needs model_type={ARCHITECTURES[arch]!r}, '
                             f'got {hf.get("model_type")!r}')
    try:
        hf_mapping.model_fields_from_hf(hf)
        fp8_block(hf)
    except KeyError as e:
        raise ValueError(f'{file}: required field {e} is missing') from e
    except ValueError as e:
        raise ValueError(f'{file}: {e}') from e
    return hf


def fp8_block(hf_config: dict) -> tuple[int, int] | None:
    """The FP8 weight block (rows, cols) of a block-quantised checkpoint, None for plain weights."""
    q = hf_config.get('quantization_config')
    if not q:
        return None
    if q.get('quant_method') != 'fp8':
        raise ValueError(f"quantization_config.quant_method={q.get('quant_method')!r} is not supported: dsjax "
                         "reads plain weights and block-scaled 'fp8'")
    block = tuple(q.get('weight_block_size') or (128, 128))
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f'quantization_config.weight_block_size={block!r}: need two positive sizes')
    return block


def checkpoint_dtype(hf_config: dict) -> str:
    """The dtype the checkpoint's weights are meant to run in (bfloat16 for FP8 checkpoints)."""
    if fp8_block(hf_config):
        return 'bfloat16'
    dtype = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
    return dtype if dtype in config_lib.DTYPES else 'float32'


def model_config(hf_config: dict, dtype: str, **overrides) -> ModelConfig:
    """Our frozen ModelConfig for a HF config, computing and storing in `dtype`, plus any overrides."""
    m = config_lib.base_config().model
    m.update(hf_mapping.model_fields_from_hf(hf_config))
    m.update(dtype=dtype, param_dtype=dtype)
    m.update(overrides)
    return config_lib.freeze_model(m)


def check_architecture(hf_config: dict, cfg: ModelConfig, where: str) -> None:
    """Raises ConfigError listing every architecture field where `cfg` and the checkpoint disagree."""
    diffs = []
    for field, theirs in hf_mapping.model_fields_from_hf(hf_config).items():
        if field in _FREE_FIELDS or (cfg.attention_type == 'mla' and field in ('num_key_value_heads', 'head_dim')):
            continue
        if field == 'tie_word_embeddings' and theirs and not cfg.tie_word_embeddings:
            continue  # untying copies the embedding into the head, as R1-Distill-Qwen-1.5B did to its base
        if getattr(cfg, field) != theirs:
            diffs.append(f'{field}={getattr(cfg, field)!r} (checkpoint: {theirs!r})')
    if diffs:
        raise config_lib.ConfigError(
            f'config.{where} holds a {hf_config.get("model_type")} checkpoint whose architecture differs from '
            f'config.model: {", ".join(diffs)}; set these model fields to the checkpoint\'s values')


# ---------------------------------------------------------------- reading tensors


class HFSource:
    """A HF checkpoint checked against a model config: its tensors by name, dequantised when FP8."""

    def __init__(self, path, hf_config: dict, cfg: ModelConfig, files: st.SafetensorsDir | None = None):
        self.files = files or st.SafetensorsDir(path)
        self.cfg = cfg
        self.block = fp8_block(hf_config)
        self.fused = any(n.endswith('mlp.experts.gate_up_proj') for n in self.files.tensors)
        self.table = hf_mapping.name_map(cfg, self.fused)
        # A tied checkpoint loaded into an untied model: the head starts as the embedding ([V, D] both ways).
        self.aliases = {}
        if hf_config.get('tie_word_embeddings') and 'lm_head.weight' not in self.files.tensors:
            self.aliases['lm_head.weight'] = 'model.embed_tokens.weight'
        self._check()

    def _check(self):
        """Every error a load could hit, found from the headers before any data is read."""
        cfg, tensors, where = self.cfg, self.files.tensors, self.files.directory
        last = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        skipped = lambda n: (layer_of(n) or 0) >= last or n.endswith('rotary_emb.inv_freq')
        unexpected = sorted(n for n in tensors if n not in self.table and not skipped(n)
                            and not (n.endswith('_scale_inv') and n[:-len('_scale_inv')] in tensors))
        if unexpected:
            raise ValueError(f'{where}: tensors with no place in the model its config.json describes: '
                             f'{unexpected[:6]}{" ..." if len(unexpected) > 6 else ""}')
        for name, targets in self.table.items():
            name = self.aliases.get(name, name)
            if name not in tensors:
                if all(t.copy for t in targets):
                    continue
                hint = ''
                if (layer_of(name) or 0) >= cfg.num_hidden_layers:
                    depth = sum(layer_of(n) is not None and layer_of(n) >= cfg.num_hidden_layers and
                                n.endswith('.enorm.weight') for n in tensors)
                    hint = f' (the checkpoint has {depth} MTP layers: load with num_nextn_predict_layers={depth})'
                raise KeyError(f'HF tensor {name} is missing from {where}{hint}')
            info, expected = tensors[name], hf_mapping.expected_hf_shape(targets, cfg)
            if info.shape != expected:
                raise ValueError(f'HF tensor {self.files.describe(name)} has shape {info.shape}, but '
                                 f'{where / CONFIG_FILE} implies {expected}')
            if st.is_fp8(info.dtype):
                scale = st.scale_name(name)
                if self.block is None:
                    raise ValueError(f'HF tensor {self.files.describe(name)} is {info.dtype}, but '
                                     f'{where / CONFIG_FILE} has no fp8 quantization_config')
                if scale not in tensors:
                    raise KeyError(f'FP8 tensor {self.files.describe(name)} has no block scales {scale}')
                want = st.scale_shape(info.shape, self.block)
                if tensors[scale].shape != want:
                    raise ValueError(f'HF tensor {self.files.describe(scale)} has shape {tensors[scale].shape}; '
                                     f'{name} {info.shape} in {self.block[0]}x{self.block[1]} blocks needs {want}')

    def read(self, name: str) -> np.ndarray:
        """HF tensor `name`, FP8 weights dequantised to float32."""
        x = self.files.read(self.aliases.get(name, name))
        if st.is_fp8(x.dtype):
            x = st.dequantize_fp8(x, self.files.read(st.scale_name(name)), self.block)
        return x


def layer_of(name: str) -> int | None:
    """N of `model.layers.N.*`, else None."""
    parts = name.split('.')
    if len(parts) > 2 and parts[:2] == ['model', 'layers'] and parts[2].isdigit():
        return int(parts[2])
    return None


def has_mtp_layer(files: st.SafetensorsDir, hf_config: dict) -> bool:
    """Whether the checkpoint stores layer `num_hidden_layers` (DeepSeek's MTP; HF drops it on save)."""
    return any(layer_of(n) == hf_config['num_hidden_layers'] for n in files.tensors)


def our_block(x: np.ndarray, t: hf_mapping.Target, block_shape: tuple[int, ...]) -> np.ndarray:
    """The piece `t` of HF tensor `x`, in our layout (as `hf_mapping.put` places it)."""
    if t.part is not None:
        axis, i, n = t.part
        size = x.shape[axis] // n
        x = x[(slice(None),) * axis + (slice(i * size, (i + 1) * size),)]
    return t.layout.to_ours(x, block_shape)


def sources_by_leaf(table) -> dict[Path, list[tuple[str, hf_mapping.Target]]]:
    """Our leaf -> the (HF name, target) pieces it is made of (duplicates excluded)."""
    out = {}
    for name, targets in table.items():
        for t in targets:
            if not t.copy:
                out.setdefault(t.path, []).append((name, t))
    return out


class _LastTensor:
    """`read`, remembering the last tensor: consecutive pieces of one tensor read it once."""

    def __init__(self, read: Callable[[str], np.ndarray]):
        self._read, self._name, self._x = read, None, None

    def __call__(self, name: str) -> np.ndarray:
        if name != self._name:
            self._name, self._x = None, None  # drop the old tensor before reading the next
            self._x, self._name = self._read(name), name
        return self._x


def host_block(read, pieces, shape, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The slice `index` of one of our leaves (shape `shape`), from the HF tensors that overlap it.

    Leaves no HF tensor covers (V2's absent routing bias) stay zero.
    """
    block = np.zeros(tuple(s.stop - s.start for s in index), dtype)
    for name, t in pieces:
        k = len(t.index)
        if all(index[i].start <= t.index[i] < index[i].stop for i in range(k)):
            piece = our_block(read(name), t, shape[k:])[index[k:]]
            block[tuple(t.index[i] - index[i].start for i in range(k))] = piece
    return block


def _set_rows(buf, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows, start, 0)


# In place on the device: the buffer is donated, so a leaf never exists twice there.
_set_rows_donated = jax.jit(_set_rows, donate_argnums=0)


def _place(read, pieces, shape, dtype, sharding, max_host_bytes: int) -> jax.Array:
    """One leaf as a jax.Array in `sharding`: each addressable device gets only its own slice."""
    groups: dict[tuple, list] = {}  # replicas share a slice, which is then built once
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))  # (start, stop): slices are unhashable
        groups.setdefault(key, []).append(device)
    itemsize = np.dtype(dtype).itemsize
    arrays = {}
    for key, devices in groups.items():
        index = tuple(slice(*bounds) for bounds in key)
        sizes = tuple(s.stop - s.start for s in index)
        step = max(1, max_host_bytes // max(1, math.prod(sizes[1:]) * itemsize)) if sizes else 1
        if not sizes or sizes[0] <= step:
            block = host_block(read, pieces, shape, index, dtype)
            for d in devices:
                arrays[d] = jax.device_put(block, d)
            continue
        # Too large for one host buffer: fill the device buffer a few leading rows (layers) at a time.
        for d in devices:
            arrays[d] = jnp.zeros(sizes, dtype, device=d)
        for r in range(0, sizes[0], step):
            rows = slice(index[0].start + r, index[0].start + min(sizes[0], r + step))
            block = host_block(read, pieces, shape, (rows,) + index[1:], dtype)
            for d in devices:
                arrays[d] = _set_rows_donated(arrays[d], jax.device_put(block, d), r)
            del block
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in arrays])


def read_leaves(source: HFSource, leaves: Mapping[Path, tuple], max_host_bytes: int = DEFAULT_HOST_BYTES):
    """{our path: (shape, dtype, sharding)} -> {our path: jax.Array}, leaf by leaf."""
    by_leaf = sources_by_leaf(source.table)
    shapes = hf_mapping.our_shapes(source.cfg)
    read = _LastTensor(source.read)
    out = {}
    for path, (shape, dtype, sharding) in leaves.items():
        if tuple(shape) != shapes[path]:
            raise ValueError(f'leaf {"/".join(path)} has shape {tuple(shape)}; the checkpoint gives {shapes[path]}')
        out[path] = _place(read, by_leaf.get(path, []), tuple(shape), dtype, sharding, max_host_bytes)
        logging.log_every_n_seconds(logging.INFO, 'Loaded %s', 30, '/'.join(path))
    return out


def _leaf_specs(model: Transformer, mesh, rules) -> dict[Path, tuple]:
    """Every variable leaf of `model` -> (shape, dtype, sharding): logical rules on a mesh, else device 0."""
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
    else:
        shardings = sharding_lib.logical_sharding(boxed, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]
    return {_keys(kp): (leaf.shape, leaf.dtype, s) for (kp, leaf), s in zip(flat, jax.tree.leaves(shardings))}


def _keys(keypath) -> Path:
    return tuple(str(k.key) for k in keypath)


def load(path, dtype=None, *, mesh: jax.sharding.Mesh | None = None,
         rules=sharding_lib.DEFAULT_RULES, max_host_bytes: int = DEFAULT_HOST_BYTES, **model_overrides):
    """Loads a HF checkpoint directory (Llama / DeepSeek-LLM, DeepSeek-V2, DeepSeek-V3, FP8 or not).

    Args:
      path: a directory with config.json and model.safetensors (or shards and their index), or a Hub
        id 'owner/name[@revision]' (downloaded once, see dsjax.interop.hub).
      dtype: float32, bfloat16 or float16 (a name or jnp/np dtype) for parameters and compute; None takes
        config.json's dtype (bfloat16 for FP8 checkpoints). The V3 routing bias stays float32.
      mesh: place each leaf on this mesh by `rules` (each device reads only its slice); None puts
        everything on the first device.
      rules: logical-axis rules (dsjax.sharding.DEFAULT_RULES).
      max_host_bytes: a device slice larger than this is filled on the device a few rows (layers)
        at a time, each piece at most this size (or one row).
      **model_overrides: other ModelConfig fields (moe_dispatch, remat_policy, ...). An MTP layer is
        loaded when the checkpoint has one (layer num_hidden_layers), unless num_nextn_predict_layers=0.

    Returns:
      (model, variables): `logits, aux = model.apply(variables, tokens)` for int32 tokens [B, L];
      variables holds 'params' and, for MoE models, 'moe_bias'.
    """
    path = hub.resolve(path, 'hf.load(path)')
    dtype = None if dtype is None else config_lib.dtype_name(dtype, 'hf.load(dtype)')
    hf_config = read_hf_config(path)
    files = st.SafetensorsDir(path)
    if 'num_nextn_predict_layers' not in model_overrides and not has_mtp_layer(files, hf_config):
        model_overrides['num_nextn_predict_layers'] = 0  # HF's own saves drop DeepSeek's MTP layer
    cfg = model_config(hf_config, dtype or checkpoint_dtype(hf_config), **model_overrides)
    source = HFSource(path, hf_config, cfg, files)
    model = Transformer(cfg)
    flat = read_leaves(source, _leaf_specs(model, mesh, rules), max_host_bytes)
    nested = hf_mapping.nest(flat)
    return model, {k: nested[k] for k in ('params', 'moe_bias') if k in nested}


def load_into(path, cfg: ModelConfig, abstract_params, abstract_buffers, where: str = 'init.checkpoint',
              max_host_bytes: int = DEFAULT_HOST_BYTES):
    """HF weights into a train state's abstract (sharded) params and buffers, for `init.checkpoint`.

    Returns (params, buffers) with the abstract trees' structure, shardings and dtypes.

    Raises:
      ConfigError: the checkpoint's architecture differs from `cfg` (every differing field is named).
    """
    hf_config = read_hf_config(path)
    check_architecture(hf_config, cfg, f'{where}={str(path)!r}')
    source = HFSource(path, hf_config, cfg)
    trees = {'params': abstract_params, 'moe_bias': dict(abstract_buffers).get('moe_bias', {})}
    flat, treedefs = {}, {}
    for name, tree in trees.items():
        leaves, treedefs[name] = jax.tree_util.tree_flatten_with_path(tree)
        for kp, leaf in leaves:
            flat[(name,) + _keys(kp)] = (leaf.shape, leaf.dtype, leaf.sharding)
    arrays = read_leaves(source, flat, max_host_bytes)
    out = {}
    for name, treedef in treedefs.items():
        out[name] = jax.tree_util.tree_unflatten(treedef, [x for p, x in arrays.items() if p[0] == name])
    buffers = dict(abstract_buffers)
    if 'moe_bias' in buffers:
        buffers['moe_bias'] = out['moe_bias']
    return out['params'], buffers


# ---------------------------------------------------------------- writing


# DeepSeek's FP8 release quantises the attention and MLP projections (experts and shared experts
# included) and keeps embeddings, head, norms, router and the MTP extras in bf16 (spec section 6).
def fp8_quantised(name: str) -> bool:
    """Whether DeepSeek's FP8 checkpoints store tensor `name` in FP8."""
    parts = name.split('.')
    linear = parts[-1] == 'weight' and '_proj' in parts[-2]  # q_a_proj ... kv_a_proj_with_mqa, o_proj
    return (linear and ('self_attn' in parts or 'mlp' in parts)) or name.endswith(
        ('mlp.experts.gate_up_proj', 'mlp.experts.down_proj'))


def write_hf(directory, cfg: ModelConfig, fetch: Callable[[Path, tuple], np.ndarray], leaf_dtypes, *,
             dtype=None, fused_experts: bool = False, fp8: bool = False,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES, block: tuple[int, int] = (128, 128)) -> None:
    """Writes config.json and safetensors shards, pulling one HF tensor at a time through `fetch`.

    `fetch(path, index)` returns block `index` of our leaf `path` as numpy; `leaf_dtypes` maps a
    leaf to its dtype (kept unless `dtype` is given; the routing bias stays float32).
    """
    directory = pathlib.Path(directory)
    dtype = None if dtype is None else config_lib.dtype_name(dtype, 'dtype')
    if directory.exists() and (any(directory.glob('*.safetensors')) or (directory / st.INDEX_FILE).exists()):
        raise FileExistsError(f'{directory} already holds a safetensors checkpoint; write to a new directory')
    table = hf_mapping.name_map(cfg, fused_experts)
    # HF does not store a tied head; DeepSeek does store the MTP layer's copies of embedding and head.
    names = [n for n, targets in table.items() if not (n == 'lm_head.weight' and targets[0].copy)]

    def out_dtype(name):
        path = table[name][0].path
        return np.dtype(np.float32) if path[0] == 'moe_bias' else np.dtype(dtype or leaf_dtypes[path])

    plan = []
    for name in names:
        shape = hf_mapping.expected_hf_shape(table[name], cfg)
        if fp8 and fp8_quantised(name):
            plan += [(name, np.dtype(ml_dtypes.float8_e4m3fn), shape),
                     (st.scale_name(name), np.dtype(np.float32), st.scale_shape(shape, block))]
        else:
            plan.append((name, out_dtype(name), shape))
    writer = st.ShardedWriter(directory, plan, max_shard_bytes)
    try:
        for name in names:
            targets = table[name]
            blocks = [t.layout.to_hf(fetch(t.path, t.index)) for t in targets]
            x = blocks[0] if targets[0].part is None else np.concatenate(blocks, axis=targets[0].part[0])
            if fp8 and fp8_quantised(name):
                w8, scales = st.quantize_fp8(x, block)
                writer.write(name, w8)
                writer.write(st.scale_name(name), scales)
                del w8, scales
            else:
                writer.write(name, x.astype(out_dtype(name), copy=False))
            del x, blocks  # before the next fetch, so two tensors never coexist
        writer.close()
    except BaseException:
        writer.abort()
        raise
    hf_config = hf_mapping.hf_config_from_model(cfg)
    hf_config['dtype'] = 'bfloat16' if fp8 else str(np.dtype(dtype or cfg.param_dtype))
    if fp8:
        hf_config['quantization_config'] = dict(quant_method='fp8', fmt='e4m3', activation_scheme='dynamic',
                                                weight_block_size=list(block))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + '\n')


@jax.jit
def _take(x, idx):
    return x[tuple(idx[i] for i in range(idx.shape[0]))]


def array_fetcher(flat: Mapping[Path, object]) -> Callable[[Path, tuple], np.ndarray]:
    """`fetch` for in-memory leaves: a block of a (sharded) jax.Array comes to the host alone."""
    def fetch(path, index):
        x = flat[path]
        if not index:
            return np.asarray(x)
        if isinstance(x, jax.Array):
            return np.asarray(_take(x, np.asarray(index, np.int32)))
        return np.asarray(x)[index]
    return fetch


def save(model: Transformer, variables, path, *, dtype=None, fused_experts: bool = False,
         fp8: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer=None, sampling=None) -> None:
    """Saves `variables` of `model` as a HF checkpoint transformers' `from_pretrained` loads.

    Args:
      model: the Transformer (its cfg picks Llama, DeepseekV2 or DeepseekV3).
      variables: {'params': ..., 'moe_bias': ...}, boxed or not, jax or numpy, sharded or not.
      path: a new directory (or one without safetensors in it).
      dtype: the stored dtype of the weights (a name or jnp/np dtype); None keeps each leaf's. The
        routing bias stays float32.
      fused_experts: transformers v5's `mlp.experts.{gate_up,down}_proj` instead of per-expert tensors.
      fp8: store DeepSeek's FP8 layout: e4m3 projections with 128x128 `weight_scale_inv`
        (scale = block amax / 448), everything else bf16.
      max_shard_bytes: largest safetensors file before a new shard starts.
      tokenizer: a dsjax tokenizer (or a HF tokenizer directory) to write beside the weights.
      sampling: a dsjax.infer.sampling.SamplingConfig for generation_config.json (with a tokenizer and
        no sampling, generation_config.json says greedy).
    """
    trees = {'params': nn.meta.unbox(variables['params']), 'moe_bias': nn.meta.unbox(variables.get('moe_bias', {}))}
    flat = {}
    for name, tree in trees.items():
        for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flat[(name,) + _keys(kp)] = leaf
    missing = sorted(set(hf_mapping.our_shapes(model.cfg)) - set(flat))
    if missing:
        raise ValueError(f'variables lack {"/".join(missing[0])} (and {len(missing) - 1} more leaves) of this '
                         "model: pass model.init's or hf.load's {'params', 'moe_bias'}")
    dtypes = {p: (ml_dtypes.bfloat16 if fp8 else x.dtype) for p, x in flat.items()}
    write_hf(path, model.cfg, array_fetcher(flat), dtypes, dtype=dtype, fused_experts=fused_experts, fp8=fp8,
             max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        hf_files.write_tokenizer(path, tokenizer)
    if tokenizer is not None or sampling is not None:
        hf_files.write_generation_config(path, tokenizer if hasattr(tokenizer, 'eos_id') else None, sampling)
