"""Tests for dsjax/data/tokenizer.py: round trips, special ids, training, caching."""
import os
import pathlib
import pickle

import ml_collections
import numpy as np
import pytest

from dsjax.data import corpus
from dsjax.data import tokenizer as tokenizer_lib

VOCAB = 512


def small_stdlib_sample(max_chars: int = 300_000) -> list[str]:
    """The first stdlib files up to `max_chars`: real code, small enough to train in a blink."""
    texts, total = [], 0
    for path in corpus.stdlib_files():
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(model path, training texts) of one small model, trained once per session."""
    texts = small_stdlib_sample()
    prefix = str(tmp_path_factory.mktemp("spm") / "small")
    return tokenizer_lib.train_sentencepiece(texts, VOCAB, prefix), texts


@pytest.fixture(scope="session")
def tok(trained):
    return tokenizer_lib.SentencePieceTokenizer(trained[0])


def text_config(tmp_path: pathlib.Path, **overrides):
    cfg = ml_collections.ConfigDict(
        dict(source="text",
             paths=(str(tmp_path / "corpus" / "*.txt"), ),
             jsonl_field="text",
             val_fraction=0.2,
             max_doc_chars=10_000,
             tokenizer="sentencepiece",
             tokenizer_path="",
             vocab_size=300,
             cache_dir=str(tmp_path / "cache"),
             fim_rate=0.0))
    cfg.update(overrides)
    return cfg


def write_corpus(tmp_path: pathlib.Path, extra: str = "") -> None:
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(f"def function_{i}(x):\n    return x * {i}{extra}\n" * 5)


ROUND_TRIP_CASES = [
    "",
    "hello world",
    "def f(x):\n\treturn  x   +  1\n\n",
    "  leading and trailing spaces  ",
    "Ünïcödé, ελληνικά, русский, 日本語のテキスト, العربية",
    "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧 done",
    "control \x00\x01\x7f\r\n\x0b\x0c chars",
    "sentencepiece meta space \u2581 and \u2581\u2581 twice",
    "\u2581",
]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.pad_id not in ids and 1 not in ids  # Never padding, never <unk>.


def test_round_trip_of_arbitrary_bytes(tok):
    rng = np.random.default_rng(0)
    for _ in range(50):
        text = rng.bytes(int(rng.integers(0, 200))).decode("utf-8", errors="replace")
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert min(ids, default=tok.vocab_size) > 1 and max(ids, default=0) < tok.vocab_size


def test_round_trip_of_arbitrary_code_points(tok):
    rng = np.random.default_rng(1)
    # Every code point except surrogates, which cannot appear in valid UTF-8.
    points = np.concatenate([np.arange(0, 0xD800), np.arange(0xE000, 0x110000)])
    for _ in range(50):
        text = "".join(map(chr, rng.choice(points, size=int(rng.integers(1, 60)))))
        assert tok.decode(tok.encode(text)) == text


def test_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert tok.pad_id == 0
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    assert 0 < tok.bos_id < VOCAB and 0 < tok.eos_id < VOCAB
    ids = tok.encode("x = 1")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "x = 1"
    assert tok.decode(np.asarray([tok.bos_id, *ids], np.int32)) == "x = 1"


def test_compresses_code(tok, trained):
    text = trained[1][0]
    # Only ~250 merges at this vocab size, yet well under one token per byte.
    assert len(tok.encode(text)) < 0.7 * len(text.encode("utf-8"))


def test_training_is_deterministic(trained, tmp_path):
    path, texts = trained
    again = tokenizer_lib.train_sentencepiece(texts, VOCAB, str(tmp_path / "again"))
    assert pathlib.Path(again).read_bytes() == pathlib.Path(path).read_bytes()


def test_pickles(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("héllo 😀") == tok.encode("héllo 😀")


def test_get_tokenizer_trains_once_and_caches(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    calls = []
    real_train = tokenizer_lib.train_sentencepiece

    def counting_train(*args, **kwargs):
        calls.append(args[1:])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", counting_train)
    cfg = text_config(tmp_path)
    first = tokenizer_lib.get_tokenizer(cfg)
    mtime = os.stat(first.model_path).st_mtime_ns
    second = tokenizer_lib.get_tokenizer(cfg)
    assert len(calls) == 1
    assert second.model_path == first.model_path
    assert os.stat(second.model_path).st_mtime_ns == mtime
    assert first.model_path.startswith(str(tmp_path / "cache"))
    assert second.encode("def function_3(x):") == first.encode("def function_3(x):")
    # The cache holds only the finished model: no temporary files left behind.
    assert [p.name
            for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [os.path.basename(first.model_path)]

    # A changed corpus or vocab size is a different key, so it trains again.
    write_corpus(tmp_path, extra=" + 1")
    changed = tokenizer_lib.get_tokenizer(cfg)
    resized = tokenizer_lib.get_tokenizer(text_config(tmp_path, vocab_size=290))
    assert len(calls) == 3
    assert len({first.model_path, changed.model_path, resized.model_path}) == 3
    assert resized.vocab_size == 290


def test_default_cache_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSJAX_CACHE", str(tmp_path / "env_cache"))
    assert tokenizer_lib.cache_dir(text_config(tmp_path, cache_dir="")) == str(tmp_path / "env_cache")
    assert tokenizer_lib.cache_dir(text_config(tmp_path)) == str(tmp_path / "cache")


def test_crash_while_writing_leaves_no_model(tmp_path, monkeypatch):
    write_corpus(tmp_path)

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        tokenizer_lib.get_tokenizer(text_config(tmp_path))
    assert list((tmp_path / "cache" / "tokenizers").iterdir()) == []


def test_tokenizer_path(trained, tmp_path):
    cfg = text_config(tmp_path, tokenizer_path=trained[0])
    assert tokenizer_lib.get_tokenizer(cfg).model_path == trained[0]
    cfg = text_config(tmp_path, tokenizer_path=str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match=r"data\.tokenizer_path=.*nope\.model.*does not exist"):
        tokenizer_lib.get_tokenizer(cfg)


def test_bad_tokenizer_config_names_the_field(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(ValueError, match=r"data\.tokenizer must be 'sentencepiece'"):
        tokenizer_lib.get_tokenizer(text_config(tmp_path, tokenizer="tiktoken"))
    with pytest.raises(ValueError, match=r"data\.vocab_size=100000: .*Vocabulary size too high"):
        tokenizer_lib.get_tokenizer(text_config(tmp_path, vocab_size=100_000))
