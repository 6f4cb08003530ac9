"""The files beside a HF checkpoint's weights: hf.save writes the tokenizer and generation_config.json
that transformers reads, and dsjax's generation takes its sampling defaults from them (flags override)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import tokenizers
import transformers

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.infer import loading
from dsjax.infer.sampling import SamplingConfig
from dsjax.interop import hf, hf_files
from dsjax.model.transformer import Transformer

TEXTS = ['def f(x):\n    return  x + 1\n', ' leading space and\ttabs\n\n', 'héllo wörld 123', 'class A:\n    pass\n']


@pytest.fixture(scope='module')
def tiny(tiny_model):
    cfg = tiny_model(vocab_size=384)
    variables = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    return Transformer(cfg), variables


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
    texts = [t * 40 for t in TEXTS] + [f'def function_{i}(x):\n    return x * {i}\n' * 20 for i in range(50)]
    path = tokenizer_lib.train_sentencepiece(texts, 384, str(tmp_path_factory.mktemp('spm') / 'spm'))
    return tokenizer_lib.SentencePieceTokenizer(path)


def test_read_sampling_follows_transformers_defaults(tmp_path):
    assert hf_files.read_sampling(tmp_path) is None
    file = tmp_path / hf_files.GENERATION_CONFIG
    file.write_text(json.dumps(dict(do_sample=True, temperature=0.6, top_p=0.95)))  # DeepSeek-R1's
    assert hf_files.read_sampling(tmp_path) == dict(temperature=0.6, top_k=50, top_p=0.95)
    want = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (want.do_sample, want.temperature, want.top_p) == (True, 0.6, 0.95)
    file.write_text(json.dumps(dict(temperature=0.7, bos_token_id=0)))  # no do_sample: greedy, as in transformers
    assert hf_files.read_sampling(tmp_path) == dict(temperature=0.0, top_k=0, top_p=1.0)


def test_save_writes_tokenizer_and_generation_config(tiny, tmp_path):
    model, variables = tiny
    tok_dir = tmp_path / 'tok'
    tok_dir.mkdir()
    words = {w: i for i, w in enumerate(['<pad>', '<s>', '</s>', '[UNK]'] + [f'w{i}' for i in range(100)])}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token='[UNK]'))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.save(str(tok_dir / 'tokenizer.json'))
    (tok_dir / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token='<s>', eos_token='</s>',
                                                                   pad_token='<pad>')))
    hf_tok = tokenizer_lib.from_path(tok_dir)
    out = tmp_path / 'out'
    hf.save(model, variables, out, tokenizer=hf_tok, sampling=SamplingConfig(temperature=0.6, top_p=0.95))
    assert {'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'} <= {p.name for p in out.iterdir()}
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k) == (True, 0.6, 0.95, 0)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 0)
    loaded = loading.load(out)
    assert loaded.tokenizer.encode('w3 w7') == hf_tok.encode('w3 w7') == [7, 11]
    # generate / chat: the checkpoint's sampling, each flag overriding its own field.
    assert loading.sampling_for(out) == SamplingConfig(0.6, 0, 0.95)
    assert loading.sampling_for(out, top_p=0.5) == SamplingConfig(0.6, 0, 0.5)
    assert loading.sampling_for(out, temperature=0.0).greedy
    assert loading.sampling_for(tmp_path / 'tok') == SamplingConfig()  # no generation_config.json: greedy


def test_a_sentencepiece_tokenizer_saves_as_transformers_reads_it(tiny, spm, tmp_path):
    model, variables = tiny
    hf.save(model, variables, tmp_path, tokenizer=spm)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = loading.load(tmp_path).tokenizer
    assert isinstance(ours, tokenizer_lib.SentencePieceTokenizer)
    for text in TEXTS:
        ids = spm.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text) == ids, text
        assert theirs.encode(text) == [spm.bos_id] + ids  # dsjax frames a prompt as [bos] + tokens
        assert theirs.decode(ids) == spm.decode(ids) == text
    gen = json.loads((tmp_path / hf_files.GENERATION_CONFIG).read_text())
    assert gen == dict(bos_token_id=spm.bos_id, eos_token_id=spm.eos_id, pad_token_id=0, do_sample=False)
