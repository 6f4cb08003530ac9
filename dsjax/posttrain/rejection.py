"""Rejection sampling (R1 stage 3): sample k answers per prompt, keep the correct ones, write an SFT set.

Run:  python -m dsjax.main --config=<experiment> --config.stage=rejection --config.init.checkpoint=RUN \\
          --workdir=DIR
It loads the policy of `init.checkpoint` (a dsjax run directory), samples `rejection.samples` answers
for each of `rejection.prompts` train-split problems per task entry, and keeps an answer if the
task's exact grader accepts it, it ended with EOS within `rejection.max_tokens` tokens (overlong
answers are dropped, counted in tokens) and it is not a duplicate of one already kept for that
prompt. `rejection.keep='all'` skips the grader (still counted): samples of a student to distil on.
Writes DIR/samples.jsonl (conversations in dsjax/data/chat.py's format, plus task and level)
and DIR/stats.json (kept fraction overall and per task level, and why answers were dropped); a
workdir that holds both is finished, and a re-run returns its statistics at once.
"""
import collections
import json
import pathlib
import time

from absl import logging
import jax
import numpy as np

from dsjax import config as config_lib
from dsjax.data import chat, tasks
from dsjax.infer import loading
from dsjax.infer.sampling import SamplingConfig
from dsjax.posttrain import rollout, sft

SAMPLES_FILE = 'samples.jsonl'
STATS_FILE = 'stats.json'
KEEP = ('correct', 'all')


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `rejection.*` field (`num_devices`: the stage-check
    interface's)."""
    del num_devices
    r = config.rejection
    config_lib.parse_task_entries(r.tasks, 'rejection.tasks')
    for f in ('prompts', 'samples', 'max_new_tokens', 'max_tokens', 'batch'):
        if not (isinstance(r[f], int) and r[f] > 0):
            config_lib.fail(f'rejection.{f}', r[f], 'must be a positive integer')
    if r.keep not in KEEP:
        config_lib.fail('rejection.keep', r.keep, f"must be one of {KEEP} ('all': the sampled answers unfiltered but "
                        'for length and duplicates, e.g. student samples for distillation)')
    if r.template not in rollout.TEMPLATES:
        config_lib.fail('rejection.template', r.template, f'must be one of {tuple(rollout.TEMPLATES)}')
    if not r.temperature > 0:
        config_lib.fail('rejection.temperature', r.temperature, 'must be > 0: k greedy answers are one answer')
    if not 0 < r.top_p <= 1:
        config_lib.fail('rejection.top_p', r.top_p, 'must be in (0, 1]')
    if not config.init.checkpoint:
        config_lib.fail('init.checkpoint', config.init.checkpoint, 'rejection sampling needs the policy to sample '
                        'from: a previous stage\'s run directory')


def sample(loaded, problems, prompts, *, k: int, sampling: SamplingConfig, max_new_tokens: int, batch: int,
           key) -> list[dict]:
    """k completions of every prompt: one record per completion with its problem index, text, token
    count (EOS included) and whether it ended with EOS. Calls are padded to `batch` x k rows, so
    generation compiles once."""
    tok = loaded.tokenizer
    records = []
    for start in range(0, len(prompts), batch):
        idx = list(range(start, min(start + batch, len(prompts))))
        rows = [i for i in idx for _ in range(k)]
        padded = rows + [rows[-1]] * (batch * k - len(rows))
        key, sub = jax.random.split(key)
        _, _, gen, texts = rollout.rollout(loaded.cfg, loaded.variables, [prompts[i] for i in padded], tok, sub,
                                        sampling, max_new_tokens, None)
        for row, i in enumerate(rows):
            n = int(gen.mask[row].sum())
            ended = bool(np.any(gen.tokens[row][gen.mask[row]] == tok.eos_id))
            records.append({'problem': i, 'completion': texts[row].strip(), 'tokens': n, 'ended': ended})
    return records


def select(problems, records, max_tokens: int, keep: str = 'correct') -> tuple[list[dict], dict]:
    """The kept records (graded, with `correct` and `format` set) and the statistics of the filter;
    keep='all' keeps incorrect answers too (still graded and counted)."""
    kept, seen = [], set()
    reasons = collections.Counter()
    by_level = collections.defaultdict(lambda: collections.Counter())
    for r in records:
        p = problems[r['problem']]
        r['correct'] = tasks.grade(p, r['completion'])
        r['format'] = tasks.format_ok(r['completion'])
        level = by_level[f'{p.task}:{p.level}']
        level['samples'] += 1
        if not r['correct'] and keep == 'correct':
            reasons['incorrect'] += 1
        elif not r['ended'] or r['tokens'] > max_tokens:
            reasons['overlong'] += 1
        elif (r['problem'], r['completion']) in seen:
            reasons['duplicate'] += 1
        else:
            seen.add((r['problem'], r['completion']))
            kept.append(r)
            level['kept'] += 1
        level['correct'] += r['correct']
    solved = collections.Counter(f'{problems[r["problem"]].task}:{problems[r["problem"]].level}'
                                 for r in {r['problem']: r for r in kept}.values())
    prompts_per_level = collections.Counter(f'{p.task}:{p.level}' for p in problems)
    stats = {
        'prompts': len(problems), 'samples': len(records), 'kept': len(kept),
        'kept_fraction': len(kept) / max(len(records), 1),
        'correct_fraction': float(np.mean([r['correct'] for r in records])) if records else 0.0,
        'format_rate': float(np.mean([r['format'] for r in records])) if records else 0.0,
        'prompts_with_a_kept_answer': len({r['problem'] for r in kept}) / max(len(problems), 1),
        'dropped': dict(reasons),
        'per_level': {name: {'kept_fraction': c['kept'] / max(c['samples'], 1),
                             'correct_fraction': c['correct'] / max(c['samples'], 1),
                             'prompts_with_a_kept_answer': solved[name] / max(prompts_per_level[name], 1)}
                      for name, c in sorted(by_level.items())},
    }
    return kept, stats


def run(config, workdir, devices=None) -> dict:
    """Samples, filters and writes DIR/samples.jsonl and DIR/stats.json; returns the statistics."""
    del devices  # sampling runs on one device; the batch is small
    validate(config, 1)
    r = config.rejection
    workdir = pathlib.Path(workdir)
    if (workdir / STATS_FILE).exists() and (workdir / SAMPLES_FILE).exists():
        logging.info('Rejection sampling already done in %s', workdir)  # a resumed chain skips it
        return json.loads((workdir / STATS_FILE).read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    t0 = time.perf_counter()
    loaded = loading.load(config.init.checkpoint, what='init.checkpoint')
    problems = tasks.task_problems(r.tasks, 'train', r.prompts, r.seed, 'rejection.tasks')
    prompts = rollout.encode_prompts(loaded.tokenizer, [p.prompt for p in problems], r.template)
    records = sample(loaded, problems, prompts, k=r.samples, sampling=SamplingConfig(r.temperature, 0, r.top_p),
                     max_new_tokens=r.max_new_tokens, batch=r.batch, key=jax.random.PRNGKey(r.seed))
    kept, stats = select(problems, records, r.max_tokens, r.keep)
    stats['wall_s'] = time.perf_counter() - t0
    chat.write_conversations(
        workdir / SAMPLES_FILE, (sft.conversation(problems[x['problem']], x['completion']) for x in kept),
        extra=({'task': problems[x['problem']].task, 'level': problems[x['problem']].level} for x in kept))
    (workdir / STATS_FILE).write_text(json.dumps(stats, indent=2))
    logging.info('Rejection sampling: kept %d of %d answers (%.1f%%), %d of %d prompts have one; wrote %s',
                 len(kept), len(records), 100 * stats['kept_fraction'],
                 round(stats['prompts_with_a_kept_answer'] * len(problems)), len(problems), workdir / SAMPLES_FILE)
    return stats
