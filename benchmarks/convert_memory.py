"""Peak host memory of checkpoint conversion, against the largest tensor and the whole model.

Run: `python benchmarks/convert_memory.py [--fp8] [--workdir=/tmp]` (a few minutes on 2 CPU cores,
about 3x the checkpoint size of free disk). It writes a random DeepSeek-V3-shaped bf16 checkpoint
of about 2.9 GB (MLA, 32 routed experts of width 1408, an MTP layer; `--fp8` stores the projections
as e4m3 with 128x128 scales instead), then runs, each in a fresh process whose peak RSS is read
from /proc/self/status (VmHWM):

  baseline   python importing dsjax.convert (jax, orbax, tensorstore), converting nothing
  to orbax   python -m dsjax.convert --to=orbax   (HF -> Orbax, the init.checkpoint layout)
  to hf      python -m dsjax.convert --to=hf      (Orbax -> HF, 1 GB shards)

and prints a markdown table (also written to benchmarks/results/convert_memory[_fp8].md).
All generated files are deleted at the end.
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import ml_dtypes
import numpy as np

from dsjax.interop import hf, hf_mapping
from dsjax.interop import safetensors_io as st

RESULTS = pathlib.Path(__file__).parent / 'results'
MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=4096, attention_type='mla', q_lora_rank=512,
             kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
             n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1408,
             first_k_dense_replace=1, scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
             norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1, dtype='bfloat16',
             param_dtype='bfloat16')
_CHILD = '''
import atexit, json, re, runpy, sys
out, argv = sys.argv[1], sys.argv[2:]
# VmHWM belongs to this process's own address space; getrusage's ru_maxrss would also count the
# parent's peak, which the kernel carries over through fork + exec.
hwm = lambda: int(re.search(r'VmHWM:\s+(\d+) kB', open('/proc/self/status').read()).group(1))
atexit.register(lambda: open(out, 'w').write(json.dumps(hwm())))
if argv:
    sys.argv = ['dsjax.convert'] + argv
    runpy.run_module('dsjax.convert', run_name='__main__')
else:
    import jax, dsjax.convert
    jax.devices()
'''


def write_random_checkpoint(directory: pathlib.Path, fp8: bool) -> tuple[int, int, int]:
    """A random checkpoint, tensor by tensor; returns (total bytes, largest tensor bytes, tensors)."""
    from dsjax import config as config_lib
    m = config_lib.base_config().model
    m.update(MODEL)
    cfg = config_lib.freeze_model(m)
    table = hf_mapping.name_map(cfg, False)
    names = [n for n, targets in table.items() if not (n == 'lm_head.weight' and targets[0].copy)]
    plan = []
    for name in names:
        shape = hf_mapping.expected_hf_shape(table[name], cfg)
        if name.endswith('e_score_correction_bias'):
            plan.append((name, np.dtype(np.float32), shape))
        elif fp8 and hf.fp8_quantised(name):
            plan += [(name, np.dtype(ml_dtypes.float8_e4m3fn), shape),
                     (st.scale_name(name), np.dtype(np.float32), st.scale_shape(shape, (128, 128)))]
        else:
            plan.append((name, np.dtype(ml_dtypes.bfloat16), shape))
    # The MTP layer's embed_tokens / shared_head.head are copies of the main ones, as DeepSeek ships them.
    source = {n: 'lm_head.weight' if n.endswith('shared_head.head.weight') else 'model.embed_tokens.weight'
              for n, targets in table.items() if n in names and all(t.copy for t in targets)}
    writer = st.ShardedWriter(directory, plan, max_shard_bytes=10**9)
    for name, dtype, shape in plan:
        rng = np.random.default_rng(zlib.crc32(source.get(name, name).encode()))
        if name.endswith('norm.weight'):
            x = 1 + 0.1 * rng.standard_normal(shape, np.float32)
        elif name.endswith('_scale_inv'):
            x = rng.uniform(1e-4, 1e-3, shape).astype(np.float32)
        else:
            x = 0.02 * rng.standard_normal(shape, np.float32)
        if dtype == ml_dtypes.float8_e4m3fn:
            x = (x * 1e4).clip(-448, 448)
        writer.write(name, x.astype(dtype))
    writer.close()
    config = hf_mapping.hf_config_from_model(cfg)
    config['dtype'] = 'bfloat16'
    if fp8:
        config['quantization_config'] = dict(quant_method='fp8', fmt='e4m3', activation_scheme='dynamic',
                                             weight_block_size=[128, 128])
    (directory / 'config.json').write_text(json.dumps(config))
    sizes = [math.prod(s) * d.itemsize for _, d, s in plan]
    return sum(sizes), max(sizes), len(plan)


def peak_rss(argv: list[str], scratch: pathlib.Path) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a fresh python running `python -m dsjax.convert argv`."""
    out = scratch / 'rss.json'
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', _CHILD, str(out)] + argv, check=True,
                   env=dict(os.environ, JAX_PLATFORMS='cpu'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text()) * 1024, time.perf_counter() - start


def du(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--fp8', action='store_true', help='store the projections in FP8 with block scales')
    parser.add_argument('--workdir', default=None, help='where the temporary checkpoints go (default: $TMPDIR)')
    args = parser.parse_args()
    scratch = pathlib.Path(tempfile.mkdtemp(prefix='dsjax_convert_memory_', dir=args.workdir))
    gb = lambda n: f'{n / 1e9:.2f} GB'
    try:
        start = time.perf_counter()
        total, largest, count = write_random_checkpoint(scratch / 'hf', args.fp8)
        print(f'wrote {count} tensors, {gb(total)} in {time.perf_counter() - start:.0f} s; '
              f'largest tensor {gb(largest)}')
        hf_dir, orbax_dir, back_dir = scratch / 'hf', scratch / 'orbax', scratch / 'back'
        runs = {'baseline (imports only)': [],
                'HF -> Orbax': ['--to=orbax', f'--hf_dir={hf_dir}', f'--orbax_dir={orbax_dir}'],
                'Orbax -> HF (1 GB shards)': ['--to=hf', f'--orbax_dir={orbax_dir}', f'--hf_dir={back_dir}',
                                              '--max_shard_size=1GB']}
        measured = {label: peak_rss(argv, scratch) for label, argv in runs.items()}
        stacked = 3 * 32 * 2048 * 1408 * 2  # one stacked expert leaf (gate of the 3 MoE layers), bf16
        base = measured['baseline (imports only)'][0]
        lines = [f'# Conversion memory{" (FP8 source)" if args.fp8 else ""}', '',
                 f'Random V3-shaped checkpoint: {count} tensors, {gb(total)} on disk (Orbax copy {gb(du(orbax_dir))}); '
                 f'largest HF tensor {gb(largest)}; largest stacked leaf of ours (one expert weight of all MoE '
                 f'layers) {gb(stacked)}. Peak RSS (VmHWM) of a fresh process, on {os.cpu_count()} CPU cores.', '',
                 '| run | peak RSS | above baseline | above baseline / largest tensor | seconds |',
                 '|---|---|---|---|---|']
        for label, (rss, seconds) in measured.items():
            above = (f'{gb(rss - base)} | {(rss - base) / largest:.2f}x' if rss != base else '- | -')
            lines.append(f'| {label} | {gb(rss)} | {above} | {seconds:.0f} |')
        if not args.fp8:  # an FP8 source comes back as bf16, so only the plain one can match bit for bit
            src, back = st.SafetensorsDir(hf_dir), st.SafetensorsDir(back_dir)
            same = sorted(src.tensors) == sorted(back.tensors) and all(
                np.array_equal(back.read(n).view(np.uint8), src.read(n).view(np.uint8)) for n in src.tensors)
            lines += ['', f'HF -> Orbax -> HF bit-exact on every tensor: {same}.']
        text = '\n'.join(lines) + '\n'
        print(text)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f'convert_memory{"_fp8" if args.fp8 else ""}.md').write_text(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
    main()
