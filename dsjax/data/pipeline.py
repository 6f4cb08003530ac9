"""Grain pipelines: documents -> tokens -> packed rows with segment ids -> per-host batches.

Packing concatenates documents ([bos] + tokens + [eos] each) into one stream
and cuts it into rows of seq_len + 1 tokens (inputs = row[:-1], targets =
row[1:]). Consecutive rows overlap by one token: the last token of row r, which
is only a target there, is the first input of row r + 1. So every next-token
pair inside a document is trained exactly once and nothing is dropped; a
document that does not fit continues in the next row as a new segment whose
positions restart at 0. Padding (id 0, segment 0, weight 0) only appears at the
end of a finite stream, i.e. in evaluation batches.

Per host: training documents are dealt round-robin to hosts (host p reads
documents p, p + P, ...: grain's index slicing, so an ArrayRecord corpus is
read record by record, never whole), and hosts never read the same data. Evaluation
batches are packed identically on every host and each host keeps its slice of
the rows, so all hosts agree on the number of batches.

With data.document_mask=False a row is packed the same way but is one
sequence, as V3 pre-trained: one segment, positions 0..seq_len-1, every token
attends to the earlier documents of its row, and each next-token pair counts,
across document boundaries too. With data.fim_rate > 0 that share of the
training documents is rearranged for fill-in-the-middle first (dsjax/data/fim.py).
"""
import collections
import copy
import math
from typing import Any, Iterable, Iterator, Sequence

import grain
import numpy as np

from dsjax.data import array_records, batch_ramp, corpus, fim
from dsjax.data.tokenizer import Tokenizer

FIELDS = ("inputs", "targets", "segment_ids", "positions", "weights")
# Tokenisation runs in grain's prefetch threads; sentencepiece releases the GIL while encoding.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def pack_documents(token_lists: Iterable[Sequence[int]], seq_len: int, document_mask: bool = True) -> Iterator[dict]:
    """Packs token lists (each already [bos, ..., eos]) into rows; see the module docstring.

  Args:
    token_lists: documents as token ids, in packing order.
    seq_len: tokens per row of inputs.
    document_mask: each document its own segment (True), or the row one sequence (False).

  Yields:
    One dict per row with FIELDS as numpy arrays of shape [seq_len]; the last
    row is padded.
  """
    packer = _RowPacker(seq_len, document_mask=document_mask)
    for tokens in token_lists:
        packer.add(tokens)
        while packer.ready():
            yield packer.pop_row()
    while packer.ready(final=True):
        yield packer.pop_row()


def make_train_iterator(data_cfg,
                        tokenizer: Tokenizer,
                        *,
                        process_index: int = 0,
                        process_count: int = 1,
                        micro_batches: int = 1) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over this host's training batches.

  Args:
    data_cfg: the `config.data` section.
    tokenizer: encodes the documents.
    process_index: this host's index, in [0, process_count).
    process_count: the number of hosts; must divide `data.batch_size`.
    micro_batches: train.micro_batches; with V3's batch ramp (data.batch_ramp_start > 0) a step's rows fill
      its first micro-batches and the rest are padding (micro-batch m holds rows m, m + M, ...).

  Returns:
    A grain DatasetIterator (get_state/set_state) yielding dicts of FIELDS,
    each [data.batch_size // process_count, data.seq_len]. Host p's documents
    are shuffled with seed data.shuffle_seed + epoch and repeat forever; the packed rows are
    shuffled again within windows of data.shuffle_window rows, so that one batch mixes many
    documents rather than holding a few consecutive pieces of one file.
  """
    rows_per_host = _rows_per_host(data_cfg, process_index, process_count)
    if not 0 <= data_cfg.shuffle_seed < 2**32:
        raise corpus.DataError(f"data.shuffle_seed must be in [0, 2**32), got {data_cfg.shuffle_seed!r}")
    docs = token_documents(data_cfg, tokenizer, "train")[process_index::process_count]
    if not len(docs):
        raise corpus.DataError(
            f"host {process_index} of {process_count} has no training documents; data.paths "
            f"{tuple(data_cfg.paths)} with data.val_fraction={data_cfg.val_fraction} leaves too few")
    # grain's shuffle seeds epoch e with shuffle_seed + e once repeated past one epoch.
    tokens = docs.shuffle(seed=data_cfg.shuffle_seed).repeat()
    if data_cfg.fim_rate > 0:
        sentinels, rate = fim.sentinel_ids(tokenizer), data_cfg.fim_rate
        # The generator is seeded by the element's index, so a resumed run cuts the same documents alike.
        tokens = tokens.random_map(lambda doc, rng: fim.psm_document(doc, rng, sentinels) if rng.random() < rate
                                   else doc, seed=data_cfg.shuffle_seed)
    rows = _PackIterDataset(tokens.to_iter_dataset(_READ_OPTIONS), data_cfg.seq_len, data_cfg.document_mask)
    if data_cfg.shuffle_window > 1:
        # Checkpointable: the state is the packer's state at the window's start plus the position in it.
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data_cfg.shuffle_window,
                                                           seed=data_cfg.shuffle_seed)
    if not data_cfg.batch_ramp_start:
        return iter(rows.batch(rows_per_host))
    if rows_per_host % micro_batches:
        raise corpus.DataError(f"the batch ramp needs each host's data.batch_size / {process_count} = {rows_per_host} "
                               f"rows to split into train.micro_batches={micro_batches}")
    return _RampBatchIterator(iter(rows), batch_ramp.from_config(data_cfg, micro_batches), rows_per_host,
                              micro_batches, data_cfg.seq_len)


def make_eval_batches(data_cfg,
                      tokenizer: Tokenizer,
                      *,
                      num_batches: int,
                      process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
    """The fixed validation batches for this host: the same on every call.

  Returns up to `num_batches` batches of FIELDS, each [data.batch_size //
  process_count, data.seq_len]; fewer when the validation split is smaller.
  The last batch is padded with weight-0 rows if the split runs out.
  """
    rows_per_host = _rows_per_host(data_cfg, process_index, process_count)
    if num_batches < 1:
        raise corpus.DataError(f"num_batches must be at least 1, got {num_batches}")
    docs = token_documents(data_cfg, tokenizer, "validation")
    if not len(docs):
        raise corpus.DataError(
            f"the validation split is empty: raise data.val_fraction (now {data_cfg.val_fraction}) "
            f"or add documents to data.paths")
    wanted = num_batches * data_cfg.batch_size
    rows = []
    # Documents are read and tokenised lazily, so only what the batches need is touched.
    for row in pack_documents((docs[i] for i in range(len(docs))), data_cfg.seq_len, data_cfg.document_mask):
        rows.append(row)
        if len(rows) == wanted:
            break
    num_batches = math.ceil(len(rows) / data_cfg.batch_size)
    rows.extend([_empty_row(data_cfg.seq_len)] * (num_batches * data_cfg.batch_size - len(rows)))
    start = process_index * rows_per_host
    batches = []
    for b in range(num_batches):
        global_rows = rows[b * data_cfg.batch_size:(b + 1) * data_cfg.batch_size]
        batches.append(_stack(global_rows[start:start + rows_per_host]))
    return batches


def tokenize_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """[bos] + encode(text) + [eos] as int32."""
    return np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)


def token_documents(data_cfg, tokenizer: Tokenizer, split: str) -> grain.MapDataset:
    """The documents of `split` as token ids ([bos] + tokens + [eos]), read and tokenised on access: an
    ArrayRecord corpus (data.source='array_record') record by record, the others from their document list."""
    if data_cfg.source == "array_record":
        return grain.MapDataset.source(array_records.source(data_cfg.paths, split, tokenizer)).map(
            array_records.decode)
    docs = corpus.load_documents(data_cfg, split)
    return grain.MapDataset.source(docs).map(lambda doc: tokenize_document(tokenizer, doc.text))


def _rows_per_host(data_cfg, process_index: int, process_count: int) -> int:
    """data.batch_size // process_count, after checking the host layout and shapes."""
    if not 0 <= process_index < process_count:
        raise corpus.DataError(f"process_index must be in [0, {process_count}), got {process_index}")
    if data_cfg.seq_len < 1:
        raise corpus.DataError(f"data.seq_len must be positive, got {data_cfg.seq_len!r}")
    if data_cfg.batch_size < 1 or data_cfg.batch_size % process_count:
        raise corpus.DataError(f"data.batch_size={data_cfg.batch_size!r} must be a positive multiple of the "
                               f"process count {process_count}")
    return data_cfg.batch_size // process_count


def _stack(rows: list[dict]) -> dict:
    """Stacks per-row dicts into one batch dict of [rows, seq_len] arrays."""
    return {k: np.stack([row[k] for row in rows]) for k in FIELDS}


def _empty_row(seq_len: int) -> dict:
    """A padding row: contributes nothing to any loss."""
    return {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in FIELDS}


class _RowPacker:
    """Incremental packer; documents carry an opaque tag (the pipeline's resume point)."""

    def __init__(self, seq_len: int, offset: int = 0, document_mask: bool = True):
        self.seq_len = seq_len
        self.document_mask = document_mask
        # (tokens_T, tag) for documents not yet fully consumed; the next row starts
        # at pending[0].tokens[offset].
        self.pending = collections.deque()
        self.offset = offset
        self._available = 0  # Tokens in `pending` from the start of the next row.

    def add(self, tokens: Sequence[int], tag: Any = None) -> None:
        tokens_T = np.asarray(tokens, np.int32)
        if not self.pending:
            # `offset` may be set ahead of the first document, when resuming inside it.
            self._available = -self.offset
        self.pending.append((tokens_T, tag))
        self._available += len(tokens_T)

    def ready(self, final: bool = False) -> bool:
        """A full row is available, or (at the end) at least one input/target pair is left."""
        return self._available >= (2 if final else self.seq_len + 1)

    def head(self) -> tuple[Any, int]:
        """(tag of the document the next row starts in, token offset into it)."""
        return self.pending[0][1], self.offset

    def pop_row(self) -> dict:
        """Builds the next row and advances the stream by seq_len tokens."""
        width = self.seq_len + 1
        row_tokens = np.zeros(width, np.int32)
        segment = np.zeros(width, np.int32)
        position = np.zeros(width, np.int32)
        filled, start = 0, self.offset
        for segment_id, (tokens_T, _) in enumerate(self.pending, start=1):
            take = min(len(tokens_T) - start, width - filled)
            row_tokens[filled:filled + take] = tokens_T[start:start + take]
            segment[filled:filled + take] = segment_id
            position[filled:filled + take] = np.arange(take)
            filled += take
            start = 0
            if filled == width:
                break
        self._advance(self.seq_len)
        if not self.document_mask:  # the row is one sequence: one segment, row positions
            segment = (segment != 0).astype(np.int32)
            position = np.where(segment != 0, np.arange(width, dtype=np.int32), 0)
        inputs_segment = segment[:-1]
        # A target counts only if it is the next token of the same segment (the same document, or the row).
        weights = (inputs_segment != 0) & (inputs_segment == segment[1:])
        return {
            "inputs": row_tokens[:-1],
            "targets": row_tokens[1:],
            "segment_ids": inputs_segment,
            "positions": position[:-1],
            "weights": weights.astype(np.float32),
        }

    def _advance(self, n: int) -> None:
        """Moves the row start n tokens on, dropping documents left behind."""
        self._available -= n
        self.offset += n
        while self.pending and self.offset >= len(self.pending[0][0]):
            self.offset -= len(self.pending.popleft()[0])
        if not self.pending:
            self.offset, self._available = 0, 0


class _PackIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into rows, resumable from a saved state."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, document_mask: bool = True):
        super().__init__(parent)
        self._seq_len = seq_len
        self._document_mask = document_mask

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._document_mask)

    def __str__(self) -> str:
        return f"_PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):
    """State = the parent's state before the document the next row starts in, plus the offset."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, document_mask: bool = True):
        super().__init__(parent)
        self._packer = _RowPacker(seq_len, document_mask=document_mask)

    def __next__(self) -> dict:
        while not self._packer.ready():
            # Tag each document with the parent state that re-reads it, so get_state is exact.
            before = copy.deepcopy(self._parent.get_state())
            self._packer.add(next(self._parent), tag=before)
        return self._packer.pop_row()

    def get_state(self) -> dict:
        if self._packer.pending:
            parent_state, offset = self._packer.head()
        else:
            parent_state, offset = self._parent.get_state(), self._packer.offset
        return {"parent": parent_state, "offset": int(offset)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._packer = _RowPacker(self._packer.seq_len, offset=state["offset"], document_mask=self._packer.document_mask)


class _RampBatchIterator(grain.DatasetIterator):
    """This host's batches under V3's batch ramp: each step takes its share of the ramp's rows from the packed
    stream and lays them into the micro-batches the step computes (rows r with r % M < k, k the ramp's
    micro-batches that step), padding the rest, which the step skips. State: the rows' state and the step."""

    def __init__(self, parent: grain.DatasetIterator, ramp, rows_per_host: int, micro_batches: int, seq_len: int):
        super().__init__(parent)
        self._ramp, self._rows, self._micro, self._seq_len = ramp, rows_per_host, micro_batches, seq_len
        self._step = 0

    def __next__(self) -> dict:
        active = self._ramp.batch_size(self._step) * self._micro // self._ramp.end
        rows = [_empty_row(self._seq_len)] * self._rows
        for slot in range(self._rows):
            if slot % self._micro < active:
                rows[slot] = next(self._parent)
        self._step += 1
        return _stack(rows)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "step": self._step}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._step = state["step"]
