"""The SFT stage: chat conversations, loss on assistant tokens only, packed with segment ids.

Run:  python -m dsjax.main --config=experiments/<file>.py --config.stage=sft --workdir=DIR
Data: `sft.source='jsonl'` reads `sft.paths` (dsjax/data/chat.py's format; conversations are split
train/validation by a hash of their text with `data.val_fraction`); `sft.source='cold_start'` renders
worked `<think> ... </think> <answer> ... </answer>` solutions of generated task problems (train split
for training, test split for validation). `sft.template` is 'chat' (dsjax/data/chat.py) or 'zero'
(the R1-Zero template, for a policy GRPO and the evaluation prompt that way). The model starts from
`init.checkpoint`.

The step is `dsjax.train.step.make_accumulating_step` with the masked cross-entropy normalised by the
whole batch's assistant-token count, so `train.micro_batches` > 1 trains exactly as one big batch.
"""
from absl import logging
import grain

from dsjax import config as config_lib
from dsjax.data import chat, tasks
from dsjax.data.corpus import DataError
from dsjax.posttrain import losses, rollout
from dsjax.model.transformer import Transformer
from dsjax.train import loop
from dsjax.train import step as step_lib

SOURCES = ('jsonl', 'cold_start')


def conversation(problem, completion: str, system: str = '') -> list[dict]:
    """A one-turn conversation: the problem's prompt and an assistant completion."""
    messages = [{'role': 'system', 'content': system}] if system else []
    return messages + [{'role': 'user', 'content': problem.prompt}, {'role': 'assistant', 'content': completion}]


def cold_start_conversations(problems, system: str = '') -> list[list[dict]]:
    """The cold-start set: each problem with its worked `<think>/<answer>` solution."""
    return [conversation(p, tasks.worked_solution(p), system) for p in problems]


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `sft.*` field (`num_devices`: the stage-check interface's)."""
    del num_devices
    s = config.sft
    if s.source not in SOURCES:
        config_lib.fail('sft.source', s.source, f'must be one of {SOURCES}')
    if s.template not in rollout.TEMPLATES:  # the prompts GRPO, rejection sampling and evaluation use
        config_lib.fail('sft.template', s.template, f'must be one of {tuple(rollout.TEMPLATES)}')
    if s.template == 'zero' and s.system:
        config_lib.fail('sft.system', s.system, "must be '' with sft.template='zero' (the R1-Zero template has no "
                        'system prompt)')
    if s.source == 'jsonl' and not s.paths:
        config_lib.fail('sft.paths', s.paths, "sft.source='jsonl' needs at least one JSONL file")
    if s.source == 'cold_start':
        config_lib.parse_task_entries(s.tasks, 'sft.tasks')
        for f in ('examples', 'val_examples'):
            if not (isinstance(s[f], int) and s[f] > 0):
                config_lib.fail(f'sft.{f}', s[f], 'must be a positive integer')


def load_conversations(config, split: str) -> list[list[dict]]:
    """The conversations of `split` ('train' or 'validation') that config.sft names."""
    s = config.sft
    if s.source == 'cold_start':
        n = s.examples if split == 'train' else s.val_examples
        problems = tasks.task_problems(s.tasks, 'train' if split == 'train' else 'test', n, s.seed, 'sft.tasks')
        return cold_start_conversations(problems, s.system)
    system = [{'role': 'system', 'content': s.system}] if s.system else []
    out = []
    for path in s.paths:
        for messages in chat.read_conversations(path):
            if chat.held_out(messages, config.data.val_fraction) == (split == 'validation'):
                out.append(system + messages if system and messages[0]['role'] != 'system' else messages)
    return out


def packed_rows(tokenizer, conversations, seq_len: int, what: str, template: str = 'chat') -> list[dict]:
    """Conversations -> packed rows; logs how many did not fit."""
    rows, dropped = chat.pack_examples((chat.tokenize_conversation(tokenizer, m, template) for m in conversations),
                                       seq_len)
    if dropped:
        logging.warning('SFT %s: %d of %d conversations are longer than data.seq_len + 1 = %d tokens and '
                        'were dropped', what, dropped, len(conversations), seq_len + 1)
    if not rows:
        raise DataError(f'SFT {what}: no conversation fits data.seq_len={seq_len} (of {len(conversations)})')
    return rows


def train_iterator(rows: list[dict], batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable batches of this host's rows, reshuffled every epoch."""
    mine = rows[process_index::process_count] or rows
    dataset = grain.MapDataset.source(mine).shuffle(seed=seed).repeat()
    return iter(dataset.batch(batch_size // process_count, batch_fn=chat.stack_rows))


def eval_batches(rows: list[dict], batch_size: int, num_batches: int, seq_len: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
    """Up to `num_batches` fixed validation batches (the last one padded with weight-0 rows)."""
    rows = rows[:num_batches * batch_size]
    count = -(-len(rows) // batch_size)
    rows = rows + [chat.empty_row(seq_len)] * (count * batch_size - len(rows))
    per_host = batch_size // process_count
    return [chat.stack_rows(rows[b * batch_size:(b + 1) * batch_size][process_index * per_host:
                                                                     (process_index + 1) * per_host])
            for b in range(count)]


def make_loss_fn(model):
    """SFT loss_fn for `make_accumulating_step`: the micro-batch's share of the token-mean CE, plus
    its share of the MoE balance loss."""

    def loss_fn(params, buffers, batch, num_tokens, rng):
        logits, aux = step_lib._apply(model, params, buffers, batch, deterministic=False, rng=rng)
        ce = losses.sft_loss(logits, batch['targets'], batch['weights'], num_tokens)
        share = batch['weights'].sum() / num_tokens
        total = ce + share * aux['balance_loss']
        return total, ({'ce': ce, 'balance_loss': share * aux['balance_loss']}, aux['load'])

    return loss_fn


def build_stage(setup: loop.Setup) -> loop.Stage:
    """The loop's Stage for SFT."""
    config, tokenizer, proc = setup.config, setup.tokenizer, setup.proc
    d = config.data
    model = Transformer(setup.model_cfg)
    t = config.sft.template
    train_rows = packed_rows(tokenizer, load_conversations(config, 'train'), d.seq_len, 'training set', t)
    val_rows = packed_rows(tokenizer, load_conversations(config, 'validation'), d.seq_len, 'validation set', t)
    logging.info('SFT: %d training rows, %d validation rows of %d tokens', len(train_rows), len(val_rows), d.seq_len)
    step = step_lib.make_accumulating_step(make_loss_fn(model), setup.apply_gradients, config.train.micro_batches)
    return loop.Stage(model=model, train_step=step,
                      train_iter=train_iterator(train_rows, d.batch_size, d.shuffle_seed, **proc),
                      eval_step=step_lib.make_eval_step(model),
                      eval_batches=eval_batches(val_rows, d.batch_size, config.train.eval_batches, d.seq_len, **proc))


def run(config, workdir, devices=None) -> dict:
    """Runs the SFT stage in `workdir`; returns the last logged metrics."""
    return loop.run(config, workdir, devices, build_stage=build_stage, validate=validate)
