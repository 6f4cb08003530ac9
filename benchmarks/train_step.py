"""Train-step throughput and MFU: dsjax against HF transformers (PyTorch) on the same weights and batch.

Run: `python benchmarks/train_step.py` (about 10 minutes on 2 idle CPU cores); prints a markdown table and
writes it to benchmarks/results/train_step.md. `--shapes=llm_small` runs one shape; `--override
model.remat_policy=full` (repeatable) changes both configs before anything is built.

What runs: one full training step of the experiment's model at its batch (llm_small 16 x 256, v3_small
8 x 256 tokens): forward, loss, backward, global-norm clipping and AdamW (optim.* of the config), with
random tokens. dsjax runs `make_train_step` jitted with state donation, exactly as the loop does; HF runs
LlamaForCausalLM / DeepseekV3ForCausalLM holding the same weights (`hf_mapping.hf_from_params`),
cross-entropy on the same targets, `loss.backward()`, `clip_grad_norm_` and `torch.optim.AdamW` with the
same hyper-parameters, in the same compute dtype, with torch.set_num_threads = the cores XLA uses.
HF has no MTP module and no balance loss, so the side-by-side v3_small rows run without MTP on both
sides (the routing bias update and the sequence-wise loss are ours alone: under 1% of the FLOPs), once
with the experiment's dispatch (capacity, factor 2) and once dropless (moe_dispatch='auto', i.e.
grouped on CPU); a last dsjax row runs the full v3_small (MTP on) alone.

Timing: REPEATS rounds alternate dsjax and torch, STEPS steps each (after a warm-up that compiles),
and the table gives the median step time of each side, so the 2 shared cores' noise hits both sides
alike. MFU = FLOPs of the step (dsjax.model.flops: matmuls of the activated weights, causal attention,
MTP and the head; x3 for forward + backward) / step time / this machine's matmul peak: a 2048^3 `jnp.dot`
in the compute dtype timed as a third runner in the same rounds. (XLA's own cost analysis is no check of
the FLOP model here: it counts a scanned layer stack's body once; tests/model/test_flops.py holds hand counts.)
"""
import os
import pathlib
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from dsjax import config as config_lib
from dsjax import presets
from dsjax.model import flops

from harness import EXPERIMENTS, Torch, build_ours, random_batch, side_by_side  # benchmarks/harness.py

RESULTS = pathlib.Path(__file__).parent / 'results' / 'train_step.md'

_SHAPES = flags.DEFINE_list('shapes', ['llm_small', 'v3_small'], 'Experiment files whose model and batch to run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Alternating rounds (dsjax, torch) whose median is reported.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per round.')
_TORCH = flags.DEFINE_bool('torch', True, 'Run the HF transformers side.')
_OVERRIDE = flags.DEFINE_multi_string('override', [], 'section.field=value applied to every config.')
_OUT = flags.DEFINE_string('out', str(RESULTS), 'Where to write the markdown table ("" = do not write).')


def xla_threads() -> int:
    """Threads XLA's CPU client runs matmuls on: one per core it may use."""
    return len(os.sched_getaffinity(0))


def experiment(name: str, mtp: bool = True):
    """The experiment's config with --override applied (and MTP off unless `mtp`)."""
    c = presets.load_experiment(str(EXPERIMENTS / f'{name}.py'), name)
    for item in _OVERRIDE.value:
        key, value = item.split('=', 1)
        section, field = key.split('.', 1)
        c[section][field] = type(c[section][field])(value) if not isinstance(c[section][field], bool) \
            else value.lower() in ('1', 'true')
    if not mtp:
        c.model.num_nextn_predict_layers = 0
    return c


class Peak:
    """A large matmul in the compute dtype, timed in the same rounds as the steps: MFU's denominator
    then sees the same load as its numerator."""

    def __init__(self, dtype: str, size: int = 2048):
        a = jnp.ones((size, size), dtype)
        self.matmul, self.a, self.flop = jax.jit(lambda x: x @ x), a, 2 * size ** 3

    def run(self, n: int) -> float:
        best = float('inf')
        for _ in range(max(n, 3)):
            start = time.perf_counter()
            self.matmul(self.a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return best


def describe(cfg) -> str:
    attn = (f'MLA q{cfg.q_lora_rank}/kv{cfg.kv_lora_rank}' if cfg.attention_type == 'mla'
            else f'MHA {cfg.num_attention_heads} heads')
    ffn = (f'{cfg.num_dense_layers} dense + {cfg.num_moe_layers} MoE layers ({cfg.n_routed_experts} experts '
           f'top-{cfg.num_experts_per_tok}, {cfg.moe_dispatch})' if cfg.n_routed_experts
           else f'{cfg.num_hidden_layers} layers')
    return f'd={cfg.hidden_size}, {ffn}, {attn}, vocab {cfg.vocab_size}'


def main(argv):
    del argv
    threads = xla_threads()
    rows = []
    first = experiment(_SHAPES.value[0])
    dtype = first.model.dtype
    peak_runner = Peak(dtype)
    if _TORCH.value:
        import torch
        torch.set_num_threads(threads)
    for name in _SHAPES.value:
        variants = [(name, True, {})]
        if experiment(name).model.n_routed_experts:
            # The experiment's dispatch, then the dropless default ('auto' -> grouped on CPU).
            dropless = dict(moe_dispatch='auto', capacity_factor=0.0)
            variants = [(name + ' (no MTP)', False, {}), (name + ' (no MTP, dropless auto)', False, dropless),
                        (name, True, {})]
        for label, mtp, fields in variants:
            c = experiment(name, mtp=mtp)
            c.model.update(**fields)
            cfg = config_lib.freeze_model(c.model)
            b, length = c.data.batch_size, c.data.seq_len
            host_batch = random_batch(cfg, b, length)
            runners = {'peak': peak_runner, 'ours': build_ours(c, host_batch)}
            torch_side = _TORCH.value and not cfg.num_nextn_predict_layers
            if torch_side:
                runners['torch'] = Torch(c, host_batch)
            sec = side_by_side(runners, _REPEATS.value, _STEPS.value)
            peak = peak_runner.flop / sec['peak']
            flop = flops.train_flops_per_token(cfg, length) * b * length
            row = dict(label=label, desc=describe(cfg), tokens=b * length, ours=b * length / sec['ours'],
                       mfu=flop / sec['ours'] / peak, flop=flop, ms=sec['ours'] * 1e3, peak=peak)
            if torch_side:
                t = runners['torch']
                row.update(torch=b * length / sec['torch'], torch_ms=sec['torch'] * 1e3,
                           torch_mfu=flop / sec['torch'] / peak, impl=f'attn={t.attention}'
                           + (f', experts={t.experts}' if cfg.n_routed_experts else ''))
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del runners

    write_table(rows, dtype, threads, ' / '.join(f'{x:.1f}' for x in os.getloadavg()))


def write_table(rows: list[dict], dtype: str, threads: int, load: str, out: str | None = None) -> None:
    """The markdown table of `rows` (as main prints them), printed and written to --out."""
    import transformers
    peaks = [r['peak'] for r in rows]
    torch_version = __import__('torch').__version__ if _TORCH.value else 'n/a'
    over = f'; overrides {", ".join(_OVERRIDE.value)}' if _OVERRIDE.value else ''
    lines = [
        f'One training step (forward, loss, backward, clip, AdamW) at the experiment\'s batch; compute dtype {dtype}; '
        f'median of {_REPEATS.value} alternating rounds of {_STEPS.value} steps. Peak = a {dtype} 2048^3 jnp.dot timed '
        f'in the same rounds (best of 3 per round, median of rounds): {" / ".join(f"{p / 1e9:.0f}" for p in peaks)} '
        f'GFLOP/s for the rows below. jax {jax.__version__} ({threads} threads), torch '
        f'{torch_version} (set_num_threads({threads})), transformers {transformers.__version__}; load average '
        f'{load} (1/5/15 min) on {os.cpu_count()} cores{over}.',
        '',
        '| shape | model | tokens/step | dsjax tok/s | torch tok/s | dsjax / torch | dsjax MFU | torch MFU '
        '| GFLOP/step (model) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        t = (f"{r['torch']:.0f} | {r['ours'] / r['torch']:.2f}x" if 'torch' in r else 'n/a | n/a')
        tm = f"{r['torch_mfu']:.0%}" if 'torch' in r else 'n/a'
        lines.append(f"| {r['label']} | {r['desc']} | {r['tokens']} | {r['ours']:.0f} | {t} | {r['mfu']:.0%} | {tm} "
                     f"| {r['flop'] / 1e9:.1f} |")
    impls = '; '.join(f"{r['label']}: {r['impl']}" for r in rows if 'impl' in r)
    if impls:
        lines += ['', f'HF implementations picked by transformers\' defaults: {impls}.']
    table = '\n'.join(lines)
    print('\n' + table)
    out = _OUT.value if out is None else out
    if out:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text('# Train-step benchmark\n\n' + table + '\n')


if __name__ == '__main__':
    app.run(main)
