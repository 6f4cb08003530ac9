"""Loading for the CLIs (a dsjax Orbax checkpoint, a HF directory), text completion as the generate CLI
runs it, and chat sessions that keep the conversation in the cache. (The absl `main`s themselves only
parse flags; importing them here would clash with other CLIs' flags in one pytest process.)"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from dsjax import config as config_lib
from dsjax.infer import chat, decode, loading
from dsjax.infer.sampling import SamplingConfig
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.state import TrainState

VOCAB = 96
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def _write_tokenizer(directory: pathlib.Path):
    """A word-level HF tokenizer of VOCAB tokens with bos/eos/pad and a chat template."""
    words = ['<pad>', '<s>', '</s>', '[UNK]', ':', 'user', 'assistant', 'system'] + [f'w{i}' for i in range(VOCAB - 8)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(['<pad>', '<s>', '</s>'])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps(
        dict(bos_token='<s>', eos_token='</s>', pad_token='<pad>', chat_template=TEMPLATE)))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, models):
    """A dsjax run directory (Orbax checkpoint + config naming the HF tokenizer) of the tiny dense model."""
    cfg, variables = models['dense']
    root = tmp_path_factory.mktemp('cli')
    _write_tokenizer(root / 'tok')
    config = config_lib.base_config()
    config.model.update(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    config.data.update(tokenizer='hf', tokenizer_path=str(root / 'tok'))
    assert config_lib.freeze_model(config.model) == cfg
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], opt_state={},
                       rng=jax.random.PRNGKey(0), buffers={})
    ckpt = Checkpointer(root / 'run' / 'checkpoints', keep=1, async_save=False)
    ckpt.save(3, state, config=config.to_dict())
    ckpt.close()
    return root


def test_load_orbax_run(checkpoint, models):
    cfg, variables = models['dense']
    loaded = loading.load(checkpoint / 'run')
    assert loaded.cfg == cfg and loaded.tokenizer.eos_id == 2
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def test_load_orbax_keeps_the_v3_routing_bias(tmp_path, models):
    cfg, variables = models['v3']
    config = config_lib.base_config()
    config.model.update(**{k: v for k, v in vars(cfg).items() if k != 'rope_scaling'})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], opt_state={},
                       rng=jax.random.PRNGKey(0), buffers={'moe_bias': variables['moe_bias']})
    ckpt = Checkpointer(tmp_path / 'checkpoints', keep=1, async_save=False)
    ckpt.save(1, state, config=config.to_dict())
    ckpt.close()
    _write_tokenizer(tmp_path / 'tok')
    loaded = loading.load(tmp_path, tokenizer=str(tmp_path / 'tok'))
    assert loaded.cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def test_load_hf_directory(tmp_path, models):
    from dsjax.interop import hf
    from dsjax.model.transformer import Transformer
    cfg, variables = models['dense']
    hf.save(Transformer(cfg), variables, tmp_path)
    _write_tokenizer(tmp_path)
    loaded = loading.load(tmp_path)
    np.testing.assert_array_equal(loaded.variables['params']['embed']['embedding'],
                                  variables['params']['embed']['embedding'])
    assert loaded.tokenizer.chat_template == TEMPLATE


def test_missing_model_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        loading.load(tmp_path / 'nothing')


def test_complete_texts(checkpoint):
    """What `python -m dsjax.generate` prints: each prompt ([bos] + its words) continued greedily."""
    loaded = loading.load(checkpoint / 'run')
    rows, stats = loading.complete(loaded, ['w1 w2 w3', 'w4'], max_new_tokens=4)
    assert stats is None and [r['prompt'] for r in rows] == ['w1 w2 w3', 'w4']
    want = decode.generate(loaded.cfg, loaded.variables, [[1, 9, 10, 11], [1, 12]], max_new_tokens=4, eos_id=2)
    for tokens, mask, r in zip(np.asarray(want.tokens), np.asarray(want.mask), rows):
        assert r['tokens'] == tokens[mask].tolist()
        assert r['completion'] == loaded.tokenizer.decode(r['tokens'])
    with pytest.raises(ValueError, match='speculative decoding is greedy'):
        loading.complete(loaded, ['w1'], speculative=True, sampling=SamplingConfig(temperature=1.0))


def test_chat_streams_and_keeps_the_conversation_cached(checkpoint):
    loaded = loading.load(checkpoint / 'run')
    session = chat.ChatSession(loaded, max_new_tokens=5, cache_length=64)
    pieces = []
    first = session.reply('w5 w6', emit=pieces.append)
    assert ''.join(pieces) == first and first
    prompt = chat.conversation_tokens(loaded.tokenizer, [{'role': 'user', 'content': 'w5 w6'}])
    want = decode.generate(loaded.cfg, loaded.variables, [prompt], max_new_tokens=5, eos_id=2)
    reply_ids = [int(t) for t, m in zip(np.asarray(want.tokens)[0], np.asarray(want.mask)[0]) if m and t != 2]
    assert first == loaded.tokenizer.decode(reply_ids)

    cached = list(session.cached)
    starts, prefill_from = [], session._prefill_from
    session._prefill_from = lambda tokens, start: (starts.append(start), prefill_from(tokens, start))[1]
    session.reply('w7')
    tokens = chat.conversation_tokens(loaded.tokenizer, session.messages[:-1])
    # The second turn extends what the cache holds, so only the new tokens are prefilled.
    assert tokens[:len(cached)] == cached and starts == [len(cached)]
    assert session.cached[:len(tokens)] == tokens
    session.reset()
    assert session.messages == [] and session.cached == []


def test_chat_refuses_a_conversation_past_the_cache(checkpoint):
    session = chat.ChatSession(loading.load(checkpoint / 'run'), cache_length=8,
                               sampling=SamplingConfig(temperature=0.5))
    with pytest.raises(ValueError, match=r'no longer fits the cache \(cache_length=8\)'):
        session.reply(' '.join(f'w{i}' for i in range(10)))
    assert session.messages == []


def test_render_plain_without_a_template():
    class Words:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [len(w) for w in text.split()]

    ids = chat.render_plain(Words(), [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'},
                                      {'role': 'user', 'content': 'abc'}])
    assert ids == [1, 5, 2, 10, 2, 2, 5, 3, 10]
