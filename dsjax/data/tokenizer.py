"""Tokenizers: the interface the pipeline needs, sentencepiece, and train-once caching."""
import hashlib
import io
import json
import os
import pathlib
import random
import tempfile
import time
from typing import Iterable, Protocol, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from dsjax.data import corpus
from dsjax.data import fim
from dsjax.data import hf_tokenizer
from dsjax.interop import hub

# Bump when the training recipe below changes, so cached models are retrained.
TRAINER_VERSION = 1
# Training sees a bounded, deterministic sample, so time stays well under a minute.
SAMPLE_CHARS = 4_000_000
_CHUNK_CHARS = 1_000
_MAX_CHUNK_CHARS = 8_000
# sentencepiece maps U+2581 to its whitespace meta-symbol, which decodes as ' '.
_META_SPACE = "\u2581"
# Fixed ids: pad is 0 and never produced by encode; unk is never produced either (byte fallback).
_PAD_ID, _UNK_ID, _BOS_ID, _EOS_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"  # a sentencepiece model's name in a HF-style directory


class Tokenizer(Protocol):
    """What the data pipeline and the model need from a tokenizer."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        ...

    def decode(self, ids: Sequence[int]) -> str:
        ...

    def token_id(self, token: str) -> int | None:
        """The id of one whole vocabulary entry (a special or user-defined token), None if absent."""
        ...


class SentencePieceTokenizer:
    """A sentencepiece model; id 0 is padding, never a real token."""

    def __init__(self, model_path):
        self.model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # Padding is id 0 whatever the model calls it, so it must not be a token encode can produce.
        self.pad_id = 0
        if not (self._sp.is_control(0) or self._sp.is_unknown(0) or self._sp.is_unused(0)):
            raise corpus.DataError(f"data.tokenizer_path={self.model_path!r}: id 0 is the real piece "
                                   f"{self._sp.id_to_piece(0)!r}, but dsjax pads with id 0; use a model whose "
                                   "id 0 is <pad>, <unk> or another control piece")
        if self.bos_id < 0 or self.eos_id < 0:
            raise corpus.DataError(f"data.tokenizer_path={self.model_path!r}: the model needs bos and eos ids "
                                   f"(got bos_id={self.bos_id}, eos_id={self.eos_id})")
        bytes_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SPACE.encode("utf-8")]
        # Without byte pieces a literal U+2581 cannot round-trip; it then encodes as a space.
        self._meta_space_ids = bytes_ids if all(self._sp.is_byte(i) for i in bytes_ids) else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        if _META_SPACE not in text or self._meta_space_ids is None:
            return self._sp.encode(text)
        # Spell each literal U+2581 as its three UTF-8 byte pieces, which decode to U+2581 itself.
        ids = []
        for k, part in enumerate(text.split(_META_SPACE)):
            if k:
                ids.extend(self._meta_space_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; pad, bos and eos decode to nothing."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def token_id(self, token: str) -> int | None:
        """The id of the piece `token` (a user-defined symbol such as a FIM sentinel), None if absent."""
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def piece(self, token_id: int) -> str:
        """The piece (token text) of `token_id`, e.g. '<s>'."""
        return self._sp.id_to_piece(token_id)

    def __reduce__(self):
        # Rebuild from the file, so the tokenizer can cross process boundaries (e.g. grain workers).
        return (SentencePieceTokenizer, (self.model_path, ))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_prefix: str,
                        user_defined_symbols: Sequence[str] = ()) -> str:
    """Trains a byte-fallback BPE model on a bounded sample of `texts`.

  Args:
    texts: the training documents; they are streamed, and a deterministic
      sample of at most `SAMPLE_CHARS` characters is kept.
    vocab_size: the number of pieces, including pad/unk/bos/eos and the 256
      byte pieces.
    out_prefix: the model is written to `out_prefix + '.model'`, atomically.
    user_defined_symbols: pieces that always encode as one token (the FIM sentinels).

  Returns:
    The path of the written model. The same texts and vocab_size always give a
    byte-identical model.
  """
    sample = _sample_chunks(texts, SAMPLE_CHARS)
    if not sample:
        raise corpus.DataError("cannot train a tokenizer: the training texts are empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Identity normalisation, no dummy prefix, kept whitespace: decode(encode(s)) == s.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # Indentation runs become single pieces.
            split_digits=True,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=_PAD_ID,
            unk_id=_UNK_ID,
            bos_id=_BOS_ID,
            eos_id=_EOS_ID,
            max_sentence_length=4 * _MAX_CHUNK_CHARS,  # Bytes; UTF-8 takes at most 4 per char.
            shuffle_input_sentence=False,  # The sample is already fixed; keep training deterministic.
            num_threads=2,
            minloglevel=2,
            user_defined_symbols=list(user_defined_symbols),
        )
    except RuntimeError as e:
        raise corpus.DataError(f"sentencepiece training failed for vocab_size={vocab_size}: {e}") from e
    path = pathlib.Path(out_prefix + ".model")
    _write_atomically(path, model.getvalue())
    return str(path)


def from_path(path) -> Tokenizer:
    """A sentencepiece .model file, a HF tokenizer.json, or a directory holding either (tokenizer.json
    first, else a sentencepiece tokenizer.model, as hf.save and dsjax.data.prepare write them)."""
    path = str(path)
    directory = pathlib.Path(path)
    if directory.is_dir() and not (directory / hf_tokenizer.TOKENIZER_FILE).exists():
        if (directory / SENTENCEPIECE_FILE).is_file():
            path = str(directory / SENTENCEPIECE_FILE)
    if path.endswith(".model"):
        if not os.path.isfile(path):
            raise corpus.DataError(f"tokenizer {path!r} does not exist (a sentencepiece .model file)")
        return SentencePieceTokenizer(path)
    return hf_tokenizer.HFTokenizer(path)


def get_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer of `config.data`: loaded from `data.tokenizer_path`, else trained once and cached.

    `data.tokenizer='hf'` reads a HF tokenizer.json (or a checkpoint directory holding one, or a Hub id: its
    tokenizer files are downloaded once) with its special tokens and chat template. For sentencepiece, the cache key covers the source, paths,
    vocab size and a fingerprint of the training split's content, so a changed corpus gets a new model.
    """
    if data_cfg.tokenizer == "hf":
        return hf_tokenizer.HFTokenizer(hub.resolve(data_cfg.tokenizer_path, "data.tokenizer_path",
                                                    hub.TOKENIZER_PATTERNS))
    if data_cfg.tokenizer != "sentencepiece":
        raise corpus.DataError(f"data.tokenizer must be 'sentencepiece' or 'hf', got {data_cfg.tokenizer!r}")
    if data_cfg.tokenizer_path:
        path = data_cfg.tokenizer_path
        if os.path.isdir(path):  # a HF-style or dataset directory holding the model
            path = os.path.join(path, SENTENCEPIECE_FILE)
        if not os.path.isfile(path):
            raise corpus.DataError(
                f"data.tokenizer_path={data_cfg.tokenizer_path!r} does not exist; give an existing "
                f"sentencepiece .model file (or a directory holding {SENTENCEPIECE_FILE}), or '' to train one on "
                "the corpus")
        return SentencePieceTokenizer(path)
    docs = corpus.load_documents(data_cfg, "train")
    key = _cache_key(data_cfg, docs)
    prefix = os.path.join(cache_dir(data_cfg), "tokenizers", f"spm_{data_cfg.vocab_size}_{key}")
    if not os.path.isfile(prefix + ".model"):
        logging.info("Training a sentencepiece tokenizer (vocab %d) into %s.model", data_cfg.vocab_size,
                     prefix)
        start = time.perf_counter()
        try:
            train_sentencepiece((d.text for d in docs), data_cfg.vocab_size, prefix, _user_symbols(data_cfg))
        except ValueError as e:
            raise corpus.DataError(f"data.vocab_size={data_cfg.vocab_size}: {e}") from e
        logging.info("Trained the tokenizer in %.1f s", time.perf_counter() - start)
    return SentencePieceTokenizer(prefix + ".model")


def cache_dir(data_cfg) -> str:
    """`data.cache_dir`, or the user's dsjax cache."""
    if data_cfg.cache_dir:
        return os.path.expanduser(data_cfg.cache_dir)
    return default_cache_dir()


def default_cache_dir() -> str:
    """$DSJAX_CACHE, or ~/.cache/dsjax."""
    return os.environ.get("DSJAX_CACHE", os.path.expanduser("~/.cache/dsjax"))


def _user_symbols(data_cfg) -> tuple[str, ...]:
    """Pieces the model must hold whole: the FIM sentinels when FIM is on (else none, so models trained
    without FIM keep their ids)."""
    return fim.FIM_TOKENS if data_cfg.fim_rate > 0 else ()


def _cache_key(data_cfg, docs: list[corpus.Document]) -> str:
    """A short hash of what determines the trained model."""
    content = hashlib.sha256()
    for doc in docs:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8", errors="surrogatepass")
            content.update(len(data).to_bytes(8, "little"))  # Length-prefixed: no ambiguous joins.
            content.update(data)
    identity = json.dumps(
        {
            "trainer": TRAINER_VERSION,
            "source": data_cfg.source,
            "paths": [] if data_cfg.source == "stdlib" else [str(p) for p in data_cfg.paths],
            "vocab_size": data_cfg.vocab_size,
            "corpus": content.hexdigest(),
            **({"user_symbols": list(_user_symbols(data_cfg))} if _user_symbols(data_cfg) else {}),
        },
        sort_keys=True)
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


def _sample_chunks(texts: Iterable[str], max_chars: int) -> list[str]:
    """A deterministic, uniform sample of line-aligned chunks totalling about `max_chars`."""
    # Reservoir sampling streams the corpus once, whatever its size, in O(sample) memory.
    capacity = max(1, max_chars // _CHUNK_CHARS)
    rng = random.Random(0)
    reservoir = []
    seen = 0
    for text in texts:
        for chunk in _line_chunks(text):
            if len(reservoir) < capacity:
                reservoir.append(chunk)
            else:
                slot = rng.randrange(seen + 1)
                if slot < capacity:
                    reservoir[slot] = chunk
            seen += 1
    return reservoir


def _line_chunks(text: str) -> Iterable[str]:
    """Consecutive whole lines grouped to about `_CHUNK_CHARS` characters."""
    chunk = []
    size = 0
    for line in text.splitlines(keepends=True):
        chunk.append(line[:_MAX_CHUNK_CHARS])
        size += len(chunk[-1])
        if size >= _CHUNK_CHARS:
            yield "".join(chunk)[:_MAX_CHUNK_CHARS]
            chunk, size = [], 0
    if chunk and "".join(chunk).strip():
        yield "".join(chunk)


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file and a rename, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
