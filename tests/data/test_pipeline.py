"""Tests for dsjax/data/pipeline.py: packing semantics, resumable iteration, host shards, eval."""
import json
import pathlib
import re

import ml_collections
import numpy as np
import pytest

from dsjax.data import corpus
from dsjax.data import pipeline
from dsjax.data import tokenizer as tokenizer_lib

SEQ_LEN = 32
NUM_DOCS = 30


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A small sentencepiece model trained once per session on a few stdlib files."""
    texts = []
    for path in corpus.stdlib_files()[:40]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    prefix = str(tmp_path_factory.mktemp("spm") / "pipeline")
    return tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 512, prefix))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """NUM_DOCS text files 'doc<i>' of varied length; some span several rows."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(NUM_DOCS):
        words = " ".join(f"w{int(w)}" for w in rng.integers(0, 50, size=int(rng.integers(1, 30))))
        (root / f"doc{i:02d}.txt").write_text(f"<doc{i:02d}> {words}\n")
    return root


def data_config(corpus_dir: pathlib.Path, **overrides):
    cfg = ml_collections.ConfigDict(
        dict(source="text",
             paths=(str(corpus_dir / "*.txt"), ),
             jsonl_field="text",
             val_fraction=0.2,
             seq_len=SEQ_LEN,
             batch_size=4,
             tokenizer="sentencepiece",
             tokenizer_path="",
             vocab_size=512,
             cache_dir="",
             shuffle_seed=0,
             shuffle_window=1,  # Stream order, so tests can read documents back in order.
             max_doc_chars=10_000,
             fim_rate=0.0,
             document_mask=True,
             batch_ramp_start=0,
             batch_ramp_tokens=0.0))
    cfg.update(overrides)
    return cfg


def doc_ids_in_order(batches, tok) -> list[int]:
    """The documents that start in `batches`, in stream order, read from their '<docNN>' prefix."""
    # Consecutive rows overlap by one token, so their inputs chain into the packed stream.
    stream = np.concatenate([row for batch in batches for row in batch["inputs"]])
    starts = list(np.flatnonzero(stream == tok.bos_id)) + [len(stream)]
    found = []
    for start, end in zip(starts[:-1], starts[1:]):
        match = re.match(r"<doc(\d+)>", tok.decode(stream[start:end]))
        assert match or end == len(stream), "only the last document may be cut off"
        if match:
            found.append(int(match.group(1)))
    return found


def test_pack_documents_hand_computed():
    docs = [[2, 10, 11, 3], [2, 20, 21, 22, 23, 24, 3], [2, 30, 3]]
    rows = list(pipeline.pack_documents(docs, seq_len=4))
    # The stream 2 10 11 3 | 2 20 21 22 23 24 3 | 2 30 3 in rows of 5 tokens, each
    # row starting at the previous row's last token.
    expected = [
        dict(inputs=[2, 10, 11, 3],
             targets=[10, 11, 3, 2],
             segment_ids=[1, 1, 1, 1],
             positions=[0, 1, 2, 3],
             weights=[1, 1, 1, 0]),
        # The second document continues past the row: it restarts as segment 1 at position 0.
        dict(inputs=[2, 20, 21, 22],
             targets=[20, 21, 22, 23],
             segment_ids=[1, 1, 1, 1],
             positions=[0, 1, 2, 3],
             weights=[1, 1, 1, 1]),
        dict(inputs=[23, 24, 3, 2],
             targets=[24, 3, 2, 30],
             segment_ids=[1, 1, 1, 2],
             positions=[0, 1, 2, 0],
             weights=[1, 1, 0, 1]),
        # The stream ends: padding is token 0, segment 0, weight 0.
        dict(inputs=[30, 3, 0, 0],
             targets=[3, 0, 0, 0],
             segment_ids=[1, 1, 0, 0],
             positions=[0, 1, 0, 0],
             weights=[1, 0, 0, 0]),
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert set(row) == set(pipeline.FIELDS)
        for key, value in want.items():
            np.testing.assert_array_equal(row[key], value, err_msg=key)
        assert row["weights"].dtype == np.float32 and row["inputs"].dtype == np.int32


def test_pack_documents_exact_fit_adds_no_empty_row():
    rows = list(pipeline.pack_documents([[2, 5, 3], [2, 3]], seq_len=4))
    assert len(rows) == 1
    np.testing.assert_array_equal(rows[0]["targets"], [5, 3, 2, 3])
    np.testing.assert_array_equal(rows[0]["inputs"], [2, 5, 3, 2])
    np.testing.assert_array_equal(rows[0]["weights"], [1, 1, 0, 1])


def test_pack_documents_trains_every_pair_exactly_once():
    rng = np.random.default_rng(0)
    docs = [[2, *rng.integers(4, 100, size=int(rng.integers(0, 30))), 3] for _ in range(50)]
    for seq_len in (1, 3, 8, 64):
        rows = list(pipeline.pack_documents(docs, seq_len))
        # Weighted (input, target) pairs, in order, are exactly each document's consecutive pairs.
        trained = [(int(r["inputs"][i]), int(r["targets"][i])) for r in rows
                   for i in np.flatnonzero(r["weights"])]
        assert trained == [(d[i], d[i + 1]) for d in docs for i in range(len(d) - 1)]
        for r in rows:
            # With seq_len 1 a row may hold just an [eos, bos] crossing; longer rows always train.
            assert r["weights"].any() or seq_len == 1
            real = r["segment_ids"] > 0
            # Padding only at the end; segment ids count up from 1; positions count within a segment.
            assert not real[np.argmin(real):].any() or real.all()
            np.testing.assert_array_equal(np.unique(r["segment_ids"][real]),
                                          np.arange(1, r["segment_ids"].max() + 1))
            for s in np.unique(r["segment_ids"][real]):
                np.testing.assert_array_equal(r["positions"][r["segment_ids"] == s],
                                              np.arange(np.sum(r["segment_ids"] == s)))


def test_train_batches_shapes_and_dtypes(corpus_dir, tok):
    batch = next(pipeline.make_train_iterator(data_config(corpus_dir), tok))
    assert set(batch) == set(pipeline.FIELDS)
    for key, value in batch.items():
        assert value.shape == (4, SEQ_LEN), key
        assert value.dtype == (np.float32 if key == "weights" else np.int32), key
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["weights"].sum() > 0.9 * batch["weights"].size  # The stream never pads.


@pytest.mark.parametrize("window", [1, 8])
def test_resume_from_saved_state_matches_uninterrupted_run(corpus_dir, tok, window):
    cfg = data_config(corpus_dir, shuffle_window=window)
    uninterrupted = pipeline.make_train_iterator(cfg, tok)
    for _ in range(3):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # As Orbax stores it.
    expected = [next(uninterrupted) for _ in range(20)]
    # The replayed stretch crosses into the second epoch (documents are counted across epochs).
    num_train = len(corpus.load_documents(cfg, "train"))
    if window == 1:
        assert uninterrupted.get_state()["parent"]["next_index"] > num_train
    resumed = pipeline.make_train_iterator(cfg, tok)
    next(resumed)  # Its own position must not matter.
    resumed.set_state(state)
    assert resumed.get_state() == state
    for want in expected:
        got = next(resumed)
        for key in pipeline.FIELDS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_rows_are_shuffled_within_windows(corpus_dir, tok):
    """Each window of rows is a permutation of the same stretch of the packed stream."""
    window, rows_per_batch = 8, 4
    stream = pipeline.make_train_iterator(data_config(corpus_dir), tok)
    shuffled = pipeline.make_train_iterator(data_config(corpus_dir, shuffle_window=window), tok)
    for _ in range(3):
        want = np.concatenate([next(stream)["inputs"] for _ in range(window // rows_per_batch)])
        got = np.concatenate([next(shuffled)["inputs"] for _ in range(window // rows_per_batch)])
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
        assert not np.array_equal(got, want)


def test_epochs_repeat_every_document_and_reshuffle(corpus_dir, tok):
    cfg = data_config(corpus_dir)
    train_ids = {int(d.name[3:5]) for d in corpus.load_documents(cfg, "train")}
    n = len(train_ids)
    iterator = pipeline.make_train_iterator(cfg, tok)
    batches = [next(iterator)]
    while len(doc_ids_in_order(batches, tok)) <= 2 * n:
        batches.append(next(iterator))
    order = doc_ids_in_order(batches, tok)
    first, second = order[:n], order[n:2 * n]
    assert set(first) == set(second) == train_ids
    assert first != second  # Epoch 1 is shuffled with shuffle_seed + 1.
    again = pipeline.make_train_iterator(cfg, tok)
    assert doc_ids_in_order([next(again) for _ in batches], tok) == order  # Deterministic.
    reseeded = pipeline.make_train_iterator(data_config(corpus_dir, shuffle_seed=7), tok)
    assert doc_ids_in_order([next(reseeded) for _ in range(8)], tok)[:n] != first


def test_hosts_read_disjoint_documents(corpus_dir, tok):
    cfg = data_config(corpus_dir)
    train_ids = {int(d.name[3:5]) for d in corpus.load_documents(cfg, "train")}
    seen = []
    for host in range(2):
        iterator = pipeline.make_train_iterator(cfg, tok, process_index=host, process_count=2)
        batches = [next(iterator) for _ in range(10)]
        assert all(b["inputs"].shape == (2, SEQ_LEN) for b in batches)
        seen.append(set(doc_ids_in_order(batches, tok)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == train_ids


def test_batch_size_must_divide_among_hosts(corpus_dir, tok):
    with pytest.raises(ValueError, match=r"data\.batch_size=4 .*process count 3"):
        pipeline.make_train_iterator(data_config(corpus_dir), tok, process_index=0, process_count=3)


def test_eval_batches_are_fixed_and_cover_the_validation_split(corpus_dir, tok):
    cfg = data_config(corpus_dir)
    validation = corpus.load_documents(cfg, "validation")
    batches = pipeline.make_eval_batches(cfg, tok, num_batches=100)
    again = pipeline.make_eval_batches(cfg, tok, num_batches=100)
    # Fewer than asked: the split runs out; the last batch is padded with weight-0 rows.
    assert 1 <= len(batches) < 100
    for a, b in zip(batches, again, strict=True):
        for key in pipeline.FIELDS:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].shape == (4, SEQ_LEN)
    pairs = sum(len(pipeline.tokenize_document(tok, d.text)) - 1 for d in validation)
    assert sum(b["weights"].sum() for b in batches) == pairs
    assert sorted(doc_ids_in_order(batches, tok)) == sorted(int(d.name[3:5]) for d in validation)
    assert len(pipeline.make_eval_batches(cfg, tok, num_batches=1)) == 1


def test_eval_host_slices_reassemble_the_global_batch(corpus_dir, tok):
    cfg = data_config(corpus_dir)
    whole = pipeline.make_eval_batches(cfg, tok, num_batches=3)
    halves = [
        pipeline.make_eval_batches(cfg, tok, num_batches=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == len(whole)
    for b, batch in enumerate(whole):
        for key in pipeline.FIELDS:
            np.testing.assert_array_equal(np.concatenate([halves[0][b][key], halves[1][b][key]]), batch[key])


def test_empty_validation_split_is_a_clear_error(corpus_dir, tok):
    cfg = data_config(corpus_dir, val_fraction=1e-9)
    with pytest.raises(ValueError, match=r"validation split is empty.*data\.val_fraction"):
        pipeline.make_eval_batches(cfg, tok, num_batches=2)


def test_jsonl_source_feeds_the_pipeline(tmp_path, tok):
    lines = [json.dumps({"text": f"<doc{i:02d}> record number {i}"}) for i in range(12)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    cfg = data_config(tmp_path, source="jsonl", paths=(str(tmp_path / "*.jsonl"), ), batch_size=2)
    train_ids = {int(d.text[4:6]) for d in corpus.load_documents(cfg, "train")}
    iterator = pipeline.make_train_iterator(cfg, tok)
    assert set(doc_ids_in_order([next(iterator) for _ in range(8)], tok)) == train_ids
