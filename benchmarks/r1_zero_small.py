"""R1-Zero at laptop scale: the held-out table and the reward curve of an r1_zero_small run.

    python -m dsjax.main --config=experiments/r1_zero_small.py --workdir=runs/r1_zero_small
    python benchmarks/r1_zero_small.py --workdir=runs/r1_zero_small [--seed_runs=DIR1,DIR2]

Reads the GRPO stage's metrics (WORKDIR/grpo) and writes r1_zero_small.md (held-out accuracy and
format rate before and after GRPO, completion length, GRPO wall time) and
r1_zero_small_reward.png (rewards, accuracy and format rate per step with the held-out points,
completion length, KL and entropy) into benchmarks/results/. With --samples=k (default 4; 0 skips it)
it also evaluates the base and the GRPO checkpoints by the R1 paper's protocol: k completions per
held-out problem at T=0.6, top-p 0.95, accuracy averaged over them (pass@1), and pass@k. --seed_runs
names GRPO runs of other seeds from the same base (`--config=experiments/r1_zero_small.py:grpo
--config.init.checkpoint=WORKDIR/base --config.train.seed=S --workdir=DIR`): a table of every seed's held-out
accuracy per evaluation and the gain's mean and spread.
"""
import json
import pathlib
import statistics

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

import ml_collections  # noqa: E402

from dsjax import report  # noqa: E402
from dsjax.posttrain import chain  # noqa: E402
from dsjax.train import logger  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/r1_zero_small', 'The chain run (holding base/ and grpo/).')
_SEED_RUNS = flags.DEFINE_list('seed_runs', [], 'GRPO runs of other seeds from the same base (workdirs).')
_SAMPLES = flags.DEFINE_integer('samples', 4, 'Completions per problem for the R1-protocol pass@1 (0: skip).')
RESULTS = pathlib.Path(__file__).parent / 'results'


def wall_minutes(workdir: pathlib.Path) -> float:
    """Minutes from the stage's config write to its last metrics write."""
    return ((workdir / logger.METRICS_FILE).stat().st_mtime - (workdir / 'config.json').stat().st_mtime) / 60


def r1_protocol(stage_dir: pathlib.Path, g: dict, k: int) -> dict:
    """The checkpoint in `stage_dir` on the GRPO stage's held-out problems, k samples at T=0.6, top-p 0.95."""
    e = ml_collections.ConfigDict(dict(tasks=g['tasks'], problems=g['eval_problems'], template=g['template'],
                                       max_new_tokens=g['max_completion_length'], val_loss=False))
    return chain.evaluate_run(stage_dir, e, samples=k, temperature=0.6, top_p=0.95)


def seeds_table(runs: list[tuple[int, list[dict]]]) -> list[str]:
    """Held-out accuracy of each GRPO run (seed, its metrics) per evaluation, the gain at the last one over
    the base (step 0) and the gain's mean, sample standard deviation, min and max."""
    steps = [r['step'] for r in runs[0][1] if 'eval_accuracy' in r]
    lines = [f"| GRPO seed | {' | '.join(f'step {s}' for s in steps)} | gain (points) | format at {steps[-1]} |",
             '|' + '---|' * (len(steps) + 3)]
    gains = []
    for seed, records in runs:
        evals = {r['step']: r for r in records if 'eval_accuracy' in r}
        if sorted(evals) != steps:
            raise ValueError(f'seed {seed}: evaluations at steps {sorted(evals)}, not {steps} like seed {runs[0][0]}')
        gains.append(100 * (evals[steps[-1]]['eval_accuracy'] - evals[0]['eval_accuracy']))
        accuracies = ' | '.join(f"{evals[s]['eval_accuracy']:.1%}" for s in steps)
        lines.append(f"| {seed} | {accuracies} "
                     f"| {gains[-1]:+.1f} | {evals[steps[-1]]['eval_format_rate']:.0%} |")
    spread = f', std {statistics.stdev(gains):.1f}' if len(gains) > 1 else ''
    return lines + ['', f'Gain at step {steps[-1]}: {statistics.mean(gains):+.1f} points mean over {len(gains)} '
                        f'seeds{spread}, min {min(gains):+.1f}, max {max(gains):+.1f}.']


def main(argv):
    del argv
    root = pathlib.Path(_WORKDIR.value)
    records = logger.read_metrics(root / 'grpo')
    evals = [r for r in records if 'eval_accuracy' in r]
    before, after = evals[0], evals[-1]
    config = json.loads((root / 'grpo' / 'config.json').read_text())
    g = config['grpo']
    lines = [
        '# r1_zero_small: GRPO from a small worksheet-pretrained base (R1-Zero template, accuracy + format rewards)',
        '',
        f"{g['eval_problems']} held-out (test-split) problems per task of {', '.join(g['tasks'])}, greedy decoding, "
        f"at most {g['max_completion_length']} new tokens. GRPO: {before['step']} -> {after['step']} steps of "
        f"{g['batch_size'] // g['num_generations']} prompts x G={g['num_generations']}, T={g['temperature']}, "
        f"beta={g['beta']}, lr={config['optim']['lr']}, {g['loss_type']}.",
        '',
        '| | accuracy | accuracy of the first answer | format rate | completion tokens |',
        '|---|---|---|---|---|',
        *[f"| {name} (GRPO step {r['step']}) | {r['eval_accuracy']:.1%} | {r['eval_first_answer_accuracy']:.1%} | "
          f"{r['eval_format_rate']:.1%} | {r['eval_completion_len']:.1f} |"
          for name, r in (('base', before), ('after GRPO', after))],
        '',
        'Accuracy grades the last <answer> of a completion; the first-answer column grades the text up to its first '
        '</answer>, the credit a model that does not stop after its answer would get for it.',
        '',
        f"GRPO wall time: {wall_minutes(root / 'grpo'):.1f} min (evaluations included).",
    ]
    if _SEED_RUNS.value:
        runs = [(config['train']['seed'], records)]
        for d in _SEED_RUNS.value:
            runs.append((json.loads((pathlib.Path(d) / 'config.json').read_text())['train']['seed'],
                         logger.read_metrics(d)))
        lines += ['', f'## {len(runs)} GRPO seeds from the same base', '',
                  'Held-out accuracy, greedy (the first row is the run above):', '', *seeds_table(runs)]
    k = _SAMPLES.value
    if k:
        lines += ['', f'The R1 paper\'s protocol on the same problems: {k} completions each at T=0.6, top-p 0.95.', '',
                  f'| | pass@1 (mean of {k}) | pass@{k} | first answer | format rate |', '|---|---|---|---|---|']
        for name, stage in (('base', 'base'), ('after GRPO', 'grpo')):
            r = r1_protocol(root / stage, g, k)
            lines.append(f"| {name} | {r['accuracy']:.1%} | {r[f'pass_at_{k}']:.1%} | "
                         f"{r['first_answer_accuracy']:.1%} | {r['format_rate']:.1%} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / 'r1_zero_small.md').write_text('\n'.join(lines) + '\n')

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = [
        ('reward (training rollouts)', [('reward', 'total'), ('reward_accuracy', 'accuracy'),
                                        ('reward_format', 'format'), ('eval_accuracy', 'held-out accuracy'),
                                        ('eval_format_rate', 'held-out format rate')]),
        ('completion tokens', [('completion_len_mean', 'mean'), ('completion_len_max', 'max')]),
        ('KL / entropy / groups', [('kl', 'k3 KL'), ('entropy', 'entropy'),
                                   ('zero_advantage_groups', 'zero-advantage groups')]),
    ]
    for ax, (title, keys) in zip(axes, panels):
        for key, label in keys:
            steps, values = report.series(records, key)
            ax.plot(steps, values, 'o-' if key.startswith('eval') else '-', label=label)
        ax.set_title(title)
        ax.set_xlabel('GRPO step')
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / 'r1_zero_small_reward.png', dpi=100)
    print('\n'.join(lines))


if __name__ == '__main__':
    app.run(main)
