"""Fill-in-the-middle (FIM) documents in PSM order, as DeepSeek-Coder and V3 pre-trained with them.

A FIM document is cut at two random positions into prefix, middle and suffix and trained as

    [bos] <｜fim▁begin｜> prefix <｜fim▁hole｜> suffix <｜fim▁end｜> middle [eos]

so next-token prediction learns to write a middle from the text around it, while left-to-right text
stays the rest of the mix (V3: a rate of 0.1, paper 4.1). The cut is per document, before packing. It falls
between tokens (DeepSeek-Coder cut characters and re-tokenised): the pipeline's documents are token ids, and a
pre-tokenised ArrayRecord corpus has no text to cut.
"""
import numpy as np

from dsjax.data import corpus

# DeepSeek's sentinels (its tokenizer.json holds them as added tokens); the sentencepiece trainer adds them
# as user-defined pieces when data.fim_rate > 0.
FIM_TOKENS = ('<｜fim▁begin｜>', '<｜fim▁hole｜>', '<｜fim▁end｜>')


def sentinel_ids(tokenizer) -> tuple[int, int, int]:
    """The ids of the begin, hole and end sentinels in the tokenizer's vocabulary."""
    ids = tuple(tokenizer.token_id(token) for token in FIM_TOKENS)
    for token, token_id in zip(FIM_TOKENS, ids):
        if token_id is None:
            raise corpus.DataError(f'data.fim_rate > 0 needs the FIM sentinel {token!r} in the tokenizer\'s '
                                   'vocabulary; this one lacks it (a tokenizer.json without FIM tokens, or a '
                                   'sentencepiece model trained with data.fim_rate = 0)')
    return ids


def psm_document(doc_T: np.ndarray, rng: np.random.Generator, sentinels: tuple[int, int, int]) -> np.ndarray:
    """A document [bos, t_1 .. t_n, eos] as one PSM document: its tokens cut at two uniform positions in
    [0, n] into prefix, middle and suffix (int32)."""
    body_N = np.asarray(doc_T[1:-1], np.int32)
    lo, hi = sorted(int(x) for x in rng.integers(0, len(body_N) + 1, size=2))
    begin, hole, end = sentinels
    return np.concatenate([doc_T[:1], [begin], body_N[:lo], [hole], body_N[hi:], [end], body_N[lo:hi],
                           doc_T[-1:]]).astype(np.int32)
