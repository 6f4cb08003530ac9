"""The chat template's assistant mask, JSONL conversations (errors name file and line), packing."""
import json

import numpy as np
import pytest

from dsjax.data import chat
from dsjax.data.corpus import DataError


class Chars:
    """One token per character (ids 10+), bos 2, eos 3, pad 0: easy to read back."""
    bos_id, eos_id, pad_id, vocab_size = 2, 3, 0, 200

    def encode(self, text):
        return [10 + ord(c) % 180 for c in text]

    def decode(self, ids):
        return ''.join(chr(i - 10) for i in ids if i >= 10)


MESSAGES = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'hi'},
            {'role': 'assistant', 'content': 'yo'}, {'role': 'user', 'content': 'q'},
            {'role': 'assistant', 'content': 'ok'}]


def test_mask_marks_only_assistant_replies_and_their_eos():
    tok = Chars()
    ids, mask = chat.tokenize_conversation(tok, MESSAGES)
    assert tok.decode(ids) == 'S\n\nUser: hi\n\nAssistant: yoUser: q\n\nAssistant: ok'
    masked = [int(i) for i, m in zip(ids, mask) if m]
    assert masked == tok.encode(' yo') + [tok.eos_id] + tok.encode(' ok') + [tok.eos_id]
    # The prompt for the next reply is exactly the conversation's unmasked prefix (train == inference).
    assert chat.prompt_tokens(tok, MESSAGES[:2]) == list(ids[:len(chat.prompt_tokens(tok, MESSAGES[:2]))])


def test_zero_template_prompt_is_grpos_and_only_the_reply_is_masked():
    from dsjax.data import tasks
    from dsjax.posttrain import rollout

    tok = Chars()
    problem = tasks.task_problems(('multiplication:3',), 'test', 1, 0, 'x')[0]
    ids, mask = chat.tokenize_conversation(tok, [{'role': 'user', 'content': problem.prompt},
                                                 {'role': 'assistant', 'content': 'r'}], 'zero')
    prompt = rollout.encode_prompt(tok, problem.prompt, 'zero')
    assert list(ids) == prompt + tok.encode(' r') + [tok.eos_id]  # what GRPO and the evaluation prompt
    assert list(mask) == [0] * len(prompt) + [1, 1, 1]
    with pytest.raises(DataError, match="roles \\['system', 'user', 'assistant'\\].*template 'chat'"):
        chat.tokenize_conversation(tok, MESSAGES[:3], 'zero')


def test_packing_keeps_conversations_whole_and_weights_assistant_targets():
    tok = Chars()
    examples = [chat.tokenize_conversation(tok, MESSAGES[1:3]), chat.tokenize_conversation(tok, MESSAGES[3:5]),
                chat.tokenize_conversation(tok, [{'role': 'user', 'content': 'x' * 50},
                                                 {'role': 'assistant', 'content': 'y'}])]
    lengths = [len(e[0]) for e in examples]
    rows, dropped = chat.pack_examples(examples, seq_len=lengths[0] + lengths[1] - 1)
    assert dropped == 1 and len(rows) == 1
    row = rows[0]
    assert list(row['segment_ids']) == [1] * lengths[0] + [2] * (lengths[1] - 1)
    assert list(row['positions'][:lengths[0]]) == list(range(lengths[0]))
    assert row['positions'][lengths[0]] == 0
    # Targets weighted: exactly the assistant tokens predicted from inside the same conversation.
    full = np.concatenate([examples[0][0], examples[1][0]])
    mask = np.concatenate([examples[0][1], examples[1][1]])
    expected = mask[1:].astype(bool) & (np.arange(len(full) - 1) != lengths[0] - 1)
    np.testing.assert_array_equal(row['weights'].astype(bool), expected)
    np.testing.assert_array_equal(row['targets'], full[1:])


def test_jsonl_round_trip_and_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / 'c.jsonl'
    assert chat.write_conversations(path, [MESSAGES, MESSAGES[1:3]]) == 2
    assert chat.read_conversations(path) == [MESSAGES, MESSAGES[1:3]]
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps({'messages': MESSAGES}) + '\n\n{"messages": [oops\n')
    with pytest.raises(DataError, match=r'bad.jsonl:3: not valid JSON'):
        chat.read_conversations(bad)
    bad.write_text(json.dumps({'messages': [{'role': 'robot', 'content': 'x'}]}) + '\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1: message 0 must be'):
        chat.read_conversations(bad)
    bad.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'x'}]}) + '\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1: .*no assistant message'):
        chat.read_conversations(bad)


def test_grpo_chat_template_prompts_are_the_sft_prompts():
    from dsjax.data import tasks
    from dsjax.posttrain import rollout
    tok = Chars()
    for p in tasks.make_problems('countdown', 'train', 3, level=3):
        assert rollout.encode_prompt(tok, p.prompt, 'chat') == chat.prompt_tokens(tok, [{'role': 'user', 'content': p.prompt}])
