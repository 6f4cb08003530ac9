"""Tests for dsjax/data/hf_tokenizer.py: a tiny byte-level BPE built here, laid out as DeepSeek ships one."""
import json
import pathlib
import pickle

import numpy as np

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsjax import config as config_lib
from dsjax.data import chat, corpus, hf_tokenizer
from dsjax.data import tokenizer as tokenizer_lib

BOS, EOS = '<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>'
USER, ASSISTANT = '<｜User｜>', '<｜Assistant｜>'
# DeepSeek-V3's template, reduced to system / user / assistant turns.
TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}")
TEXTS = ['def add(a, b):\n    return a + b\n', 'The quick brown fox jumps over the lazy dog. ' * 3,
         'Ünïcödé, ελληνικά, русский, 日本語', 'x = [i * i for i in range(10)]\n'] * 20


def added_token(content: str) -> dict:
    return {'__type': 'AddedToken', 'content': content, 'lstrip': False, 'normalized': True, 'rstrip': False,
            'single_word': False, 'special': True}


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    """tokenizer.json (byte-level BPE, 400 tokens) + tokenizer_config.json like DeepSeek-V3's."""
    directory = tmp_path_factory.mktemp('hf_tok')
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(directory / 'tokenizer.json'))
    config = {'add_bos_token': True, 'add_eos_token': False, 'bos_token': added_token(BOS),
              'eos_token': added_token(EOS), 'pad_token': added_token(EOS), 'unk_token': None,
              'model_max_length': 16384, 'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template': TEMPLATE}
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, ensure_ascii=False))
    return directory


@pytest.fixture(scope='module')
def tok(tok_dir):
    return hf_tokenizer.HFTokenizer(tok_dir)


@pytest.mark.parametrize('text', [
    '', 'hello world', 'def f(x):\n\treturn  x   +  1\n\n', '  leading and trailing  ',
    'Ünïcödé, ελληνικά, русский, 日本語のテキスト, العربية', 'emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 done',
    'control \x00\x01\x7f\r\n\x0b\x0c chars', f'{USER}special tokens in text{ASSISTANT}ok'])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_special_tokens_and_vocab(tok, tok_dir, tmp_path):
    assert 260 < tok.vocab_size <= 400  # 256 bytes, 4 specials, merges the small corpus allows
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # DeepSeek pads with eos
    assert tok.encode(USER) == [2]
    assert tok.decode([tok.bos_id, *tok.encode('hi'), tok.eos_id, tok.pad_id]) == 'hi'
    # A bare tokenizer.json: special tokens from special_tokens_map.json; no pad token means eos.
    (tmp_path / 'tokenizer.json').write_bytes((tok_dir / 'tokenizer.json').read_bytes())
    (tmp_path / 'special_tokens_map.json').write_text(json.dumps({'bos_token': BOS, 'eos_token': USER}))
    bare = hf_tokenizer.HFTokenizer(tmp_path / 'tokenizer.json')
    assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.chat_template) == (0, 2, 2, None)
    assert pickle.loads(pickle.dumps(tok)).encode('round trip') == tok.encode('round trip')


def test_matches_transformers(tok, tok_dir):
    """Same ids and the same rendered chat template as transformers' own tokenizer of the directory."""
    theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert tok.vocab_size == len(theirs)
    for text in TEXTS[:4] + [f'{USER}hi{ASSISTANT}']:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False)
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2? Ünïcödé'},
                {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'and 3+3?'}]
    for prompt in (False, True):
        ours = tok.apply_chat_template(messages, add_generation_prompt=prompt)
        assert ours == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert ours == f'{BOS}Be brief.{USER}2+2? Ünïcödé{ASSISTANT}4{EOS}{USER}and 3+3?{ASSISTANT}'
    with pytest.raises(Exception, match='unknown role tool'):
        tok.apply_chat_template([{'role': 'tool', 'content': 'x'}])


def data_config(**overrides):
    c = config_lib.base_config()
    c.data.update(**overrides)
    return c


def test_get_tokenizer_and_config_validation(tok_dir):
    for path in (tok_dir, tok_dir / 'tokenizer.json'):
        got = tokenizer_lib.get_tokenizer(data_config(tokenizer='hf', tokenizer_path=str(path)).data)
        assert isinstance(got, hf_tokenizer.HFTokenizer) and got.encode('def') == hf_tokenizer.HFTokenizer(
            tok_dir).encode('def')
    with pytest.raises(config_lib.ConfigError, match=r"config.data.tokenizer_path='' is invalid: .*'hf' needs"):
        config_lib.validate(data_config(tokenizer='hf'), 1)
    with pytest.raises(config_lib.ConfigError, match=r"config.data.tokenizer='tiktoken' is invalid"):
        config_lib.validate(data_config(tokenizer='tiktoken'), 1)
    config_lib.validate(data_config(tokenizer='hf', tokenizer_path=str(tok_dir)), 1)


def test_errors_name_the_file(tok_dir, tmp_path):
    with pytest.raises(ValueError, match=r'no \S+/nowhere \(give a tokenizer.json'):
        hf_tokenizer.HFTokenizer(tmp_path / 'nowhere')
    (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match='is not a tokenizers JSON file'):
        hf_tokenizer.HFTokenizer(tmp_path)
    (tmp_path / 'tokenizer.json').write_bytes((tok_dir / 'tokenizer.json').read_bytes())
    with pytest.raises(ValueError, match=r'bos_token and eos_token not set'):
        hf_tokenizer.HFTokenizer(tmp_path)
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': EOS}))
    with pytest.raises(ValueError, match=r"bos_token='<s>' is not in the vocabulary"):
        hf_tokenizer.HFTokenizer(tmp_path)
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': BOS, 'eos_token': EOS}))
    with pytest.raises(ValueError, match='has no chat_template'):
        hf_tokenizer.HFTokenizer(tmp_path).apply_chat_template([{'role': 'user', 'content': 'x'}])


# The chat template the six R1-Distill checkpoints ship (tokenizer_config.json of deepseek-ai/DeepSeek-R1-Distill-*,
# e.g. huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B): DeepSeek's format with '<think>\\n' opening every
# reply, and earlier replies rendered without their reasoning.
R1_DISTILL_TEMPLATE = pathlib.Path(__file__).with_name('r1_distill_chat_template.jinja').read_text().rstrip('\n')


@pytest.fixture(scope='module')
def r1_tok_dir(tok_dir, tmp_path_factory):
    """The tokenizer above with an R1-Distill tokenizer_config.json (bos, eos = pad, the R1 template)."""
    directory = tmp_path_factory.mktemp('r1_tok')
    (directory / 'tokenizer.json').write_bytes((tok_dir / 'tokenizer.json').read_bytes())
    config = {'add_bos_token': True, 'add_eos_token': False, 'bos_token': added_token(BOS),
              'eos_token': added_token(EOS), 'pad_token': added_token(EOS), 'unk_token': None,
              'model_max_length': 16384, 'tokenizer_class': 'PreTrainedTokenizerFast',
              'chat_template': R1_DISTILL_TEMPLATE}
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, ensure_ascii=False))
    return directory


def test_r1_distill_template_matches_transformers_and_masks_the_reply(r1_tok_dir):
    tok = hf_tokenizer.HFTokenizer(r1_tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(r1_tok_dir)
    reply = '<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4.'
    conversation = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'},
                    {'role': 'assistant', 'content': reply}, {'role': 'user', 'content': 'and 3+3?'}]
    for prompt in (False, True):
        ours = tok.apply_chat_template(conversation, add_generation_prompt=prompt)
        assert ours == theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
    # Inference: the prompt ends in the forced '<think>\\n'; history keeps only the text after '</think>'.
    assert ours == f'{BOS}Be brief.{USER}2+2?{ASSISTANT}\n\nThe answer is 4.{EOS}{USER}and 3+3?{ASSISTANT}<think>\n'
    assert chat.prompt_tokens(tok, conversation) == tok.encode(ours)

    # Training: the reply (reasoning included) continues the generation prompt, then eos; only it is masked in.
    ids, mask = chat.tokenize_conversation(tok, conversation[1:3])
    prompt = tok.encode(f'{BOS}{USER}2+2?{ASSISTANT}<think>\n')
    completion = tok.encode('2 plus 2 is 4.\n</think>\n\nThe answer is 4.') + [tok.eos_id]
    np.testing.assert_array_equal(ids, prompt + completion)
    np.testing.assert_array_equal(mask, [0] * len(prompt) + [1] * len(completion))
    # A second reply cannot follow a reasoning one: the template rewrites the first.
    with pytest.raises(corpus.DataError, match='one assistant turn per conversation'):
        chat.tokenize_conversation(tok, conversation[1:] + [{'role': 'assistant', 'content': '6'}])


def test_tokenizer_path_may_be_a_hub_id(r1_tok_dir, monkeypatch):
    """data.tokenizer_path='deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B' fetches the tokenizer files only."""
    import huggingface_hub
    from dsjax.interop import hub

    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(r1_tok_dir)

    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    tok = tokenizer_lib.get_tokenizer(data_config(tokenizer='hf', tokenizer_path='deepseek-ai/R1-Distill-x').data)
    assert calls == [('deepseek-ai/R1-Distill-x', hub.TOKENIZER_PATTERNS)]
    assert tok.chat_template == R1_DISTILL_TEMPLATE
