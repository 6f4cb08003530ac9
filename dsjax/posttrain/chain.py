"""What a chain of stages needs besides running them (dsjax/stages.py runs them): references between
stages, and one held-out evaluation of each stage's model, gathered into a table.

References: in a chain, any string field of a stage config may name another stage's directory as
'{name}' (e.g. sft.paths=('{rs}/samples.jsonl',), distill.teacher='{teacher}',
init.checkpoint='{base}'); init.checkpoint='scratch' starts from random weights (an empty one starts
from the previous stage, as before).

Evaluation (a chain config's optional `evaluation` section): for each stage named in
`evaluation.stages`, the stage's final model answers `evaluation.problems` test-split problems per
task entry (greedy, `evaluation.template`), giving accuracy and format rate; with
`evaluation.val_loss` also the cross-entropy of the worked solutions of those problems (assistant
tokens only). Results are cached in <stage>/eval.json (a resumed chain does not redo them) and the
table goes to WORKDIR/table.md and table.json; `evaluation.gap=(low, high)` adds each stage's share of
the accuracy gap between those two stages (e.g. a distilled student's, between the same student
trained alone and its teacher).
"""
import json
import re
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from dsjax.data import tasks
from dsjax.infer import loading
from dsjax.model.transformer import Transformer
from dsjax.posttrain import rollout, sft
from dsjax.train import losses as train_losses

EVAL_FILE = 'eval.json'
SCRATCH = 'scratch'
_REFERENCE = re.compile(r'\{([A-Za-z0-9_]+)\}')


def resolve_references(stage_cfg, dirs: dict) -> None:
    """Replaces '{name}' in every string field of `stage_cfg` (in place) by stage `name`'s directory;
    an unknown name raises ValueError naming the field."""

    def resolve(value, field):
        def sub(match):
            if match.group(1) not in dirs:
                raise ValueError(f'config.{field}={value!r} names stage {match.group(1)!r}, which does not run '
                                 f'before it; stages so far: {sorted(dirs)}')
            return str(dirs[match.group(1)])
        return _REFERENCE.sub(sub, value)

    def walk(section, prefix):
        for key in list(section.keys()):
            value, field = section[key], f'{prefix}{key}'
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, field + '.')
            elif isinstance(value, str) and '{' in value:
                section[key] = resolve(value, field)
            elif isinstance(value, (tuple, list)) and any(isinstance(v, str) and '{' in v for v in value):
                section[key] = tuple(resolve(v, field) if isinstance(v, str) else v for v in value)

    walk(stage_cfg, '')
    if stage_cfg.init.checkpoint == SCRATCH:
        stage_cfg.init.checkpoint = ''


def task_val_loss(loaded, problems, seq_len: int, template: str = 'chat', batch: int = 32) -> float:
    """Mean cross-entropy per assistant token of the problems' worked solutions (in `template`)."""
    rows = sft.packed_rows(loaded.tokenizer, sft.cold_start_conversations(problems), seq_len, 'evaluation set',
                           template)
    forward = jax.jit(lambda v, b: Transformer(loaded.cfg).apply(v, b['inputs'], b['positions'], b['segment_ids'])[0])
    total, tokens = 0.0, 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))
        b = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        b['weights'][len(rows[start:start + batch]):] = 0
        logits = forward(loaded.variables, b)
        nll = train_losses.token_nll(logits, jnp.asarray(b['targets']))
        total += float((nll * b['weights']).sum())
        tokens += float(b['weights'].sum())
    return total / max(tokens, 1.0)


def evaluate_run(run_dir, e, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Held-out accuracy, format rate, first-answer accuracy (and task validation loss) of the model in
    `run_dir`: greedy by default, or `samples` completions per problem at `temperature` / `top_p`
    (accuracy is then their mean, pass@1, and pass_at_<samples> is added)."""
    t0 = time.perf_counter()
    loaded = loading.load(str(run_dir), what='evaluation.stages')
    problems = tasks.task_problems(e.tasks, 'test', e.problems, 0, 'evaluation.tasks')
    prompts = rollout.encode_prompts(loaded.tokenizer, [p.prompt for p in problems], e.template)
    metrics = rollout.evaluate(loaded.cfg, loaded.variables, problems, prompts, loaded.tokenizer,
                               max_new_tokens=e.max_new_tokens, key=jax.random.PRNGKey(0), samples=samples,
                               temperature=temperature, top_p=top_p)
    out = {'accuracy': metrics['eval_accuracy'], 'format_rate': metrics['eval_format_rate'],
           'first_answer_accuracy': metrics['eval_first_answer_accuracy'],
           'completion_tokens': metrics['eval_completion_len'], 'problems': len(problems)}
    if samples > 1:
        out[f'pass_at_{samples}'] = metrics[f'eval_pass_at_{samples}']
    if e.val_loss:
        out['task_val_loss'] = task_val_loss(loaded, problems, e.seq_len, e.template)
    out['eval_s'] = time.perf_counter() - t0
    return out


def evaluate_stage(name: str, stage_dir, e) -> dict:
    """`evaluate_run` of one stage, cached in its directory."""
    path = epath.Path(stage_dir) / EVAL_FILE
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_run(stage_dir, e)
    path.write_text(json.dumps(result, indent=2))
    logging.info('Chain: stage %r held-out accuracy %.3f, format rate %.3f', name, result['accuracy'],
                 result['format_rate'])
    return result


def gap_closed(rows: dict, gap) -> dict:
    """{stage: (accuracy - accuracy[low]) / (accuracy[high] - accuracy[low])} for gap=(low, high), once
    both are evaluated and differ; else {}."""
    if not gap or any(name not in rows for name in gap):
        return {}
    low, high = (rows[name]['accuracy'] for name in gap)
    return {} if high == low else {name: (r['accuracy'] - low) / (high - low) for name, r in rows.items()}


def write_table(workdir, rows: dict, wall: dict, gap=()) -> str:
    """WORKDIR/table.md and table.json: one line per evaluated stage (with `gap=(low, high)`, the share
    of the accuracy gap between those two stages each one closes)."""
    closed = gap_closed(rows, gap)
    rows = {name: {**r, 'gap_closed': closed[name]} if name in closed else r for name, r in rows.items()}
    columns = ['accuracy', 'format_rate', 'task_val_loss', 'completion_tokens'] + (['gap_closed'] if closed else [])
    lines = ['| stage | ' + ' | '.join(columns) + ' | stage wall time (s) |',
             '|---' * (len(columns) + 2) + '|']
    for name, r in rows.items():
        cells = [f'{r[c]:.3f}' if c in r else '' for c in columns]
        lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {wall.get(name, float("nan")):.0f} |')
    text = '\n'.join(lines) + '\n'
    workdir = epath.Path(workdir)  # local or remote (gs://, s3://)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'table.md').write_text(text)
    (workdir / 'table.json').write_text(json.dumps({'stages': rows, 'wall_s': wall}, indent=2))
    return text
