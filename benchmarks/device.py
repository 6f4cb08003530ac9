"""One accelerator, one run: training MFU of a ~1B dense model and a V3-style MoE (~1B activated) side by
side with HF transformers, the MoE step's time by op category, routed-expert scaling, V2-Lite-sized
decoding against HF generate, speculative == greedy at default precision, and MLA attention kernels.

Run: `bash benchmarks/device.sh` (installs what the GPU image lacks, then calls this), or directly
`python benchmarks/device.py [--parts=train,profile,...] [--shrink]`. Writes results/device.md
(device_shrink.md with --shrink: tiny models, a check of the script on the CPU, ~25 minutes on 2 busy
cores), keeping the sections of parts a run leaves out, so runs of different --parts add up.
Hardware: one H200. All six parts take ~12.5 minutes (NEEDS); --budget_s (570 s) skips a part that
would start past it, so a 10-minute session runs `--parts=train,profile,scaling` (~6 min) and
`--parts=decode,speculative,attention` (~7 min) as two commands.
Expect: the Done-when numbers of issue 20 (MoE >= 35% nominal MFU and >= 1.3x HF; dense >= 45% and
>= 1.3x HF; 16 -> 128 experts <= 1.2x step time; speculative == greedy; the V2-Lite decode table).
Variants: --dispatch=auto,capacity,grouped,ragged (MoE rows), --attention_impl, --remat, --batch/--seq.

Parts, in the order they run (PARTS), each one function writing its section, rewritten after every row
so a run cut short keeps what it measured:
- train: the loop's training step (benchmarks/harness.py: forward, losses, backward, clipping, AdamW,
  bias update; float32 params and moments, bf16 compute) on random tokens, STEPS steps after a compile,
  median. MFU = model FLOPs (dsjax.model.flops: activated experts only, causal attention, MTP included
  for dsjax) / step time / peak, both the measured bf16 matmul peak and the nominal one. HF rows
  (torch, float32 weights and AdamW under bf16 autocast; LlamaForCausalLM and DeepseekV3ForCausalLM,
  which has no MTP) run first, before jax holds memory.
- profile: the MoE step (first --dispatch) under jax.profiler, kernel time summed by category.
- scaling: the MoE at 4 layers with 16 and 128 routed experts (top-4, width 1024: same activated work).
- decode: benchmarks/decode.py's comparison at V2-Lite size (random weights, bf16).
- speculative: MTP speculative decoding against plain greedy at default and at highest precision.
- attention: one MLA layer's attention core (qk 192, v 128), forward + backward, per kernel.
- fp8 (not in the default list: `bash benchmarks/device.sh --parts=fp8`, ~4 minutes by estimate, not yet run
  on a GPU; --shrink checked end to end on the CPU): fp8_dot's kernel path (dsjax/model/fp8.py, tokamax) against its float32 reference on the device,
  then the MoE's training step with model.fp8 off and on per --dispatch: step time and compiled peak memory.
"""
import dataclasses
import pathlib
import re
import statistics
import tempfile
import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import presets
from dsjax.model import attention, flops
from dsjax.model import fp8 as fp8_lib

import decode as decode_bench  # benchmarks/decode.py, beside this file
import harness as ts  # benchmarks/harness.py, beside this file

RESULTS = pathlib.Path(__file__).parent / 'results'
EXPERIMENTS = pathlib.Path(__file__).parents[1] / 'experiments'
# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, by jax's device_kind.
NOMINAL_BF16 = {'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12,
                'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA A100-SXM4-40GB': 312e12, 'NVIDIA GH200 480GB': 989e12}

_PARTS = flags.DEFINE_list('parts', ['train', 'profile', 'scaling', 'decode', 'speculative', 'attention'],
                           'Measurements to run, in this order.')
_SHRINK = flags.DEFINE_bool('shrink', False, 'Tiny models and batches (checks the script on CPU).')
_DISPATCH = flags.DEFINE_list('dispatch', ['auto', 'capacity'], "MoE dispatch strategies of the train part ('auto': "
                              "this backend's dropless choice; 'capacity' with factor 1.25).")
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per training step.')
_SEQ = flags.DEFINE_integer('seq', 2048, 'Tokens per sequence.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per training row.')
_REMAT = flags.DEFINE_string('remat', 'save_dots', 'model.remat_policy for the training rows.')
_ATTENTION = flags.DEFINE_string('attention_impl', 'auto', 'model.attention_impl for the training rows.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also run the HF transformers (PyTorch) rows.')
_BUDGET = flags.DEFINE_integer('budget_s', 570, 'Seconds for all parts; a part past its share is skipped.')
_OUT = flags.DEFINE_string('out', '', 'Where to write (default results/device.md, device_shrink.md with --shrink).')
_PEAK = flags.DEFINE_float('peak', 0.0, 'The measured bf16 matmul FLOP/s (a run of several parts passes it to each).')

# Seconds a part needs at full size on an H200 (estimates): it starts only if that much budget is left.
NEEDS = {'train': 200, 'profile': 70, 'scaling': 80, 'decode': 240, 'speculative': 120, 'attention': 40, 'fp8': 240}


# ---------------------------------------------------------------- the models

def dense_1b():
    """DeepSeek-LLM-style dense: 20 layers, d=2048, SwiGLU 5504, 16 heads, vocab 32000 (~1.1B params)."""
    c = config_lib.base_config()
    c.model.update(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=20,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    return c


def moe_1b_active(experts: int = 32, layers: int = 22):
    """V3-style: MLA, 1 dense + 21 MoE layers of 1 shared + 32 routed experts (top-4, width 1024), sigmoid
    group-limited routing with the bias, one MTP depth; ~1.0B activated parameters, ~5B in all."""
    c = config_lib.base_config()
    c.model.update(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                   attention_type='mla', q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, n_routed_experts=experts,
                   n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1024, first_k_dense_replace=1,
                   scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2, norm_topk_prob=True,
                   routed_scaling_factor=2.5, aux_loss_alpha=1e-4, seq_aux=True, num_nextn_predict_layers=1)
    c.train.bias_update_rate = 1e-3
    return c


def batch_shape() -> tuple[int, int]:
    """(sequences, tokens per sequence) of a training step: --batch x --seq, 2 x 32 with --shrink."""
    return (2, 32) if _SHRINK.value else (_BATCH.value, _SEQ.value)


def finish(c, dispatch: str = 'auto'):
    """Common settings: bf16 compute, remat, batch, the MoE dispatch; --shrink makes everything tiny."""
    c.model.update(dtype='bfloat16', remat_policy=_REMAT.value, attention_impl=_ATTENTION.value)
    if c.model.n_routed_experts:
        c.model.update(moe_dispatch=dispatch, capacity_factor=1.25 if dispatch == 'capacity' else 0.0)
    if _SHRINK.value:
        presets.smoke(c)
    c.data.batch_size, c.data.seq_len = batch_shape()
    return c


# ---------------------------------------------------------------- helpers

def writer(path: pathlib.Path):
    """write(lines): the part's markdown section, rewritten after every row, so a run cut short keeps it."""
    def write(lines: list[str]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('\n'.join(lines) + '\n')
        print('\n'.join(lines), flush=True)
    return write


def _gib(n: float) -> str:
    return f'{n / 2 ** 30:.2f} GiB'


def _count(n: float) -> str:
    return f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.2f}M'


def _median_step(runner, steps: int) -> float:
    return statistics.median(runner.run(1) for _ in range(steps))


# ---------------------------------------------------------------- part: train

def run_ours(c, steps: int) -> dict:
    """One dsjax training row."""
    cfg = config_lib.freeze_model(c.model)
    b, length = c.data.batch_size, c.data.seq_len
    start = time.perf_counter()
    ours = ts.build_ours(c, ts.random_batch(cfg, b, length))
    ours.run(1)
    compile_s = time.perf_counter() - start
    loss = float(ours.metrics['loss'])
    sec = _median_step(ours, steps)
    memory = ours.compiled.memory_analysis()
    mem = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
           + memory.temp_size_in_bytes) if memory is not None else float('nan')
    n_params = sum(x.size for x in jax.tree.leaves(ours.state.params))
    return _row(cfg, b, length, sec, n_params, compile_s, mem, loss)


def run_torch(c, steps: int) -> dict:
    """One HF transformers row on the device (MTP dropped: transformers has none). Out of memory, it halves
    the batch once; if HF's default experts kernel (grouped_mm) fails, it falls back to 'eager'."""
    import torch
    c.model.num_nextn_predict_layers = 0
    cfg = config_lib.freeze_model(c.model)
    device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    b, length = c.data.batch_size, c.data.seq_len
    tries = [(b, None), (b // 2, None)] + ([(b, 'eager'), (b // 2, 'eager')] if cfg.n_routed_experts else [])
    for batch, experts in tries:
        try:
            start = time.perf_counter()
            runner = ts.Torch(c, ts.random_batch(cfg, batch, length), experts_implementation=experts, device=device)
            runner.run(1)
            break
        except Exception as e:  # noqa: BLE001
            print(f'HF row at batch {batch}, experts {experts or "default"}: {type(e).__name__}: {str(e)[:200]}')
            runner = None
            if device == 'cuda':
                torch.cuda.empty_cache()
            if (batch, experts) == tries[-1]:
                raise
    compile_s = time.perf_counter() - start
    loss = float(runner.loss)
    sec = _median_step(runner, steps)
    mem = torch.cuda.max_memory_allocated() if device == 'cuda' else float('nan')
    n_params = sum(p.numel() for p in runner.model.parameters())
    row = _row(cfg, batch, length, sec, n_params, compile_s, mem, loss)
    row['note'] = f'experts {runner.experts}, attention {runner.attention}' + (f', batch {batch}' if batch != b else '')
    del runner
    if device == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def _row(cfg, b: int, length: int, sec: float, n_params: int, compile_s: float, mem: float, loss: float) -> dict:
    return dict(sec=sec, tokens_per_s=b * length / sec, flop=flops.train_flops_per_token(cfg, length) * b * length,
                params=n_params, activated=flops.activated_matmul_params(cfg, include_mtp=False),
                compile_s=compile_s, mem=mem, loss=loss)


def part_train(write, ctx: dict):
    """The side-by-side table: HF rows first (PyTorch frees its memory after each; jax keeps what it took)."""
    peak, nominal = ctx['peak'], ctx['nominal']
    runs = []
    if _TORCH.value:
        import torch
        runs += [(f'dense ~1B, HF transformers (torch {torch.__version__})', dense_1b(), 'torch'),
                 ('MoE ~1B active, HF transformers DeepseekV3 (no MTP)', moe_1b_active(), 'torch')]
    runs += [('dense ~1B, dsjax', dense_1b(), None)]
    runs += [(f'MoE ~1B active, dsjax ({d}{" = " + ctx["auto"] if d == "auto" else ""})', moe_1b_active(), d)
             for d in _DISPATCH.value]
    rows = []
    for label, c, dispatch in runs:
        c = finish(c, dispatch if dispatch not in (None, 'torch') else 'auto')
        try:
            if dispatch == 'torch':
                r = run_torch(c, _STEPS.value)
            else:
                r = run_ours(c, _STEPS.value)
        except Exception as e:  # noqa: BLE001  (one row failing, e.g. out of memory, keeps the rest)
            print(f'{label}: failed: {type(e).__name__}: {str(e)[:400]}', flush=True)
            rows.append((label, None, f'{type(e).__name__}: {str(e)[:120]}'))
            write(train_table(rows, peak, nominal))
            continue
        r['mfu'] = r['flop'] / r['sec'] / peak
        r['mfu_nominal'] = r['flop'] / r['sec'] / nominal if nominal else float('nan')
        rows.append((label, r, r.get('note', '')))
        write(train_table(rows, peak, nominal))


def train_table(rows, peak, nominal) -> list[str]:
    lines = ['## Training step, side by side', '',
             f'bf16 compute, float32 params and AdamW, remat {_REMAT.value}, attention_impl {_ATTENTION.value} '
             f'(HF rows: float32 weights and AdamW under bf16 autocast, no remat); batch '
             f'{" x ".join(map(str, batch_shape()))}; median of {_STEPS.value} steps. MFU against the measured peak '
             f'({peak / 1e12:.1f} TFLOP/s) and the nominal one'
             + (f' ({nominal / 1e12:.0f})' if nominal else ' (unknown here)') + '.', '',
             '| model | params | activated / token | step ms | tokens/s | MFU (measured) | MFU (nominal) '
             '| peak memory | compile s | first loss | note |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for label, r, note in rows:
        if r is None:
            lines.append(f'| {label} | failed | | | | | | | | | {note} |')
            continue
        nominal_mfu = f"{r['mfu_nominal']:.1%}" if nominal else 'n/a'
        lines.append(f"| {label} | {_count(r['params'])} | {_count(r['activated'])} | {r['sec'] * 1e3:.1f} "
                     f"| {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {nominal_mfu} | {_gib(r['mem'])} "
                     f"| {r['compile_s']:.0f} | {r['loss']:.4f} | {note} |")
    ratios = []
    for kind in ('dense', 'MoE'):
        hf = [r for label, r, _ in rows if r and label.startswith(kind) and 'HF' in label]
        ours = [r for label, r, _ in rows if r and label.startswith(kind) and 'dsjax' in label]
        if hf and ours:
            best = max(ours, key=lambda r: r['tokens_per_s'])
            ratios.append(f"{kind}: dsjax / HF = {best['tokens_per_s'] / hf[0]['tokens_per_s']:.2f}x tokens/s")
    return lines + ([''] + ['; '.join(ratios) + ' (best dsjax row).'] if ratios else [])


# ---------------------------------------------------------------- part: profile

# (op_name pattern, category), first match wins; ops inside the gradient carry 'jvp(' (forward) or
# 'transpose(' (backward) in their op_name, the optimizer and the bias update neither.
CATEGORIES = (('/mtp_0', 'MTP module'), ('/attn/', 'attention'), ('/router/', 'router + balance loss'),
              ('/permute/', 'sort / permute'), ('/combine/', 'combine'), ('/shared/', 'shared expert'),
              ('/moe_layers/', 'routed experts'), ('/mlp/', 'dense-layer MLP'), ('norm', 'RMSNorm'))
GEMM = re.compile(r'cublas|gemm|triton|mosaic|tpu_custom_call|ynn_fusion|= \S+ (dot|convolution)\(')


def categorize(hlo_text: str) -> dict:
    """{HLO op name: category} from the compiled HLO's op_name metadata (a fusion without its own takes
    its fused computation's); the routed experts split into their GEMMs (cuBLAS, Triton, Mosaic, dot) and
    the rest (swiglu, weight gathers, casts). Loops and calls are left out: their bodies' ops are timed."""
    computation_op, instructions, current = {}, [], None
    for line in hlo_text.splitlines():
        header = re.match(r'(?:ENTRY )?%([\w.-]+) ', line)
        if header:
            current = header.group(1)
            continue
        m = re.match(r'\s*(?:ROOT )?%([\w.-]+) = (.*)', line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        if op_name:
            computation_op.setdefault(current, op_name.group(1))
        instructions.append((m.group(1), line, op_name and op_name.group(1)))
    out = {}
    for name, line, op_name in instructions:
        if 'body=%' in line or 'branch_computations=' in line or ' call(' in line:
            continue
        called = re.search(r'calls=%([\w.-]+)', line)
        op_name = op_name or (called and computation_op.get(called.group(1)))
        if not op_name:
            continue
        if 'jvp(' not in op_name and 'transpose(' not in op_name:
            out[name] = 'optimizer, bias update, metrics'
            continue
        category = next((c for key, c in CATEGORIES if key in op_name), 'embedding, head + loss, other')
        if category == 'routed experts':
            category = 'expert GEMMs' if GEMM.search(line) else 'expert swiglu, weight gathers, casts'
        out[name] = category
    return out


def part_profile(write, ctx: dict):
    import collections
    c = finish(moe_1b_active(), _DISPATCH.value[0])
    runner = ts.build_ours(c, ts.random_batch(config_lib.freeze_model(c.model), c.data.batch_size, c.data.seq_len))
    runner.run(2)
    n = 3
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            wall = runner.run(n)
        ops, _, _ = ts.op_times(trace_dir)
    category = categorize(runner.compiled.as_text())
    ops = collections.Counter({k: v for k, v in ops.items() if not k.startswith(('while', 'conditional', 'call'))})
    sums = collections.Counter()
    for name, ns in ops.items():
        sums[category.get(name, 'unattributed (no HLO op name)')] += ns
    total = sum(ops.values()) / n / 1e6
    lines = ['## Where the MoE training step spends its time', '',
             f'MoE ~1B active, dispatch {_DISPATCH.value[0]}, {n} profiled steps after warm-up: step '
             f'{wall * 1e3:.0f} ms, '
             f'kernel time {total:.0f} ms per step (jax.profiler; categories from the ops\' jax names, forward and '
             'backward together).', '', '| category | ms per step | share of kernel time |', '|---|---|---|']
    lines += [f'| {k} | {ns / n / 1e6:.1f} | {ns / n / 1e6 / max(total, 1e-9):.0%} |' for k, ns in sums.most_common()]
    lines += ['', '| top ops | ms per step | category |', '|---|---|---|']
    lines += [f'| {k[:60]} | {ns / n / 1e6:.1f} | {category.get(k, "")} |' for k, ns in ops.most_common(12)]
    write(lines)


# ---------------------------------------------------------------- part: scaling

def part_scaling(write, ctx: dict):
    """Step time with 16 and 128 routed experts at fixed top-k and expert width (4 layers, so 128 experts'
    float32 AdamW state fits one device), the default dispatch; rounds alternate between the two."""
    runners, cfgs = {}, {}
    for e in (16, 128):
        c = finish(moe_1b_active(experts=e, layers=4))
        if _SHRINK.value:
            c.model.update(n_routed_experts=e, n_group=4, topk_group=2)
        cfgs[e] = config_lib.freeze_model(c.model)
        runners[e] = ts.build_ours(c, ts.random_batch(cfgs[e], c.data.batch_size, c.data.seq_len))
    sec = ts.side_by_side(runners, repeats=3, steps=max(1, _STEPS.value // 2))
    lines = ['## Routed experts 16 -> 128 at fixed top-k and width', '',
             f'The MoE model cut to {cfgs[16].num_hidden_layers} layers ({cfgs[16].num_moe_layers} MoE), top-'
             f'{cfgs[16].num_experts_per_tok}, expert width {cfgs[16].moe_intermediate_size}, dispatch auto = '
             f'{ctx["auto"]}; median of 3 alternating rounds.', '',
             '| routed experts | params | step ms | vs 16 |', '|---|---|---|---|']
    for e, s in sec.items():
        params = sum(x.size for x in jax.tree.leaves(runners[e].state.params))
        lines.append(f'| {e} | {_count(params)} | {s * 1e3:.1f} | {s / sec[16]:.2f}x |')
    write(lines)


# ---------------------------------------------------------------- part: attention

def part_attention(write, ctx: dict):
    """One MLA layer's attention core (per-head qk 192, v 128; causal, one document per row), forward +
    backward, bf16: the einsum path, cuDNN with MLA's widths, and cuDNN with the values zero-padded to the
    key width (what dsjax did before); outputs and gradients against the einsum path."""
    (b, length), n = batch_shape(), 2 if _SHRINK.value else 16
    qk, v_dim = 192, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k = (jax.random.normal(key, (b, length, n, qk), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (b, length, n, v_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, length, n, v_dim), jnp.bfloat16)
    segments = jnp.ones((b, length), jnp.int32)

    def padded_cudnn(q5, k4, v4, seg, scale, impl):
        out = attention.self_attention(q5, k4, jnp.pad(v4, ((0, 0),) * 3 + ((0, qk - v_dim),)), seg, scale, impl)
        return out[..., :v_dim]

    variants = {'xla (einsums, [L, L] scores)': (attention.self_attention, 'xla'),
                'cudnn, MLA widths (dsjax now)': (attention.self_attention, 'cudnn'),
                'cudnn, values padded 128 -> 192': (padded_cudnn, 'cudnn'),
                'blocked (CPU)': (attention.self_attention, 'blocked')}
    results, grads = {}, {}
    for label, (fn, impl) in variants.items():
        if (impl == 'cudnn') != (jax.default_backend() == 'gpu') and impl != 'xla':
            continue

        def loss(q, k, v, fn=fn, impl=impl):
            out = fn(q[:, :, :, None], k, v, segments, qk ** -0.5, impl)[:, :, :, 0]
            return jnp.sum(out.astype(jnp.float32) * dout)
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        try:
            grads[label] = jax.block_until_ready(step(q, k, v))
            timer = ts.Timed(lambda step=step: step(q, k, v), jax.block_until_ready)
            results[label] = ts.side_by_side({label: timer}, repeats=3, steps=5)[label]
        except Exception as e:  # noqa: BLE001
            results[label] = f'{type(e).__name__}: {str(e)[:100]}'
    ref = grads['xla (einsums, [L, L] scores)']
    lines = ['## MLA attention core, forward + backward', '',
             f'{b} x {length} tokens, {n} heads, qk {qk}, v {v_dim}, bf16, causal; median of 3 rounds of 5 calls; '
             'max |difference| of the loss and the gradients against the einsum path, relative to its largest '
             'gradient.', '', '| kernel | ms per call | vs xla | max rel. difference |', '|---|---|---|---|']
    scale = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in ref[1])
    for label, s in results.items():
        if isinstance(s, str):
            lines.append(f'| {label} | failed: {s} | | |')
            continue
        diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b_.astype(jnp.float32))))
                   for a, b_ in zip(jax.tree.leaves(grads[label][1]), jax.tree.leaves(ref[1])))
        base = results['xla (einsums, [L, L] scores)']
        lines.append(f'| {label} | {s * 1e3:.2f} | {base / s:.2f}x | {diff / scale:.1e} |')
    write(lines)


# ---------------------------------------------------------------- parts: decode, speculative

def v2_lite():
    """experiments/v2_lite.py's model in bf16 with random weights; the dispatch this backend picks."""
    c = presets.load_experiment(str(EXPERIMENTS / 'v2_lite.py'), 'v2_lite')
    c.model.update(dtype='bfloat16', param_dtype='bfloat16', moe_dispatch='auto', capacity_factor=0.0,
                   remat_policy='none')
    if _SHRINK.value:
        presets.smoke(c)
    return config_lib.freeze_model(c.model)


def part_decode(write, ctx: dict):
    import torch
    cfg = v2_lite()
    batches, prompt, new = ((1, 2), 16, 8) if _SHRINK.value else ((1, 16, 64), 1024, 256)
    device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
    hf = decode_bench.hf_model(cfg, None, device)  # its own random weights: only speeds are compared
    rows = decode_bench.compare(cfg, decode_bench.init_variables(cfg), hf, batches, prompt, new, repeats=1,
                                device=device, same_weights=False)
    del hf
    lines = decode_bench.table(cfg, rows, prompt, new, 'random weights (each side its own: tokens differ)')
    write(['## Decoding at V2-Lite size against HF generate', ''] + lines)
    if device == 'cuda':
        torch.cuda.empty_cache()


def part_speculative(write, ctx: dict):
    """The MoE model (cut to 4 layers) drafting for itself with its MTP module (random weights, bf16) against
    plain greedy decoding."""
    c = finish(moe_1b_active(layers=4))
    cfg = dataclasses.replace(config_lib.freeze_model(c.model), remat_policy='none')
    batch, prompt, new = (2, 8, 6) if _SHRINK.value else (8, 256, 64)
    lines = ['## Speculative decoding against plain greedy', '',
             f'The MoE model cut to 4 layers, with its MTP module, random weights, bf16; {batch} rows, '
             f'{prompt}-token prompts, '
             f'{new} new tokens. A divergence is where the two first disagree; its margin is greedy\'s top-1 minus '
             'top-2 logit there (teacher-forced): the guarantee (dsjax/infer/speculative.py) is that the two agree '
             'up to a step whose top two logits lie within the rounding of the matmul precision.', '',
             '| matmul precision | identical rows | tokens before the first divergence | largest margin at a '
             'divergence | drafts accepted |', '|---|---|---|---|---|']
    for precision in ('default', 'highest'):
        with jax.default_matmul_precision(precision):
            r = decode_bench.speculative_check(cfg, batch, prompt, new)
        lines.append(f"| {precision} | {r['identical']} / {batch} | {r['agree']:.0%} | {r['margin']:.3g} "
                     f"| {r['accept']:.0%} |")
        write(lines)


# ---------------------------------------------------------------- part: fp8

def fp8_kernel_check(m: int = 512, k: int = 1024, n: int = 768) -> float:
    """Largest relative difference of fp8_dot's kernel path to its reference on this device (forward, dx, dw
    of an [m, k] @ [k, n] product; float32 in and out, so only the accumulation order differs: ~1e-6
    expected; on the CPU the kernel path is tokamax's XLA fallback)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (m, k))
    w = jax.random.normal(keys[1], (k, n)) * 0.03
    dy = jax.random.normal(keys[2], (m, n))

    # The operands are arguments, not closed-over constants, which XLA would constant-fold (minutes on a CPU).
    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, x, w, dy):
        y, vjp = jax.vjp(lambda a, b: fp8_lib.fp8_dot(a, b, impl), x, w)
        return (y, *vjp(dy))

    ref, got = run('reference', x, w, dy), run('tokamax', x, w, dy)
    return max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got, ref))


def part_fp8(write, ctx: dict):
    """The MoE's training step per --dispatch with model.fp8 off and on (fp8_dot's path for this backend:
    fp8.resolve_impl), after checking that path against the reference."""
    check = fp8_kernel_check()
    lines = ['## FP8 training (model.fp8) against bf16', '',
             f'The MoE ~1B active, bf16 compute, float32 params and AdamW, remat {_REMAT.value}, batch '
             f'{" x ".join(map(str, batch_shape()))}; median of {_STEPS.value} steps. fp8_dot path here: '
             f'{fp8_lib.resolve_impl()}; against its float32 reference (forward, dx, dw of a 512 x 1024 @ 1024 x 768 '
             f'float32 product) the largest relative difference is {check:.2e}.', '',
             '| dispatch | step ms, fp8 off | step ms, fp8 on | on / off | peak memory off | peak memory on '
             '| compile s off / on | first loss off / on |', '|---|---|---|---|---|---|---|---|']
    write(lines)
    for dispatch in _DISPATCH.value:
        pair = {}
        for fp8_on in (False, True):
            c = finish(moe_1b_active(), dispatch)
            c.model.fp8 = fp8_on
            try:
                pair[fp8_on] = run_ours(c, _STEPS.value)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory: keep the other rows)
                print(f'{dispatch} fp8={fp8_on}: failed: {type(e).__name__}: {str(e)[:400]}', flush=True)
                pair[fp8_on] = None
        label = f'{dispatch}{" = " + ctx["auto"] if dispatch == "auto" else ""}'
        off, on = pair[False], pair[True]
        if off is None or on is None:
            lines.append(f'| {label} | failed (see the log) | | | | | | |')
        else:
            lines.append(f"| {label} | {off['sec'] * 1e3:.1f} | {on['sec'] * 1e3:.1f} | {on['sec'] / off['sec']:.2f}x "
                         f"| {_gib(off['mem'])} | {_gib(on['mem'])} | {off['compile_s']:.0f} / {on['compile_s']:.0f} "
                         f"| {off['loss']:.4f} / {on['loss']:.4f} |")
        write(lines)


PARTS = {'train': part_train, 'profile': part_profile, 'scaling': part_scaling, 'decode': part_decode,
         'speculative': part_speculative, 'attention': part_attention, 'fp8': part_fp8}


SECTION = '<!-- part: {} -->'


def run_parts(parts: list[str], out: pathlib.Path, header: list[str], peak: float):
    """Each part in a process of its own (jax and PyTorch keep the device memory they took until their
    process ends), within the budget: a part that would start past it is skipped, one that runs past it is
    stopped with what it wrote so far. `out` keeps the sections of parts this run does not run, so runs
    of different --parts add up to one file."""
    import subprocess
    import sys
    start = time.perf_counter()
    old = re.split(r'<!-- part: (\w+) -->\n', out.read_text()) if out.exists() else ['']
    sections = dict(zip(old[1::2], old[2::2]))
    own = ('--parts', '--out', '--budget_s', '--peak')
    passed = [a for a in sys.argv[1:] if not a.startswith(own)]
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            left = _BUDGET.value - (time.perf_counter() - start)
            section = pathlib.Path(tmp) / f'{part}.md'
            if not _SHRINK.value and left < NEEDS[part]:
                section.write_text(f'## {part}\n\nSkipped: {left:.0f} s of the {_BUDGET.value} s budget left, it needs '
                                   f'about {NEEDS[part]} s. Run `bash benchmarks/device.sh --parts={part}`.\n')
            else:
                try:
                    subprocess.run([sys.executable, __file__, f'--parts={part}', f'--out={section}', f'--peak={peak}',
                                    *passed], timeout=max(left, 1) if not _SHRINK.value else None, check=False)
                except subprocess.TimeoutExpired:
                    with section.open('a') as f:
                        f.write(f'\n(stopped at the {_BUDGET.value} s budget)\n')
                if not section.exists():
                    section.write_text(f'## {part}\n\nFailed before writing anything: see the log.\n')
            sections[part] = section.read_text().rstrip('\n') + '\n\n'
            body = ''.join(SECTION.format(p) + '\n' + sections[p] for p in PARTS if p in sections)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text('\n'.join(header) + '\n\n' + body)
            print(f'[{part}: {time.perf_counter() - start:.0f} s into the run]', flush=True)


def main(argv):
    del argv
    unknown = [p for p in _PARTS.value if p not in PARTS]
    if unknown:
        raise app.UsageError(f'--parts: unknown {unknown}; valid: {list(PARTS)}')
    device = jax.devices()[0]
    size = 512 if _SHRINK.value else 8192
    peak = _PEAK.value or flops.measured_matmul_peak('bfloat16', size=size, repeats=10)
    nominal = NOMINAL_BF16.get(device.device_kind)
    from dsjax.model import moe
    out = pathlib.Path(_OUT.value or RESULTS / ('device_shrink.md' if _SHRINK.value else 'device.md'))
    if len(_PARTS.value) > 1 or not _PEAK.value:
        header = ['# Accelerator benchmarks (benchmarks/device.py)', '',
                  f'{device.platform} `{device.device_kind}`, jax {jax.__version__}; measured bf16 matmul peak '
                  f'{peak / 1e12:.1f} TFLOP/s ({size}^3 jnp.dot, best of 10)'
                  + (f', nominal {nominal / 1e12:.0f}' if nominal else '') + '.'
                  + (' --shrink: tiny models, a check of the script, not a measurement.' if _SHRINK.value else '')]
        return run_parts(_PARTS.value, out, header, peak)
    ctx = dict(peak=peak, nominal=nominal, auto=moe.resolve_dispatch('auto', 0.0))
    PARTS[_PARTS.value[0]](writer(out), ctx)


if __name__ == '__main__':
    app.run(main)
