"""HF checkpoint <-> Orbax checkpoint, one HF tensor in host memory at a time.

`hf_to_orbax` writes what `init.checkpoint` restores: `<dir>/<step>/state` with a TrainState's
`params` and `buffers['moe_bias']`, `<dir>/<step>/config` (the resolved config, as training runs
save it) and the commit file. Orbax's save takes whole arrays, and our scanned leaves stack every
layer (V3's expert weights are hundreds of GB per leaf), so Orbax only writes the tree's metadata
from one-element placeholders; each leaf is then recreated at full size with tensorstore (zarr3,
one chunk per HF tensor) and filled as the HF tensors stream in.

`orbax_to_hf` opens a checkpoint's arrays with tensorstore (a training run's OCDBT checkpoints or
ours) and reads only the block each HF tensor needs.
"""
import dataclasses
import json
import math
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath

from dsjax import config as config_lib
from dsjax.config import ModelConfig
from dsjax.interop import hf, hf_mapping, hub
from dsjax.interop import safetensors_io as st
from dsjax.train import checkpoint

_COMMIT_FILE = 'commit_success.txt'  # what dsjax.train.checkpoint treats as a complete step
_CHUNK_BYTES = 256 << 20  # a chunk larger than this (a big embedding) is split along its first axis

def orbax_name(path: hf.Path) -> str:
    """The array name Orbax gives our leaf inside a TrainState checkpoint (keys joined by dots)."""
    prefix = ('params',) if path[0] == 'params' else ('buffers', 'moe_bias')
    return '.'.join(prefix + tuple(path[1:]))


def _leaf_dtype(path: hf.Path, cfg: ModelConfig) -> np.dtype:
    return np.dtype(np.float32) if path[0] == 'moe_bias' else np.dtype(jnp.dtype(cfg.param_dtype))


def _chunks(shape: tuple[int, ...], k: int, itemsize: int) -> list[int]:
    """One chunk per HF tensor block (leading k indices fixed), split along its first axis past 256 MiB."""
    chunk = [1] * k + list(shape[k:])
    if len(chunk) > k and math.prod(chunk) * itemsize > _CHUNK_BYTES:
        row = math.prod(chunk[k + 1:]) * itemsize
        chunk[k] = max(1, _CHUNK_BYTES // row)
    return [max(1, c) for c in chunk]


def _resolved_config(cfg: ModelConfig) -> dict:
    c = config_lib.base_config()
    fields = dataclasses.asdict(cfg)
    c.model.rope_scaling.update(**fields.pop('rope_scaling'))
    c.model.update(**fields)
    return c.to_dict()


def hf_to_orbax(hf_dir, out_dir, *, dtype=None, step: int = 0, **model_overrides) -> ModelConfig:
    """Converts a HF checkpoint directory into an Orbax checkpoint `init.checkpoint` can start from.

    Args:
      hf_dir: HF checkpoint (config.json + safetensors; FP8 is dequantised), or a Hub id owner/name.
      out_dir: the checkpoint directory; `<out_dir>/<step>` must not exist yet.
      dtype: stored dtype of the params, a name or jnp/np dtype (None: config.json's; restoring casts to the
        run's param_dtype).
      step: the step number to file it under.
      **model_overrides: ModelConfig fields, as for `hf.load`.

    Returns:
      The model config the checkpoint holds (also saved in `<out_dir>/<step>/config`).
    """
    hf_dir = hub.resolve(hf_dir, 'hf_dir')
    dtype = None if dtype is None else config_lib.dtype_name(dtype, 'dtype')
    hf_config = hf.read_hf_config(hf_dir)
    files = st.SafetensorsDir(hf_dir)
    if 'num_nextn_predict_layers' not in model_overrides and not hf.has_mtp_layer(files, hf_config):
        model_overrides['num_nextn_predict_layers'] = 0
    cfg = hf.model_config(hf_config, dtype or hf.checkpoint_dtype(hf_config), **model_overrides)
    source = hf.HFSource(hf_dir, hf_config, cfg, files)
    out = pathlib.Path(out_dir).resolve()
    final = out / str(step)
    if final.exists():
        raise FileExistsError(f'{final} already exists; pick another --step or output directory')
    # A name dsjax.train.checkpoint skips as incomplete, so a crash leaves nothing restorable.
    tmp = out / f'{step}.orbax-checkpoint-tmp-convert'
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    shapes = hf_mapping.our_shapes(cfg)
    placeholders = {'params': {}, 'buffers': {}}
    for path in shapes:
        node = placeholders['params'] if path[0] == 'params' else placeholders['buffers'].setdefault('moe_bias', {})
        for key in path[1:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros((1,), _leaf_dtype(path, cfg))
    state_dir = tmp / 'state'
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)) as checkpointer:
        checkpointer.save(epath.Path(state_dir), args=ocp.args.PyTreeSave(placeholders))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(epath.Path(tmp / 'config'), args=ocp.args.JsonSave(_resolved_config(cfg)))

    pieces = hf.sources_by_leaf(source.table)
    arrays = {}
    for path, shape in shapes.items():
        leaf_dir = state_dir / orbax_name(path)
        if not leaf_dir.is_dir():  # Orbax named it otherwise: this version's layout is not the one we know
            raise RuntimeError(f'Orbax wrote no array directory {leaf_dir} for leaf {"/".join(path)}')
        dtype_ = _leaf_dtype(path, cfg)
        k = max((len(t.index) for _, t in pieces.get(path, [])), default=0)
        spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': str(leaf_dir)},
                'metadata': {'shape': list(shape), 'data_type': dtype_.name,
                             'chunk_grid': {'name': 'regular',
                                            'configuration': {'chunk_shape': _chunks(shape, k, dtype_.itemsize)}},
                             'codecs': [{'name': 'bytes', 'configuration': {'endian': 'little'}}],
                             'fill_value': 0}}
        arrays[path] = ts.open(spec, create=True, delete_existing=True).result()
        if path not in pieces:  # V2's routers have no bias: zeros, written so every chunk exists
            arrays[path].write(np.zeros(shape, dtype_)).result()

    # File order: each shard is read front to back once.
    order = sorted((n for n in source.table if n in files.tensors and not all(t.copy for t in source.table[n])),
                   key=lambda n: (str(files.tensors[n].file), files.tensors[n].start))
    for i, name in enumerate(order):
        x = source.read(name)
        for t in source.table[name]:
            if not t.copy:
                block = hf.our_block(x, t, shapes[t.path][len(t.index):])
                block = block.astype(_leaf_dtype(t.path, cfg), copy=False)
                arrays[t.path][t.index].write(block).result()
                del block
        del x  # before the next read, so two tensors never coexist
        logging.log_every_n_seconds(logging.INFO, 'Converted %d / %d tensors', 30, i + 1, len(order))
    (tmp / _COMMIT_FILE).write_text(f'converted from {pathlib.Path(hf_dir).resolve()}\n')
    tmp.rename(final)
    return cfg


def orbax_to_hf(checkpoint_dir, out_dir, *, step: int | None = None, dtype=None,
                fused_experts: bool = False, fp8: bool = False,
                max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES) -> ModelConfig:
    """Exports an Orbax checkpoint (a training run's, or `hf_to_orbax`'s) as a HF checkpoint.

    Args:
      checkpoint_dir: a run's workdir, its checkpoints/ directory, or `hf_to_orbax`'s output.
      out_dir: a new directory for config.json and the safetensors shards.
      step: the step to export (default: the newest complete one).
      dtype, fused_experts, fp8, max_shard_bytes: as for `hf.save`.

    Returns:
      The exported model's config.
    """
    step_dir, config = checkpoint.read_config(checkpoint_dir, step, 'checkpoint_dir')
    cfg = config_lib.freeze_model(config.model)
    state_dir = step_dir / 'state'
    meta = json.loads((state_dir / '_METADATA').read_text())
    use_ocdbt, use_zarr3 = bool(meta.get('use_ocdbt', True)), bool(meta.get('use_zarr3', False))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    arrays = {}
    for path in hf_mapping.our_shapes(cfg):
        info = ocp.type_handlers.ParamInfo(name=orbax_name(path), parent_dir=epath.Path(state_dir),
                                           use_zarr3=use_zarr3, ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            arrays[path] = ts.open(spec, context=context, open=True, read=True).result()
        except ValueError as e:
            raise ValueError(f'{state_dir}: no array {orbax_name(path)} for leaf {"/".join(path)} of the saved '
                             f'config ({e})') from e

    def fetch(path, index):
        return np.asarray(arrays[path][index].read().result())

    dtypes = {p: a.dtype.numpy_dtype for p, a in arrays.items()}
    hf.write_hf(out_dir, cfg, fetch, dtypes, dtype=dtype, fused_experts=fused_experts, fp8=fp8,
                max_shard_bytes=max_shard_bytes)
    return cfg
