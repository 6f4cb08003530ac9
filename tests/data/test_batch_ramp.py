"""Tests for dsjax/data/batch_ramp.py: V3's batch ramp (3,072 -> 15,360 sequences over 469B tokens) by hand."""
import json

import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.data import batch_ramp, pipeline
from tests.data.test_pipeline import SEQ_LEN, corpus_dir, data_config, tok  # noqa: F401  (fixtures)

SEQ = 4096
V3 = batch_ramp.BatchRamp(start=3072, end=15360, tokens=469e9, granule=768, seq_len=SEQ)


def test_v3_ramp_by_hand():
    # 3,072 sequences (12,582,912 tokens) a step until 1/16 of the 12,288-sequence rise is trained:
    # 469e9 / 16 = 29.3125e9 tokens, i.e. ceil(29.3125e9 / 12,582,912) = 2,330 steps; then one micro-batch more.
    assert V3.batch_size(0) == V3.batch_size(2329) == 3072
    assert V3.batch_size(2330) == 3840
    assert V3.tokens_before(2330) == 2330 * 3072 * SEQ
    # Each of the 16 sizes k x 768 (k = 4 .. 19) lasts ~29.3125e9 / (k x 768 x 4096) steps: 15,975 in all
    # (9,318.2 x (H_19 - H_3)), give or take a step of rounding per size.
    harmonic = sum(1 / k for k in range(4, 20))
    assert abs(len(V3.sizes) - 29.3125e9 / (768 * SEQ) * harmonic) <= 16
    assert set(V3.sizes) == {k * 768 for k in range(4, 20)} and np.all(np.diff(V3.sizes) >= 0)
    n = len(V3.sizes)
    assert V3.tokens_before(n - 1) < 469e9 <= V3.tokens_before(n)
    assert V3.batch_size(n) == 15360
    # After the ramp: 62,914,560 tokens a step.
    assert V3.tokens_before(n + 1000) == V3.tokens_before(n) + 1000 * 15360 * SEQ
    assert V3.steps_for(14.8e12) == n + -(-(14.8e12 - V3.tokens_before(n)) // (15360 * SEQ))


def test_traced_tokens_match_the_host_count():
    steps = np.array([0, 1, 2329, 2330, len(V3.sizes) - 1, len(V3.sizes), len(V3.sizes) + 50_000])
    got = np.asarray(V3.tokens_before_traced(steps))
    np.testing.assert_allclose(got, [V3.tokens_before(int(s)) for s in steps], rtol=1e-6)


def test_ramp_from_config():
    c = config_lib.base_config()
    flat = batch_ramp.from_config(c.data)
    assert len(flat.sizes) == 0 and flat.batch_size(7) == c.data.batch_size
    assert flat.tokens_before(7) == 7 * c.data.batch_size * c.data.seq_len
    assert float(flat.tokens_before_traced(7)) == 7 * c.data.batch_size * c.data.seq_len
    # 4 + 12 x T / 4,096 rows floored to whole micro-batches of 16 / 4 = 4: T = 0 and 1,024 give 4, T = 2,048
    # gives 10 -> 8; at T = 4,096 the ramp is over.
    c.data.update(batch_ramp_start=4, batch_ramp_tokens=4096.0, seq_len=256)
    ramp = batch_ramp.from_config(c.data, micro_batches=4)
    assert list(ramp.sizes) == [4, 4, 8] and ramp.batch_size(3) == 16
    config_lib.validate(dict_config(c, micro_batches=4), 1)


def dict_config(c, micro_batches):
    c.train.micro_batches = micro_batches
    return c


@pytest.mark.parametrize('start, tokens, micro, field', [
    (6, 1e6, 4, 'batch_ramp_start'),  # not whole micro-batches of 4
    (16, 1e6, 4, 'batch_ramp_start'),  # not below batch_size
    (-4, 1e6, 4, 'batch_ramp_start'),
    (4, 0.0, 4, 'batch_ramp_tokens'),
])
def test_config_errors_name_the_field(start, tokens, micro, field):
    c = config_lib.base_config()
    c.data.update(batch_ramp_start=start, batch_ramp_tokens=tokens)
    with pytest.raises(config_lib.ConfigError, match=rf'config\.data\.{field}='):
        config_lib.validate(dict_config(c, micro), 1)


def test_ramp_batches_fill_whole_micro_batches(corpus_dir, tok):  # noqa: F811
    """batch 8 in 4 micro-batches of 2, from 4 rows over 3 x 4 x 32 tokens: 2 of the 4 micro-batches hold rows
    (r % 4 < 2), then 3, then all; the rows come from the stream in order, and the state resumes exactly."""
    cfg = data_config(corpus_dir, batch_size=8, batch_ramp_start=4, batch_ramp_tokens=3 * 4 * SEQ_LEN)
    ramp = batch_ramp.from_config(cfg, micro_batches=4)
    assert list(ramp.sizes) == [4, 4, 6]  # 4 + 4 x T / 384 floored to 2s: T = 0, 128 -> 4; 256 -> 6; 448 >= 384
    iterator = pipeline.make_train_iterator(cfg, tok, micro_batches=4)
    stream = pipeline.make_train_iterator(data_config(corpus_dir, batch_size=1), tok)
    for step in range(6):
        batch = next(iterator)
        active = ramp.batch_size(step) // 2
        real = np.arange(8) % 4 < active
        np.testing.assert_array_equal(batch['weights'].sum(axis=1) > 0, real)
        for row in np.flatnonzero(real):  # the stream's rows, in order
            np.testing.assert_array_equal(batch['inputs'][row], next(stream)['inputs'][0])
    state = json.loads(json.dumps(iterator.get_state()))
    want = [next(iterator) for _ in range(2)]
    again = pipeline.make_train_iterator(cfg, tok, micro_batches=4)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)['inputs'], w['inputs'])
