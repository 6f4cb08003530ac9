"""Prompts, rollouts and held-out evaluation, shared by GRPO, SFT, rejection sampling and chains.

Axis legend: B rows (prompts x samples), W prompt width, N completion tokens (max_new_tokens).

A prompt is a question (a string) or a conversation (a list of {'role', 'content'} messages ending on a
user turn). Templates: 'zero' puts a question in the R1-Zero template; 'chat' renders the conversation as
SFT trains on it (dsjax/data/chat.py), a question being a one-turn conversation.

Prompt rows (what GRPO batches): dicts with 'prompt' and any fields a reward function reads; generated
task problems give rows {'prompt': problem.prompt, 'problem': the Problem}, a user's JSONL file one row per
line ({"prompt": ...} or {"messages": [...]}, plus its other fields).
"""
import pathlib

import jax
import numpy as np

from dsjax.data import chat, tasks
from dsjax.data.corpus import DataError, jsonl_records
from dsjax.infer import decode
from dsjax.infer.sampling import SamplingConfig

TEMPLATES = ('zero', 'chat')
# Prompt widths are padded to a multiple of this, so generation and updates compile for few shapes.
WIDTH_MULTIPLE = 32


def encode_prompt(tokenizer, prompt, template: str) -> list[int]:
    """[bos] + the tokens of one prompt (a question or a conversation) in `template`, awaiting the reply."""
    messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else prompt
    if template == 'chat':
        return chat.prompt_tokens(tokenizer, messages)
    if [m['role'] for m in messages] != ['user']:
        raise DataError("template 'zero' (the R1-Zero template) holds one user question, got a conversation of "
                        f"roles {[m['role'] for m in messages]}: use template 'chat'")
    return [tokenizer.bos_id] + tokenizer.encode(tasks.R1_ZERO_TEMPLATE.format(prompt=messages[0]['content']))


def encode_prompts(tokenizer, prompts, template: str) -> list[list[int]]:
    return [encode_prompt(tokenizer, p, template) for p in prompts]


def task_rows(problems) -> list[dict]:
    """Prompt rows of generated task problems (their graders read the `problem` field)."""
    return [{'prompt': p.prompt, 'problem': p} for p in problems]


def read_prompt_rows(path) -> list[dict]:
    """The prompt rows of a JSONL file: {"prompt": a string} or {"messages": a conversation ending on a user
    turn}, plus any other fields; errors name the file and line."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'grpo.paths: cannot read the prompt file {path}: {e}') from e
    rows = []
    for where, _, row in jsonl_records(text, path):
        if not isinstance(row, dict) or ('prompt' in row) == ('messages' in row):
            raise DataError(f'{where}: expected an object with a "prompt" string or a "messages" list (one of them)')
        if 'messages' in row:
            messages = row.pop('messages')
            if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or \
                    messages[-1].get('role') != 'user':
                raise DataError(f'{where}: "messages" must be a conversation ending on a user turn')
            row['prompt'] = chat.check_conversation(messages + [{'role': 'assistant', 'content': ''}], where)[:-1]
        elif not isinstance(row['prompt'], str) or not row['prompt']:
            raise DataError(f'{where}: "prompt" must be a non-empty string')
        rows.append(row)
    if not rows:
        raise DataError(f'grpo.paths: {path} holds no prompt rows')
    return rows


def rollout(model_cfg, variables, prompts, tokenizer, key, sampling: SamplingConfig, max_new_tokens: int, mesh):
    """Generates a completion per prompt: (prompt [B, W], lengths [B], Generation on the host, texts)."""
    prompt_BxW, lengths_B = decode.pad_prompts(prompts, tokenizer.pad_id)
    prompt_BxW = np.pad(prompt_BxW, ((0, 0), (0, -prompt_BxW.shape[1] % WIDTH_MULTIPLE)),
                        constant_values=tokenizer.pad_id)
    gen = decode.generate(model_cfg, variables, prompt_BxW, key, max_new_tokens=max_new_tokens, sampling=sampling,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, lengths=lengths_B, mesh=mesh)
    gen = jax.tree.map(np.asarray, jax.device_get(gen))
    texts = [tokenizer.decode(row[m]) for row, m in zip(gen.tokens, gen.mask)]
    return prompt_BxW, lengths_B, gen, texts


def sample_held_out(model_cfg, variables, prompts, tokenizer, *, max_new_tokens: int, key, samples: int = 1,
                    temperature: float = 0.0, top_p: float = 1.0, mesh=None, shards: int = 1):
    """`samples` completions of each encoded prompt (rows prompt-major), in one batched pass at `temperature`
    (0: greedy) and `top_p`: (texts, completion lengths in tokens). Rows are padded to a multiple of
    `shards` (the mesh's batch shards); generation on a CPU is several times faster per token at a few
    hundred rows than at 64."""
    sampling = SamplingConfig(temperature=temperature, top_p=top_p if temperature else 1.0)
    rows = [p for p in prompts for _ in range(samples)]
    padded = rows + [rows[-1]] * (-len(rows) % shards)
    _, _, gen, texts = rollout(model_cfg, variables, padded, tokenizer, key, sampling, max_new_tokens, mesh)
    return texts[:len(rows)], gen.mask[:len(rows)].sum(axis=1)


def evaluate(model_cfg, variables, problems, prompts, tokenizer, *, max_new_tokens: int, key, samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, mesh=None, shards: int = 1) -> dict:
    """Accuracy, format rate and completion length (tokens) on held-out task problems (`prompts` their
    encodings), from `sample_held_out`.

    With k = samples > 1, eval_accuracy is their mean (pass@1, the R1 paper's protocol) and
    eval_pass_at_k counts problems solved by any. eval_first_answer_accuracy grades the text up to the
    first </answer>: the credit a model that never stops after its answer would get for it.
    """
    texts, lengths = sample_held_out(model_cfg, variables, prompts, tokenizer, max_new_tokens=max_new_tokens,
                                     key=key, samples=samples, temperature=temperature, top_p=top_p, mesh=mesh,
                                     shards=shards)
    problems_R = [p for p in problems for _ in range(samples)]
    correct = np.array([tasks.grade(p, text) for p, text in zip(problems_R, texts)])
    first = [tasks.grade_first_answer(p, text) for p, text in zip(problems_R, texts)]
    metrics = {'eval_accuracy': float(correct.mean()),
               'eval_format_rate': float(np.mean([tasks.format_ok(text) for text in texts])),
               'eval_completion_len': float(lengths.mean()),
               'eval_first_answer_accuracy': float(np.mean(first))}
    if samples > 1:
        metrics[f'eval_pass_at_{samples}'] = float(correct.reshape(-1, samples).any(axis=1).mean())
    names = np.array([f'{p.task}{p.level}' for p in problems_R])
    if len(set(names)) > 1:
        for name in sorted(set(names)):
            metrics[f'eval_accuracy_{name}'] = float(correct[names == name].mean())
    return metrics
