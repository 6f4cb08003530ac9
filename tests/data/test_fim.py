"""Tests for dsjax/data/fim.py and the pipeline's FIM and document_mask options (V3 paper 4.1: FIM in PSM
order at a rate of 0.1, documents packed without a cross-sample mask)."""
import numpy as np
import pytest

from dsjax.data import corpus, fim, pipeline
from dsjax.data import tokenizer as tokenizer_lib
from tests.data.test_pipeline import SEQ_LEN, corpus_dir, data_config  # noqa: F401  (corpus_dir: a fixture)

BEGIN, HOLE, END = 3, 4, 5


class Vocab:
    """Only the FIM sentinels, as ids 3, 4, 5."""

    def token_id(self, token):
        return BEGIN + fim.FIM_TOKENS.index(token) if token in fim.FIM_TOKENS else None


class FixedCuts:
    """An rng whose integers() returns the given cut positions."""

    def __init__(self, cuts):
        self.cuts = cuts

    def integers(self, low, high, size):
        assert (low, high, size) == (0, 6 + 1, 2)  # cuts anywhere in the 6 tokens between bos and eos
        return np.asarray(self.cuts)


def test_psm_document_by_hand():
    assert fim.sentinel_ids(Vocab()) == (BEGIN, HOLE, END)
    doc = np.array([1, 11, 12, 13, 14, 15, 16, 2])  # bos a b c d e f eos
    # Cuts at 4 and 2 (either order): prefix ab, middle cd, suffix ef -> bos begin ab hole ef end cd eos.
    got = fim.psm_document(doc, FixedCuts([4, 2]), (BEGIN, HOLE, END))
    np.testing.assert_array_equal(got, [1, BEGIN, 11, 12, HOLE, 15, 16, END, 13, 14, 2])
    # Cuts at the ends leave prefix and suffix empty: the whole text is the middle.
    got = fim.psm_document(doc, FixedCuts([0, 6]), (BEGIN, HOLE, END))
    np.testing.assert_array_equal(got, [1, BEGIN, HOLE, END, 11, 12, 13, 14, 15, 16, 2])


def test_sentinels_must_be_single_tokens(tmp_path):
    texts = [path.read_text(encoding='utf-8', errors='replace') for path in corpus.stdlib_files()[:10]]
    plain = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 400, str(tmp_path / 'a')))
    with pytest.raises(corpus.DataError, match='data.fim_rate > 0 needs the FIM sentinel'):
        fim.sentinel_ids(plain)
    with_fim = tokenizer_lib.SentencePieceTokenizer(
        tokenizer_lib.train_sentencepiece(texts, 400, str(tmp_path / 'b'), fim.FIM_TOKENS))
    assert len(set(fim.sentinel_ids(with_fim))) == 3


@pytest.fixture(scope='module')
def fim_tok(tmp_path_factory):
    texts = [path.read_text(encoding='utf-8', errors='replace') for path in corpus.stdlib_files()[:40]]
    prefix = str(tmp_path_factory.mktemp('spm_fim') / 'fim')
    return tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 512, prefix, fim.FIM_TOKENS))


def _documents(batches, bos_id):
    """The packed stream split at bos (rows overlap by one token, so their inputs chain)."""
    stream = np.concatenate([row for batch in batches for row in batch['inputs']])
    starts = np.flatnonzero(stream == bos_id)
    return [stream[a:b] for a, b in zip(starts[:-1], starts[1:])]


def test_pipeline_fim_rate_and_reassembly(corpus_dir, fim_tok):  # noqa: F811
    begin, hole, end = fim.sentinel_ids(fim_tok)
    # Rate 1: every document is PSM, and prefix + middle + suffix gives back a training document's tokens.
    texts = {tuple(fim_tok.encode(d.text)) for d in corpus.load_documents(data_config(corpus_dir), 'train')}
    iterator = pipeline.make_train_iterator(data_config(corpus_dir, fim_rate=1.0), fim_tok)
    docs = _documents([next(iterator) for _ in range(10)], fim_tok.bos_id)
    assert len(docs) > 10
    for doc in docs:
        assert doc[1] == begin and list(doc).count(hole) == 1 and list(doc).count(end) == 1
        h, e = list(doc).index(hole), list(doc).index(end)
        prefix, suffix, middle = doc[2:h], doc[h + 1:e], doc[e + 1:-1]  # the last token is eos
        assert tuple(np.concatenate([prefix, middle, suffix])) in texts
    # Rate 0.1 (V3): the share of PSM documents among ~1,000 is 0.1 within 3 standard deviations (0.028).
    iterator = pipeline.make_train_iterator(data_config(corpus_dir, fim_rate=0.1), fim_tok)
    docs = _documents([next(iterator) for _ in range(400)], fim_tok.bos_id)
    share = np.mean([doc[1] == begin for doc in docs])
    assert len(docs) > 900 and abs(share - 0.1) < 3 * np.sqrt(0.1 * 0.9 / len(docs)), (share, len(docs))
    # Resumable: the cut of a document depends on its index, not on how far this process has run.
    again = pipeline.make_train_iterator(data_config(corpus_dir, fim_rate=0.1), fim_tok)
    np.testing.assert_array_equal(np.concatenate(_documents([next(again) for _ in range(400)], fim_tok.bos_id)),
                                  np.concatenate(docs))


def test_pack_without_document_mask_by_hand():
    """V3's packing: the row is one sequence (segment 1, positions 0..L-1) and the eos -> bos pair counts."""
    masked, merged = (list(pipeline.pack_documents([[2, 5, 3], [2, 6, 7, 3]], 4, mask)) for mask in (True, False))
    for a, b in zip(masked, merged):
        np.testing.assert_array_equal(a['inputs'], b['inputs'])
        np.testing.assert_array_equal(a['targets'], b['targets'])
    np.testing.assert_array_equal(masked[0]['segment_ids'], [1, 1, 1, 2])
    np.testing.assert_array_equal(masked[0]['weights'], [1, 1, 0, 1])
    np.testing.assert_array_equal(merged[0]['segment_ids'], [1, 1, 1, 1])
    np.testing.assert_array_equal(merged[0]['positions'], [0, 1, 2, 3])
    np.testing.assert_array_equal(merged[0]['weights'], [1, 1, 1, 1])
    # The end of a finite stream still pads (segment 0, weight 0).
    np.testing.assert_array_equal(merged[1]['segment_ids'], [1, 1, 1, 0])
    np.testing.assert_array_equal(merged[1]['weights'], [1, 1, 0, 0])


def test_train_iterator_without_document_mask(corpus_dir, fim_tok):  # noqa: F811
    batch = next(pipeline.make_train_iterator(data_config(corpus_dir, document_mask=False), fim_tok))
    np.testing.assert_array_equal(batch['segment_ids'], np.ones((4, SEQ_LEN)))
    np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(SEQ_LEN), (4, 1)))
    assert batch['weights'].all() and (batch['inputs'] == fim_tok.bos_id).sum() >= 4  # documents share rows
