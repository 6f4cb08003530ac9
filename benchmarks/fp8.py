"""FP8 training (model.fp8) against the same run without, as DeepSeek-V3 validated it; where the gap comes
from; and the CPU cost.

Run:
  python benchmarks/fp8.py compare OFF ON [LABEL=RUN[,BASE] ...]  # validation-loss table + plot
  python benchmarks/fp8.py errors OFF ON [step]                 # FP8's error on the step's checkpoints
  python benchmarks/fp8.py time [experiment] [rounds]           # train-step time fp8 / off in one process
Hardware: 2 CPU cores; `errors` ~10 minutes on v3_small, `time` a few.
Expect: benchmarks/results/fp8.md (today's tables; `compare` draws benchmarks/results/fp8_val_loss.png).
Variants: `compare`'s LABEL=RUN runs are compared with OFF, or with BASE: 'seed 1=SEED1' (fp8 off,
  another train.seed: what a non-FP8 perturbation does to the curve) and 'seed 1 fp8 on=SEED1_ON,SEED1'.
The runs behind the table (same seed and data; fresh workdirs; a resumed run is read as one timeline):
  python -m dsjax.main --config=experiments/v3_small.py --workdir=OFF
  python -m dsjax.main --config=experiments/v3_small.py --config.model.fp8=True --workdir=ON
  python -m dsjax.main --config=experiments/v3_small.py --config.train.seed=1 --workdir=SEED1 [--config.model.fp8=True]
The BF16 pair: the same with --config.model.dtype=bfloat16, compared in Python as
  compare(BF16, BF16_ON, {'float32': (OFF, BF16)}, png=RESULTS / 'fp8_bf16_val_loss.png', names=('bf16', 'bf16 + fp8'))
"""
import pathlib
import sys

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np

from dsjax import config as config_lib
from dsjax import presets
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import fp8, moe
from dsjax.model.transformer import Transformer
from dsjax.train import checkpoint, logger, losses
from dsjax.train import step as step_lib

RESULTS = pathlib.Path(__file__).parent / 'results'


def curve(workdir, key: str) -> dict[int, float]:
    """step -> `key` ('val_loss', 'loss') of a run."""
    return {r['step']: r[key] for r in logger.read_metrics(workdir) if key in r}


def windowed(train: dict[int, float], window: int) -> dict[int, float]:
    """Mean training loss of steps (s - window, s] for every s a multiple of `window`."""
    return {s: float(np.mean([train[t] for t in range(s - window + 1, s + 1) if t in train]))
            for s in range(window, max(train) + 1, window)}


def compare(off_dir, on_dir, others: dict | None = None, window: int = 50, png=RESULTS / 'fp8_val_loss.png',
            names=('fp8 off', 'fp8 on')):
    """Prints the tables and draws the plot of the runs' validation loss (and training loss averaged over
    `window` steps: every run sees the same batches): fp8 on against off (labelled `names`), and each of
    `others` (label -> workdir, or (workdir, the workdir it is compared with); default: against off).
    Returns the final validation difference of fp8 on."""
    off, on = names
    runs = {off: (off_dir, None), on: (on_dir, off_dir)}
    runs.update({label: (d, off_dir) if isinstance(d, str) else tuple(d) for label, d in (others or {}).items()})
    label_of = {d: label for label, (d, _) in runs.items()}
    fig = Figure(figsize=(11, 4))
    loss_ax, rel_ax = fig.subplots(1, 2)
    colors = dict(zip(runs, ('k', 'tab:red', 'tab:blue', 'tab:purple', 'tab:orange')))
    final = None
    for key, title, marker in (('val_loss', 'validation loss', 'o'), ('loss', f'training loss, mean of {window}', '.')):
        read = (lambda d: curve(d, key)) if key == 'val_loss' else (lambda d: windowed(curve(d, key), window))
        curves = {label: read(d) for label, (d, _) in runs.items()}
        steps = sorted(set.intersection(*(set(c) for c in curves.values())))
        compared = {label: base for label, (_, base) in runs.items() if base}
        rel = {label: {s: curves[label][s] / curves[label_of[base]][s] - 1 for s in steps}
               for label, base in compared.items()}
        print(f'\n| step | {title}: {off} | '
              + ' | '.join(f'{label} | vs {label_of[base]}' for label, base in compared.items())
              + ' |\n|---|---|' + '---|---|' * len(compared))
        for s in steps:
            print(f"| {s} | {curves[off][s]:.4f} | "
                  + ' | '.join(f'{curves[label][s]:.4f} | {rel[label][s]:+.3%}' for label in compared) + ' |')
        for label, c in curves.items():
            loss_ax.plot(steps, [c[s] for s in steps], marker + ('-' if label == off else '--'),
                         color=colors[label], label=f'{title}, {label}')
        for label, base in compared.items():
            rel_ax.plot(steps, [100 * rel[label][s] for s in steps], marker + ('-' if key == 'val_loss' else ':'),
                        color=colors[label], label=f'{label} vs {label_of[base]}: {title}')
        if key == 'val_loss':
            final = rel[on][steps[-1]]
    loss_ax.set(xlabel='step', ylabel='loss', title='v3_small', ylim=(3, 9))
    loss_ax.legend(fontsize=7)
    rel_ax.axhspan(-0.25, 0.25, color='tab:green', alpha=0.15, label="V3's bound: 0.25%")
    rel_ax.axhline(0, color='gray', lw=0.5)
    rel_ax.set(xlabel='step', ylabel='relative difference, %', title='relative difference (run / compared with - 1)')
    rel_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return final


# ---------------------------------------------------------------- where the difference comes from

def _backward(kind: str):
    """fp8's backward with part of the recipe replaced by float32 (a measurement only): 'recipe' (as
    built), 'exact' (no quantisation in the backward: FP8 in the forward product only), 'exact dy' (w and x
    quantised as in the recipe, the activation gradient dy not)."""
    def bwd(layout, impl, res, dy):
        if kind == 'recipe':
            return fp8._fp8_bwd(layout, impl, res, dy)
        x, w, args = res
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        if kind == 'exact':
            w_t, x_rows = f32(w), f32(x)
        else:
            w_t, x_rows = fp8.fake_quantize(w, (-2, -1)), fp8.fake_quantize(x, (-2,))
        dx = fp8._product(layout, f32(dy), jnp.swapaxes(w_t, -1, -2), *args)
        wgrad = jax.linear_transpose(lambda b: fp8._product(layout, x_rows, b, *args),
                                     jax.ShapeDtypeStruct(w.shape, jnp.float32))
        dw, = wgrad(f32(dy))
        return (dx.astype(x.dtype), dw.astype(w.dtype)) + tuple(None for _ in args)
    return bwd


def _relative(a, b) -> str:
    a, b = (jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(t)]) for t in (a, b))
    norm = jnp.linalg.norm
    return f'{float(norm(a - b) / norm(b)):.4f} | {float(a @ b / norm(a) / norm(b)):.5f}'


def errors(off_dir, on_dir, step: int = 200):
    """Prints what FP8 changes at the `step` checkpoints of the two runs (the OFF run's config and data)."""
    saved = {'off': checkpoint.read_run(off_dir, step), 'fp8 on': checkpoint.read_run(on_dir, step)}
    config = saved['off'].config
    tok = tokenizer_lib.get_tokenizer(config.data)

    def model(fp8_on: bool, dtype: str = 'float32'):
        c = config.model.copy_and_resolve_references()
        c.fp8, c.dtype = fp8_on, dtype
        return Transformer(config_lib.freeze_model(c))

    def device(batch):
        return {k: jnp.asarray(v) for k, v in batch.items()}

    def forward(m):
        return jax.jit(lambda v, b: m.apply(v, b['inputs'], b['positions'], b['segment_ids'], b['targets'],
                                            deterministic=True)[0])

    evals = [device(b) for b in pipeline.make_eval_batches(config.data, tok, num_batches=config.train.eval_batches)]
    print(f'\n| weights (step {step}) | validation loss, float32 forward | FP8 forward |\n|---|---|---|')
    for name, run in saved.items():
        row = []
        for fp8_on in (False, True):
            logits = forward(model(fp8_on))
            nll = sum(float((losses.token_nll(logits(run.variables, b), b['targets']) * b['weights']).sum())
                      for b in evals)
            row.append(nll / sum(float(b['weights'].sum()) for b in evals))
        print(f'| run {name} | {row[0]:.5f} | {row[1]:.5f} |')

    # Routing: the share of (token, MoE layer) whose expert set the FP8 forward changes.
    chosen = {}
    select = moe.select_experts

    def recording(scores, bias, cfg):
        weights, idx = select(scores, bias, cfg)
        jax.debug.callback(lambda i: chosen[current].append(np.sort(np.asarray(i), -1)), idx)
        return weights, idx
    moe.select_experts = recording
    for current in (False, True):
        chosen[current], logits = [], forward(model(current))
        jax.block_until_ready([logits(saved['off'].variables, b) for b in evals[:2]])
    moe.select_experts = select
    moved = np.mean([(a != b).any(-1).mean() for a, b in zip(chosen[False], chosen[True])])
    print(f'\nRun off, step {step}: the FP8 forward routes {moved:.2%} of (token, MoE layer) pairs to another '
          'expert set.')

    # Gradients at the OFF run's weights on one training batch, against the float32 one.
    it = pipeline.make_train_iterator(config.data, tok)
    batch, other = device(next(it)), device(next(it))
    params, buffers = saved['off'].variables['params'], {'moe_bias': saved['off'].variables['moe_bias']}

    def grads(m, b):
        return jax.jit(jax.grad(lambda p: step_lib.pretrain_loss(m, p, buffers, b, jax.random.PRNGKey(0),
                                                                 config.train.mtp_loss_weight)[0]))(params)
    ref = grads(model(False), batch)
    print(f'\n| gradient at run off, step {step} | relative L2 difference to float32 | cosine |\n|---|---|---|')
    print(f'| float32, another batch (the batch-to-batch noise) | {_relative(grads(model(False), other), ref)} |')
    print(f'| bfloat16 compute | {_relative(grads(model(False, "bfloat16"), batch), ref)} |')
    records = []
    product = fp8._quantized_product

    def recording_product(layout, impl, x, w, *args):  # Fprop and Dgrad, each against its float32 product
        y = product(layout, impl, x, w, *args)
        exact = fp8._product(layout, x.astype(jnp.float32), w.astype(jnp.float32), *args)[..., :w.shape[-1]]
        jax.debug.callback(lambda e: records.append(float(e)), jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
        return y
    for kind, label in (('recipe', 'FP8, the recipe'), ('exact', 'FP8 forward only (backward float32)'),
                        ('exact dy', 'FP8, activation gradients dy unquantised')):
        fp8._fp8.defvjp(fp8._fp8_fwd, _backward(kind))
        fp8._quantized_product = recording_product if kind == 'recipe' else product
        print(f'| {label} | {_relative(grads(model(True), batch), ref)} |', flush=True)
    fp8._fp8.defvjp(fp8._fp8_fwd, fp8._fp8_bwd)
    fp8._quantized_product = product
    print(f'\nOne FP8 step: {len(records)} Fprop and Dgrad products, relative (Frobenius) error to float32: median '
          f'{np.median(records):.4f}, min {np.min(records):.4f}, max {np.max(records):.4f}.')


def time_steps(experiment: str = 'v3_small', rounds: int = 5) -> dict:
    """Median train-step seconds of `experiment` with fp8 off and on, alternating in one process."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import harness  # noqa: PLC0415  (benchmarks/harness.py, beside this file)
    runners = {}
    for fp8_on in (False, True):
        c = presets.load_experiment(str(harness.EXPERIMENTS / 'x.py'), experiment)
        c.model.fp8 = fp8_on
        c.mesh.data = 1
        cfg = config_lib.freeze_model(c.model)
        runners[fp8_on] = harness.build_ours(c, harness.random_batch(cfg, c.data.batch_size, c.data.seq_len))
    sec = harness.side_by_side(runners, repeats=rounds, steps=2)
    print(f'| {experiment} | {sec[False] * 1e3:.0f} | {sec[True] * 1e3:.0f} | {sec[True] / sec[False]:.2f} |')
    return sec


if __name__ == '__main__':
    command, args = sys.argv[1:2], sys.argv[2:]
    if command == ['compare'] and len(args) >= 2:
        compare(args[0], args[1], {label: tuple(d.split(',')) if ',' in d else d
                                   for label, d in (a.split('=', 1) for a in args[2:])})
    elif command == ['errors'] and len(args) >= 2:
        errors(args[0], args[1], *(int(a) for a in args[2:3]))
    elif command == ['time']:
        time_steps(*(args[:1] or ['v3_small']), *(int(a) for a in args[1:2]))
    else:
        sys.exit(__doc__)
