"""Train-step memory: XLA's compiled memory analysis against params + optimizer state + activations,
remat policies on time and memory, and the largest v3_small-shaped model that trains in 24 GB.

Run: `python benchmarks/memory.py` (about 10 minutes on 2 busy CPU cores; nothing large is allocated:
the sizes come from compiling the step on abstract shapes); prints markdown tables and writes them to
benchmarks/results/memory.md.

- Peak per step = arguments + outputs - aliased (the donated state) + temporaries, from
  `jit(step).lower(...).compile().memory_analysis()` of the same step the loop runs (benchmarks/train_step.py's
  build). The estimate beside it: params (4 B each in float32), AdamW moments (8 B), gradients (4 B), and
  activations = the residuals jax saves for the backward pass (`saved_residuals` of the loss under the
  config's remat policy), counted from their shapes.
- Remat policies none / full / save_dots / save_attention (model.remat_policy): compiled peak and median step time of
  alternating rounds, for both experiment shapes.
- Largest v3_small-shaped model in 24 GB: width multiples of v3_small (hidden, heads, ranks, ffn and expert
  widths scaled together; 32 experts top-4, vocab 4096, batch 8 x 256, float32, AdamW with float32 moments,
  then bfloat16 ones as V3 kept them), each compiled at two depths; the peak is linear in depth (scanned
  layers), so the depth that fits is read off the line.
"""
import os
import pathlib

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals
import flax.linen as nn
import numpy as np

from dsjax import config as config_lib
from dsjax import presets
from dsjax import sharding
from dsjax.model.transformer import Transformer
from dsjax.train import loop, optim
from dsjax.train import step as step_lib

import harness as ts  # benchmarks/harness.py, beside this file

RESULTS = pathlib.Path(__file__).parent / 'results' / 'memory.md'
POLICIES = ('none', 'full', 'save_dots', 'save_attention')
BUDGET = 24 * 2 ** 30
WIDTHS = (2, 8)
ROUNDS = 2
# remat 'full' is what a memory-bound run picks ('none' costs ~2x the memory, table above); AdamW's
# moments in float32, then in bfloat16 as V3 kept them (optim.moment_dtype).
LARGEST_VARIANTS = (('full', 'float32'), ('full', 'bfloat16'))
DEPTHS = (6, 12)
GiB = 2 ** 30


def experiment(name: str, **model):
    c = presets.load_experiment(str(ts.EXPERIMENTS / f'{name}.py'), name)
    c.model.update(**model)
    return c


def scaled_v3(width: int, layers: int, remat: str, moment_dtype: str = 'float32'):
    """v3_small with every width times `width` and `layers` layers (the first dense)."""
    c = experiment('v3_small')
    c.optim.moment_dtype = moment_dtype
    m = c.model
    m.update(hidden_size=256 * width, intermediate_size=688 * width, num_attention_heads=4 * width,
             q_lora_rank=96 * width, kv_lora_rank=64 * width, moe_intermediate_size=128 * width,
             num_hidden_layers=layers, remat_policy=remat)
    return c


def compiled_step(c, compile: bool = True):
    """(compiled train step on abstract shapes or None, abstract state, abstract batch, model)."""
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    cfg = config_lib.freeze_model(c.model)
    model = Transformer(cfg)
    optimizer = optim.make_optimizer(c.optim)
    schedule = optim.make_schedule(c.optim)
    b, length = c.data.batch_size, c.data.seq_len
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((b, length), jnp.float32 if k == 'weights' else jnp.int32, sharding=batch_sharding)
             for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, abstract, shardings = loop.build_state_fns(model, optimizer, mesh, length)
        apply_gradients = step_lib.make_apply_gradients(optimizer, schedule, c.train)
        step = jax.jit(step_lib.make_train_step(model, apply_gradients, c.train),
                       in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=(0,))
        compiled = step.lower(abstract, batch).compile() if compile else None
    return compiled, abstract, batch, model


def peak_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return dict(peak=peak, args=m.argument_size_in_bytes, temp=m.temp_size_in_bytes)


def activation_bytes(model, abstract, batch) -> int:
    """Bytes of the residuals jax saves between forward and backward (remat policy applied)."""
    def loss(params, buffers, batch):
        denominators = step_lib.pretrain_denominators(batch, model.cfg.num_nextn_predict_layers)
        return step_lib.make_pretrain_loss(model, 1.0)(params, buffers, batch, denominators, jax.random.PRNGKey(0))[0]

    plain = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    residuals = saved_residuals(loss, plain(abstract.params), plain(abstract.buffers), plain(batch))
    # Parameters show up as residuals too (matmul inputs); they are counted once, as params.
    return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, why in residuals
               if 'from the argument' not in why)


def estimate(abstract, activations: int) -> dict:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    return dict(params=n, state=n * 4 + n * 8, grads=n * 4, activations=activations,
                total=n * 16 + activations)


def analysis_table() -> list[str]:
    lines = ['## Peak memory per step against the estimate, and remat policies', '',
             'Compiled peak = arguments + outputs - donated + temporaries (XLA memory analysis of the train '
             'step). Estimate = params + AdamW moments (12 B/param) + gradients (4 B/param) + saved activations '
             f'(residuals jax keeps for the backward pass). Time = median step of {ROUNDS} alternating rounds.', '',
             '| shape | remat | params | params + Adam | grads | activations (saved) | estimate | compiled peak '
             '| peak / estimate | step ms |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for name in ('llm_small', 'v3_small'):
        runners, mem = {}, {}
        for policy in POLICIES:
            c = experiment(name, remat_policy=policy)
            cfg = config_lib.freeze_model(c.model)
            runners[policy] = ts.build_ours(c, ts.random_batch(cfg, c.data.batch_size, c.data.seq_len))
            _, abstract, batch, model = compiled_step(c, compile=False)
            mem[policy] = (peak_bytes(runners[policy].compiled),
                           estimate(abstract, activation_bytes(model, abstract, batch)))
        sec = ts.side_by_side(runners, ROUNDS, 1)
        del runners
        for policy in POLICIES:
            p, e = mem[policy]
            lines.append(f"| {name} | {policy} | {e['params'] / 1e6:.2f}M | {e['state'] / 2 ** 20:.0f} MiB "
                         f"| {e['grads'] / 2 ** 20:.0f} MiB | {e['activations'] / 2 ** 20:.0f} MiB "
                         f"| {e['total'] / 2 ** 20:.0f} MiB | {p['peak'] / 2 ** 20:.0f} MiB "
                         f"| {p['peak'] / e['total']:.2f} | {sec[policy] * 1e3:.0f} |")
            print(lines[-1], flush=True)
    return lines + ['']


def largest_table() -> list[str]:
    lines = ['## Largest v3_small-shaped model in 24 GB', '',
             f'Each width compiled at {DEPTHS[0]} and {DEPTHS[1]} layers; peak = a + b x layers (exact for '
             'scanned layers), solved for 24 GiB. Params at that depth include MTP and the 32 experts.', '',
             '| width (x v3_small) | d_model | remat | AdamW moments | peak at 6 / 12 layers | per layer '
             '| layers in 24 GiB | params there | activated / token |',
             '|---|---|---|---|---|---|---|---|---|']
    from dsjax.model import flops
    for width in WIDTHS:
        for remat, moments in LARGEST_VARIANTS:
            peaks, params = [], []
            for layers in DEPTHS:
                compiled, abstract, _, _ = compiled_step(scaled_v3(width, layers, remat, moments))
                peaks.append(peak_bytes(compiled)['peak'])
                params.append(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)))
            per_layer = (peaks[1] - peaks[0]) / (DEPTHS[1] - DEPTHS[0])
            fixed = peaks[0] - per_layer * DEPTHS[0]
            depth = int((BUDGET - fixed) // per_layer)
            per_layer_params = (params[1] - params[0]) / (DEPTHS[1] - DEPTHS[0])
            total = params[0] + per_layer_params * (depth - DEPTHS[0])
            cfg = config_lib.freeze_model(scaled_v3(width, max(depth, 2), remat).model)
            active = flops.activated_matmul_params(cfg, include_mtp=False)
            lines.append(f'| {width} | {256 * width} | {remat} | {moments} '
                         f'| {peaks[0] / GiB:.2f} / {peaks[1] / GiB:.2f} GiB | {per_layer / 2 ** 20:.0f} MiB '
                         f'| {depth} | {total / 1e9:.2f}B | {active / 1e6:.0f}M |')
            print(lines[-1], flush=True)
    return lines + ['']


def main():
    load_before = os.getloadavg()
    lines = [f'jax {jax.__version__}, {jax.devices()[0].platform}; float32 params, AdamW; batch 8 x 256 (v3_small) '
             'and 16 x 256 (llm_small).', '']
    lines += analysis_table()
    lines += largest_table()
    lines.append('Load average (1/5/15 min): ' + ' / '.join(f'{x:.1f}' for x in load_before) + ' at the start, '
                 + ' / '.join(f'{x:.1f}' for x in os.getloadavg()) + ' at the end.')
    table = '\n'.join(lines)
    print('\n' + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text('# Memory benchmark\n\n' + table + '\n')


if __name__ == '__main__':
    main()
