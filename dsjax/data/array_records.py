"""Tokenised corpora on disk: one ArrayRecord record per document, its token ids [bos] + tokens + [eos]
as little-endian int32 (so document boundaries survive), in numbered shards per split, with
dataset.json describing them. `python -m dsjax.data.prepare` writes them; `data.source='array_record'`
reads them through grain, each record fetched by index when the pipeline asks for it (host memory does
not grow with the corpus).
"""
import json
import pathlib

from array_record.python import array_record_module
from etils import epath
import grain
import numpy as np

from dsjax.data import corpus

DATASET_FILE = 'dataset.json'
RECORD_DTYPE = np.dtype('<i4')
# One record per group: grain reads records at random, and a larger group is decoded whole per record.
WRITER_OPTIONS = 'group_size:1'


def shard_name(split: str, index: int) -> str:
    return f'{split}-{index:05d}.array_record'


class _SplitWriter:
    """One split's records, in numbered shards of at most `per_shard` records."""

    def __init__(self, directory: pathlib.Path, split: str, per_shard: int):
        self.directory, self.split, self.per_shard = directory, split, per_shard
        self.documents = self.tokens = 0
        self.shards: list[str] = []
        self._writer = None

    def write(self, tokens_T) -> None:
        if self.documents % self.per_shard == 0:
            self.close()
            self.shards.append(shard_name(self.split, len(self.shards)))
            self._writer = array_record_module.ArrayRecordWriter(str(self.directory / self.shards[-1]),
                                                                 WRITER_OPTIONS)
        self._writer.write(np.asarray(tokens_T, RECORD_DTYPE).tobytes())
        self.documents += 1
        self.tokens += len(tokens_T)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_shards(directory, split_token_docs, *, per_shard: int = 65536) -> dict:
    """Writes (split, token ids [T]) pairs, one at a time, as shards in `directory`; returns each split's
    {'documents', 'tokens', 'shards'}."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(directory, split, per_shard) for split in corpus.SPLITS}
    try:
        for split, tokens_T in split_token_docs:
            writers[split].write(tokens_T)
    finally:
        for w in writers.values():
            w.close()
    return {s: dict(documents=w.documents, tokens=w.tokens, shards=w.shards) for s, w in writers.items()}


def read_meta(directory) -> dict:
    """DIR/dataset.json; a directory without one is an error naming it."""
    file = epath.Path(directory) / DATASET_FILE
    if not file.exists():
        raise corpus.DataError(f"data.paths: {str(directory)!r} holds no {DATASET_FILE}; write the shards with "
                               "python -m dsjax.data.prepare --input=... --output=DIR")
    return json.loads(file.read_text())


def source(paths, split: str, tokenizer) -> grain.sources.ArrayRecordDataSource:
    """The `split` shards of the dataset directories `paths` (data.paths), checked against `tokenizer`:
    the ids must mean what they meant when the shards were written."""
    if isinstance(paths, str):
        raise corpus.DataError(f"data.paths must be a tuple of dataset directories, got the string {paths!r}")
    files = []
    for directory in paths:
        meta = read_meta(directory)
        for key in ('vocab_size', 'bos_id', 'eos_id'):
            if meta[key] != getattr(tokenizer, key):
                raise corpus.DataError(
                    f"data.paths: {str(directory)!r} was tokenised with {key}={meta[key]} ({meta['tokenizer']}), "
                    f"but the configured tokenizer has {getattr(tokenizer, key)}: set data.tokenizer_path to the "
                    "tokenizer the shards were written with (the dataset directory holds a copy)")
        files += [str(epath.Path(directory) / name) for name in meta['splits'][split]['shards']]
    if not files:
        raise corpus.DataError(f"data.paths {tuple(paths)}: no {split} shards")
    return grain.sources.ArrayRecordDataSource(files)


def decode(record: bytes) -> np.ndarray:
    """A record's token ids [T] (int32)."""
    return np.frombuffer(record, RECORD_DTYPE).astype(np.int32, copy=False)
