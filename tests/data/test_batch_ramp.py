"""Tests for dsjax/data/batch_ramp.py: V3's batch ramp (3,072 -> 15,360 sequences over 469B tokens) by hand."""
import numpy as np

from dsjax import config as config_lib
from dsjax.data import batch_ramp

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


def test_fixed_batch_clock():
    c = config_lib.base_config()
    flat = batch_ramp.fixed(c.data)
    assert len(flat.sizes) == 0 and flat.batch_size(7) == c.data.batch_size
    assert flat.tokens_before(7) == 7 * c.data.batch_size * c.data.seq_len
    assert float(flat.tokens_before_traced(7)) == 7 * c.data.batch_size * c.data.seq_len
    # 4 + 12 x T / 4,096 rows floored to whole 4s: T = 0 and 1,024 give 4, T = 2,048 gives 10 -> 8; at 4,096 done.
    ramp = batch_ramp.BatchRamp(start=4, end=16, tokens=16 * 256.0, granule=4, seq_len=256)
    assert list(ramp.sizes) == [4, 4, 8] and ramp.batch_size(3) == 16
