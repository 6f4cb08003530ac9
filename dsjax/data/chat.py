"""Chat conversations for SFT: the template (with the assistant-token mask), JSONL files, packing.

Template (DeepSeek-LLM's plain format; the same one `dsjax.infer.chat` renders at inference):

    [bos]{system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}[eos]User: {user}\\n\\nAssistant: ...

A tokenizer with its own chat template (a HF checkpoint's) renders through that template instead;
the assistant tokens are then found by rendering each prefix of the conversation. template='zero'
renders a one-question conversation in the R1-Zero template instead (the prompt GRPO and the
evaluation give with template 'zero'): [bos]{R1-Zero instructions ... User: {user}. Assistant:} {assistant}[eos].

JSONL: one conversation per line, {"messages": [{"role": "system"|"user"|"assistant", "content": str},
...]}, with at least one assistant message. A malformed line raises DataError naming file and line.

Packing: whole conversations fill rows of seq_len + 1 tokens (inputs = row[:-1], targets = row[1:]),
each its own segment (positions restart at 0, attention never crosses); a target counts (weight 1)
only if it is an assistant token of the same conversation. A conversation longer than a row is
dropped, and counted.
"""
import hashlib
import json
import pathlib
from typing import Iterable, Sequence

import numpy as np

from dsjax.data.corpus import DataError, jsonl_records
from dsjax.data.tasks import R1_ZERO_TEMPLATE

ROLES = ('system', 'user', 'assistant')
FIELDS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def user_turn(content: str) -> str:
    """A user turn of the plain template; it ends where the assistant's reply starts."""
    return f'User: {content}\n\nAssistant:'


def render_plain(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of `messages` in the plain template, and a 0/1 mask marking the assistant tokens
    (each reply's text and its closing eos). Ending on a user turn leaves it ready for a reply."""
    ids, mask = [tokenizer.bos_id], [0]
    for m in messages:
        if m['role'] == 'assistant':
            piece = tokenizer.encode(' ' + m['content']) + [tokenizer.eos_id]
            ids += piece
            mask += [1] * len(piece)
            continue
        text = m['content'] + '\n\n' if m['role'] == 'system' else user_turn(m['content'])
        piece = tokenizer.encode(text)
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def _reply_past_prompt(tokenizer, messages: Sequence[dict], prompt: str, reply: str) -> str:
    """`reply` without its start that the generation prompt already holds: the longest end of the text the
    generation prompt adds (DeepSeek-R1's '<｜Assistant｜><think>\\n') that the reply begins with."""
    history = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    opening = prompt[len(history):] if prompt.startswith(history) else ''
    n = next((n for n in range(min(len(opening), len(reply)), 0, -1) if reply.startswith(opening[-n:])), 0)
    return reply[n:]


def _render_template(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """The tokenizer's own chat template; an assistant turn's tokens are those past the rendering of
    the conversation before it (with the generation prompt). Where the template does not render the
    turn as that prompt's continuation (DeepSeek-R1's generation prompt opens the reply with
    '<think>\\n', and its rendered history keeps only the text after '</think>'), the turn is the
    reply's text past what the prompt already holds, then eos: what the model is asked to produce."""
    ids, mask = [], []
    for i, m in enumerate(messages):
        if m['role'] != 'assistant':
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        before = tokenizer.encode(prompt)
        if before[:len(ids)] != ids or len(before) < len(ids):
            raise DataError('the tokenizer chat template does not render each conversation prefix as a prefix '
                            'of the next one, so assistant tokens cannot be masked (DeepSeek-R1 templates drop '
                            'earlier turns\' reasoning: give one assistant turn per conversation)')
        upto = tokenizer.encode(tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False))
        if upto[:len(before)] != before:
            reply = _reply_past_prompt(tokenizer, messages[:i], prompt, m['content'])
            upto = before + tokenizer.encode(reply) + [tokenizer.eos_id]
        mask += [0] * (len(before) - len(ids)) + [1] * (len(upto) - len(before))
        ids = upto
    last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
    if last == len(messages) - 1:
        return ids, mask
    rest = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    if rest[:len(ids)] != ids:
        raise DataError('the tokenizer chat template renders the turns after the last assistant reply differently '
                        'from the conversation before them, so assistant tokens cannot be masked')
    return rest, mask + [0] * (len(rest) - len(mask))


def render_zero(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """A user question and the assistant's reply in the R1-Zero template: the prompt tokens exactly as
    GRPO encodes them, then the reply as a completion (its text and eos, masked in)."""
    if [m['role'] for m in messages] != ['user', 'assistant']:
        raise DataError('the R1-Zero template holds one user question and one assistant reply, got a conversation '
                        f"of roles {[m['role'] for m in messages]}: use template 'chat' for system prompts or "
                        'several turns')
    prompt = [tokenizer.bos_id] + tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=messages[0]['content']))
    reply = tokenizer.encode(' ' + messages[1]['content']) + [tokenizer.eos_id]
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def tokenize_conversation(tokenizer, messages: Sequence[dict], template: str = 'chat') -> tuple[np.ndarray, np.ndarray]:
    """(ids_T int32, assistant_mask_T int32) of one conversation, through the tokenizer's chat template
    if it has one, else the plain template; template='zero': the R1-Zero template."""
    if template == 'zero':
        ids, mask = render_zero(tokenizer, messages)
    elif getattr(tokenizer, 'chat_template', None):
        ids, mask = _render_template(tokenizer, messages)
    else:
        ids, mask = render_plain(tokenizer, messages)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def prompt_tokens(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The conversation (ending on a user turn) rendered to await the assistant's reply."""
    if getattr(tokenizer, 'chat_template', None):
        return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return render_plain(tokenizer, messages)[0]


def check_conversation(messages, where: str) -> list[dict]:
    """`messages` as a list of {'role', 'content'} dicts; raises DataError naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
            raise DataError(f'{where}: message {k} must be {{"role": one of {ROLES}, "content": a string}}, '
                            f'got {str(m)[:200]}')
    if not any(m['role'] == 'assistant' for m in messages):
        raise DataError(f'{where}: the conversation has no assistant message, so nothing to train on')
    return [{'role': m['role'], 'content': m['content']} for m in messages]


def held_out(record, fraction: float) -> bool:
    """Whether a record (a conversation, a prompt row) is held out for validation: a fixed `fraction`
    of records by the sha256 of their JSON, whatever the file order or seed."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2.0**64 < fraction


def read_conversations(path) -> list[list[dict]]:
    """Every conversation of a JSONL file (see the module docstring), in file order."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read the conversations file {path}: {e}') from e
    conversations = []
    for where, _, record in jsonl_records(text, path):
        if not isinstance(record, dict) or 'messages' not in record:
            raise DataError(f'{where}: expected an object with a "messages" list')
        conversations.append(check_conversation(record['messages'], where))
    return conversations


def write_conversations(path, conversations: Iterable[Sequence[dict]], extra: Iterable[dict] | None = None) -> int:
    """Writes conversations as JSONL (atomically); `extra` adds fields to each line. Returns the count."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    n = 0
    extra = iter(extra) if extra is not None else None
    with open(tmp, 'w', encoding='utf-8') as f:
        for messages in conversations:
            record = {'messages': list(messages), **(next(extra) if extra is not None else {})}
            f.write(json.dumps(record, ensure_ascii=False) + '\n')
            n += 1
    tmp.replace(path)
    return n


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[list[dict], int]:
    """Packs (ids_T, mask_T) examples whole into rows; see the module docstring.

    Returns the rows (dicts of FIELDS, each [seq_len]; the last one padded) and the number of
    examples dropped for being longer than seq_len + 1 tokens.
    """
    width = seq_len + 1
    rows, dropped = [], 0
    tokens, masks, segments, positions = [], [], [], []

    def flush():
        pad = width - len(tokens)
        row_T = np.asarray(tokens + [0] * pad, np.int32)
        mask_T = np.asarray(masks + [0] * pad, np.int32)
        seg_T = np.asarray(segments + [0] * pad, np.int32)
        pos_T = np.asarray(positions + [0] * pad, np.int32)
        same = (seg_T[:-1] != 0) & (seg_T[:-1] == seg_T[1:])
        rows.append({'inputs': row_T[:-1], 'targets': row_T[1:], 'segment_ids': seg_T[:-1],
                     'positions': pos_T[:-1], 'weights': (same & (mask_T[1:] == 1)).astype(np.float32)})

    for ids_T, mask_T in examples:
        n = len(ids_T)
        if n > width:
            dropped += 1
            continue
        if len(tokens) + n > width:
            flush()
            tokens, masks, segments, positions = [], [], [], []
        segment = (segments[-1] + 1) if segments else 1
        tokens += list(map(int, ids_T))
        masks += list(map(int, mask_T))
        segments += [segment] * n
        positions += list(range(n))
    if tokens:
        flush()
    return rows, dropped


def stack_rows(rows: Sequence[dict]) -> dict:
    """Per-row dicts -> one batch dict of [rows, seq_len] arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


def empty_row(seq_len: int) -> dict:
    """A padding row that adds nothing to any loss."""
    return {k: np.zeros(seq_len, np.float32 if k == 'weights' else np.int32) for k in FIELDS}
