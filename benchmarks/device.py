"""bf16 MFU on one accelerator: a ~1B dense model and a V3-style MoE with ~1B activated parameters.

Run on a GPU machine with `bash benchmarks/device.sh` (which calls this), or directly:
`python benchmarks/device.py [--shrink] [--dispatch=grouped,ragged,capacity] [--batch=8 --seq=2048]`.
Writes benchmarks/results/device.md (device_shrink.md with --shrink, a tiny CPU check of the script).

Each model runs the loop's training step (benchmarks/train_step.py's build: forward, losses, backward,
clipping, AdamW, routing-bias update; float32 params and moments, bfloat16 compute) on random tokens,
STEPS steps after a compile, median step time. MFU = model FLOPs (dsjax.model.flops, activated experts
only, causal attention) / step time / peak, with peak both the measured bf16 matmul (8192^3 jnp.dot,
best of 10) and the device's nominal dense bf16 peak where known. The MoE runs once per dispatch
strategy, so the table also says which strategy `moe_dispatch='auto'` should pick on this backend.
With --torch (default on) the dense model also runs in HF transformers' LlamaForCausalLM on the same device,
first (before jax holds the memory), with float32 weights and AdamW under bf16 autocast: the same recipe,
side by side. The table is rewritten after every row, so a run cut short keeps what it measured.
"""
import pathlib
import statistics
import time

from absl import app, flags
import jax

from dsjax import config as config_lib
from dsjax import presets
from dsjax.model import flops

import harness as ts  # benchmarks/harness.py, beside this file

RESULTS = pathlib.Path(__file__).parent / 'results'
# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, by jax's device_kind.
NOMINAL_BF16 = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12,
                'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12, 'NVIDIA GH200 480GB': 989e12}

_SHRINK = flags.DEFINE_bool('shrink', False, 'Tiny models and batch (checks the script on CPU in a minute).')
_DISPATCH = flags.DEFINE_list('dispatch', ['grouped', 'ragged', 'capacity'], 'MoE dispatch strategies to time.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step.')
_SEQ = flags.DEFINE_integer('seq', 2048, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per model.')
_REMAT = flags.DEFINE_string('remat', 'save_dots', 'model.remat_policy for both models.')
_ATTENTION = flags.DEFINE_string('attention_impl', 'auto', "model.attention_impl for both models ('auto' gives "
                                 'cudnn to the dense model on a GPU, xla to MLA).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the dense model in HF transformers (PyTorch) on the device.')
_OUT = flags.DEFINE_string('out', '', 'Where to write the table (default results/device.md, device_shrink.md '
                           'with --shrink).')


def dense_1b():
    """DeepSeek-LLM-style dense: 20 layers, d=2048, SwiGLU 5504, 16 heads, vocab 32000 (~1.1B params)."""
    c = config_lib.base_config()
    c.model.update(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=20,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    return c


def moe_1b_active():
    """V3-style: MLA, 1 dense + 21 MoE layers of 1 shared + 32 routed experts (top-4, width 1024), sigmoid
    group-limited routing with the bias, one MTP depth; ~1.0B activated parameters, ~5B in all."""
    c = config_lib.base_config()
    c.model.update(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                   attention_type='mla', q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, n_routed_experts=32,
                   n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1024, first_k_dense_replace=1,
                   scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, aux_loss_alpha=1e-4, seq_aux=True, num_nextn_predict_layers=1)
    c.train.bias_update_rate = 1e-3
    return c


def finish(c, batch: int, seq: int):
    """Common settings: bf16 compute, remat, batch; --shrink makes everything tiny."""
    c.model.update(dtype='bfloat16', remat_policy=_REMAT.value, attention_impl=_ATTENTION.value)
    c.data.update(batch_size=batch, seq_len=seq)
    if _SHRINK.value:
        presets.smoke(c)
        c.data.update(batch_size=2, seq_len=32)
    return c


def measured_peak(size: int, repeats: int = 10) -> float:
    return flops.measured_matmul_peak('bfloat16', size=size, repeats=repeats)


def run_model(c, steps: int) -> dict:
    cfg = config_lib.freeze_model(c.model)
    b, length = c.data.batch_size, c.data.seq_len
    start = time.perf_counter()
    ours = ts.build_ours(c, ts.random_batch(cfg, b, length))
    ours.run(1)
    compile_s = time.perf_counter() - start
    first_loss = float(ours.metrics['loss'])
    times = [ours.run(1) for _ in range(steps)]
    sec = statistics.median(times)
    memory = ours.compiled.memory_analysis()
    peak_mem = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes) if memory is not None else float('nan')
    n_params = sum(x.size for x in jax.tree.leaves(ours.state.params))
    return _row(cfg, b, length, sec, n_params, compile_s, peak_mem, first_loss)


def run_torch(c, steps: int) -> dict:
    import torch
    cfg = config_lib.freeze_model(c.model)
    b, length = c.data.batch_size, c.data.seq_len
    device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    start = time.perf_counter()
    runner = ts.Torch(c, ts.random_batch(cfg, b, length), device=device)
    runner.run(1)
    compile_s = time.perf_counter() - start
    loss = float(runner.loss)
    times = [runner.run(1) for _ in range(steps)]
    sec = statistics.median(times)
    mem = torch.cuda.max_memory_allocated() if device == 'cuda' else float('nan')
    n_params = sum(p.numel() for p in runner.model.parameters())
    del runner
    if device == 'cuda':
        torch.cuda.empty_cache()
    return _row(cfg, b, length, sec, n_params, compile_s, mem, loss)


def _row(cfg, b: int, length: int, sec: float, n_params: int, compile_s: float, mem: float, loss: float) -> dict:
    return dict(sec=sec, tokens_per_s=b * length / sec, flop=flops.train_flops_per_token(cfg, length) * b * length,
                params=n_params, activated=flops.activated_matmul_params(cfg, include_mtp=False),
                compile_s=compile_s, mem=mem, loss=loss)


def _count(n: float) -> str:
    return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def main(argv):
    del argv
    device = jax.devices()[0]
    batch, seq = _BATCH.value, _SEQ.value
    peak = measured_peak(512 if _SHRINK.value else 8192)
    nominal = NOMINAL_BF16.get(device.device_kind)
    print(f'{device.platform} {device.device_kind}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s', flush=True)
    rows = []
    runs = [('dense ~1B', dense_1b(), None)] + [(f'MoE ~1B active ({d})', moe_1b_active(), d) for d in _DISPATCH.value]
    if _TORCH.value:
        import torch
        runs.insert(0, (f'dense ~1B, HF transformers (torch {torch.__version__})', dense_1b(), 'torch'))
    for label, c, dispatch in runs:
        c = finish(c, batch, seq)
        if dispatch not in (None, 'torch'):
            c.model.moe_dispatch = dispatch
            c.model.capacity_factor = 1.25 if dispatch == 'capacity' else 0.0
        try:
            r = (run_torch if dispatch == 'torch' else run_model)(c, _STEPS.value)
        except Exception as e:  # noqa: BLE001  (one strategy failing, e.g. out of memory, keeps the rest)
            print(f'{label}: failed: {type(e).__name__}: {str(e)[:300]}', flush=True)
            rows.append((label, None))
            continue
        r['mfu'] = r['flop'] / r['sec'] / peak
        r['mfu_nominal'] = r['flop'] / r['sec'] / nominal if nominal else float('nan')
        rows.append((label, r))
        print(label, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        write_table(rows, device, peak, nominal, batch, seq)


def write_table(rows, device, peak, nominal, batch, seq):
    lines = [
        f'{device.platform} `{device.device_kind}`, jax {jax.__version__}; bf16 compute, float32 params and AdamW, '
        f'remat {_REMAT.value}, attention_impl {_ATTENTION.value} (the torch row: float32 weights and AdamW under '
        f'bf16 autocast, no remat); '
        f'batch {batch if not _SHRINK.value else 2} x {seq if not _SHRINK.value else 32} '
        f'tokens{" (--shrink: tiny models, a check of the script, not a measurement)" if _SHRINK.value else ""}; '
        f'median of {_STEPS.value} steps. Measured bf16 matmul peak {peak / 1e12:.2f} TFLOP/s'
        + (f', nominal {nominal / 1e12:.0f}' if nominal else ', nominal unknown for this device') + '.',
        '',
        '| model | params | activated / token | step ms | tokens/s | MFU (measured peak) | MFU (nominal) '
        '| peak memory (jax: compiled; torch: allocated) | compile s | first-step loss |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for label, r in rows:
        if r is None:
            lines.append(f'| {label} | failed (see the log) | | | | | | | | |')
            continue
        nominal_mfu = f"{r['mfu_nominal']:.1%}" if nominal else 'n/a'
        lines.append(f"| {label} | {_count(r['params'])} | {_count(r['activated'])} | {r['sec'] * 1e3:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {nominal_mfu} | {r['mem'] / 2 ** 30:.2f} GiB "
                     f"| {r['compile_s']:.0f} | {r['loss']:.4f} |")
    table = '\n'.join(lines)
    print('\n' + table, flush=True)
    out = pathlib.Path(_OUT.value or RESULTS / ('device_shrink.md' if _SHRINK.value else 'device.md'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text('# Accelerator MFU\n\n' + table + '\n')


if __name__ == '__main__':
    app.run(main)
