"""Prompts, rollouts and held-out evaluation, shared by GRPO, SFT, rejection sampling and chains.

Axis legend: B rows (prompts x samples), W prompt width, N completion tokens (max_new_tokens).

Templates turn a problem into prompt text: 'zero' the R1-Zero template, 'chat' the one-turn conversation
SFT trains on (dsjax/data/chat.py; [bos] + its tokens are exactly those of the conversation's prompt).
"""
import jax
import numpy as np

from dsjax.data import chat, tasks
from dsjax.infer import decode
from dsjax.infer.sampling import SamplingConfig

# name -> Problem -> prompt text.
TEMPLATES = {'zero': tasks.render_zero_prompt, 'chat': lambda p: chat.user_turn(p.prompt)}
# Prompt widths are padded to a multiple of this, so generation and updates compile for few shapes.
WIDTH_MULTIPLE = 32


def encode_prompts(tokenizer, problems, template: str) -> list[list[int]]:
    """[bos] + the tokens of each problem in the prompt template."""
    return [[tokenizer.bos_id] + tokenizer.encode(TEMPLATES[template](p)) for p in problems]


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


def evaluate(model_cfg, variables, problems, prompts, tokenizer, *, max_new_tokens: int, key, samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, mesh=None, shards: int = 1) -> dict:
    """Accuracy, format rate and completion length (tokens) on held-out problems, in one batched pass of
    `samples` completions per problem at `temperature` (0: greedy) and `top_p`.

    With k = samples > 1, eval_accuracy is their mean (pass@1, the R1 paper's protocol) and
    eval_pass_at_k counts problems solved by any. eval_first_answer_accuracy grades the text up to the
    first </answer>: the credit a model that never stops after its answer would get for it. Rows are
    padded to a multiple of `shards` (the mesh's batch shards).
    """
    sampling = SamplingConfig(temperature=temperature, top_p=top_p if temperature else 1.0)
    rows = [p for p in prompts for _ in range(samples)]
    padded = rows + [rows[-1]] * (-len(rows) % shards)
    # One batch: generation on a CPU is several times faster per token at a few hundred rows than at 64.
    _, _, gen, texts = rollout(model_cfg, variables, padded, tokenizer, key, sampling, max_new_tokens, mesh)
    texts = texts[:len(rows)]
    problems_R = [p for p in problems for _ in range(samples)]
    correct = np.array([tasks.grade(p, text) for p, text in zip(problems_R, texts)])
    first = [tasks.grade_first_answer(p, text) for p, text in zip(problems_R, texts)]
    metrics = {'eval_accuracy': float(correct.mean()),
               'eval_format_rate': float(np.mean([tasks.format_ok(text) for text in texts])),
               'eval_completion_len': float(gen.mask[:len(rows)].sum(axis=1).mean()),
               'eval_first_answer_accuracy': float(np.mean(first))}
    if samples > 1:
        metrics[f'eval_pass_at_{samples}'] = float(correct.reshape(-1, samples).any(axis=1).mean())
    names = np.array([f'{p.task}{p.level}' for p in problems_R])
    if len(set(names)) > 1:
        for name in sorted(set(names)):
            metrics[f'eval_accuracy_{name}'] = float(correct[names == name].mean())
    return metrics
