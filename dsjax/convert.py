"""Convert checkpoints between a HF directory (safetensors, FP8 included) and an Orbax checkpoint.

    python -m dsjax.convert --to=orbax --hf_dir=/ckpt/DeepSeek-V3 --orbax_dir=/ckpt/v3_orbax
    python -m dsjax.convert --to=orbax --hf_dir=deepseek-ai/DeepSeek-V2-Lite --orbax_dir=/ckpt/v2_lite_orbax
    python -m dsjax.convert --to=hf --orbax_dir=runs/v3_small --hf_dir=/out/v3_small_hf [--step=N]

Both directions stream: one HF tensor (and its block of our arrays) is in host memory at a time.
The Orbax side is what `--config.init.checkpoint=DIR` starts a run from (a HF directory works there
too, without converting). `--to=hf` exports a training run's checkpoint or a converted one.
"""
import ctypes
import pathlib
import re
import shutil

from absl import flags, logging

from dsjax import cli
from dsjax.interop import hf_files, hf_mapping, hub, orbax_io

_TO = flags.DEFINE_enum('to', None, ['orbax', 'hf'], 'Direction: HF -> Orbax, or Orbax -> HF.')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'HF checkpoint directory (read for --to=orbax, where a Hub id '
                              'owner/name[@revision] works too; written for --to=hf).')
_ORBAX_DIR = flags.DEFINE_string('orbax_dir', None, 'Orbax checkpoint directory or run workdir.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Stored dtype of the weights (default: the source\'s; FP8 sources give bfloat16).')
_STEP = flags.DEFINE_integer('step', None, 'Orbax step: to write (--to=orbax, default 0) or read (default newest).')
_FUSED = flags.DEFINE_bool('fused_experts', False, '--to=hf: transformers v5 fused expert tensors '
                           '(mlp.experts.gate_up_proj / down_proj) instead of one tensor per expert.')
_FP8 = flags.DEFINE_bool('fp8', False, '--to=hf: DeepSeek\'s FP8 layout (e4m3 projections with 128x128 '
                         'weight_scale_inv blocks).')
_MAX_SHARD = flags.DEFINE_string('max_shard_size', '5GB', '--to=hf: largest safetensors file, e.g. 5GB, 500MB.')
_TOKENIZER_FROM = flags.DEFINE_string('tokenizer_from', None, '--to=hf: copy the tokenizer files and '
                                      'generation_config.json of this HF directory into the export.')
_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r'\s*([0-9.]+)\s*([A-Za-z]*)\s*', text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f'--max_shard_size={text!r}: use a number with B, KB, MB, GB, KiB, MiB or GiB')
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def convert() -> None:
    """Runs the conversion the flags describe."""
    if _TO.value == 'orbax':
        cfg = orbax_io.hf_to_orbax(_HF_DIR.value, _ORBAX_DIR.value, dtype=_DTYPE.value, step=_STEP.value or 0)
        logging.info('Wrote %s (step %d): %s', _ORBAX_DIR.value, _STEP.value or 0, _describe(cfg))
        return
    cfg = orbax_io.orbax_to_hf(_ORBAX_DIR.value, _HF_DIR.value, step=_STEP.value, dtype=_DTYPE.value,
                               fused_experts=_FUSED.value, fp8=_FP8.value,
                               max_shard_bytes=parse_size(_MAX_SHARD.value))
    if _TOKENIZER_FROM.value:
        source = pathlib.Path(hub.resolve(_TOKENIZER_FROM.value, '--tokenizer_from'))
        names = (*hf_files.TOKENIZER_FILES, hf_files.SENTENCEPIECE_FILE, hf_files.GENERATION_CONFIG)
        copied = [n for n in names if (source / n).is_file()]
        for name in copied:
            shutil.copyfile(source / name, pathlib.Path(_HF_DIR.value) / name)
        if not copied:
            logging.warning('--tokenizer_from=%s holds none of %s', source, names)
    logging.info('Wrote %s: %s', _HF_DIR.value, _describe(cfg))


def _describe(cfg) -> str:
    return f'{hf_mapping.hf_config_from_model(cfg)["model_type"]}, {cfg.num_hidden_layers} layers'


def _return_freed_buffers_to_the_os() -> None:
    """Makes glibc serve every buffer over 1 MiB with mmap, so freeing it returns it to the OS.

    glibc raises its mmap threshold to the size of the largest buffer freed (up to 32 MiB); after the
    first big tensor, tensor-sized buffers then come from per-thread arenas (tensorstore's threads)
    that keep freed memory, and RSS grows with the number of tensors converted instead of staying
    near the largest one (benchmarks/convert_memory.py, Orbax -> HF: 0.61 GB -> 0.52 GB peak).
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc: nothing to tune
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def main():
    _return_freed_buffers_to_the_os()
    convert()


if __name__ == '__main__':
    flags.mark_flags_as_required(['to', 'hf_dir', 'orbax_dir'])
    cli.run(main, errors=cli.USER_ERRORS + (KeyError,))
