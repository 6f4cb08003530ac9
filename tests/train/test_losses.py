"""Cross-entropy and MTP targets against hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.train import losses


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    total, count = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(float(total), (nll * weights).sum(), rtol=1e-6)
    assert float(count) == 4


def test_mtp_targets_shift_and_stay_inside_documents():
    # Row: doc A = tokens 10 11 12 13, doc B = 20 21 22; targets/weights as the packer makes them.
    targets = jnp.array([[11, 12, 13, 20, 21, 22, 0]])
    weights = jnp.array([[1, 1, 1, 0, 1, 1, 0]], jnp.float32)
    t1, w1 = losses.mtp_targets(targets, weights, 1)
    # Depth 1 at position i predicts token i+2: from 10 -> 12, 11 -> 13, 12 -> (20: other doc).
    np.testing.assert_array_equal(t1, [[12, 13, 20, 21, 22, 0, 0]])
    np.testing.assert_array_equal(w1, [[1, 1, 0, 0, 1, 0, 0]])
    t2, w2 = losses.mtp_targets(targets, weights, 2)
    np.testing.assert_array_equal(t2[:, :2], [[13, 20]])
    np.testing.assert_array_equal(w2, [[1, 0, 0, 0, 0, 0, 0]])


def test_mtp_loss_averages_depths():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 1, 6, 4)).astype(np.float32))
    head = jnp.asarray(rng.normal(size=(4, 7)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, 7, size=(1, 6)))
    weights = jnp.ones((1, 6), jnp.float32)
    per_depth = []
    for k in (1, 2):
        t, w = losses.mtp_targets(targets, weights, k)
        s, n = losses.cross_entropy(hidden[k - 1] @ head, t, w)
        per_depth.append(float(s / n))
    mtp_loss = lambda x: jnp.mean(jnp.divide(*losses.mtp_cross_entropy(x, head, targets, weights)))
    np.testing.assert_allclose(float(mtp_loss(hidden)), np.mean(per_depth), rtol=1e-6)
    grads = jax.grad(mtp_loss)(hidden)
    assert np.all(np.asarray(grads[:, :, -1]) == 0)  # the last position has no target at any depth


@pytest.mark.parametrize('chunk_logits', [1, 4 * 37, 10 ** 6])  # chunks of 1, of 4 / 3 -> 2, one chunk
def test_head_cross_entropy_matches_logits_path(monkeypatch, chunk_logits):
    """Value and gradients (hidden and head, through jit and a scaled loss) equal cross_entropy on the
    materialised logits, whatever the chunking."""
    monkeypatch.setattr(losses, 'CHUNK_LOGITS', chunk_logits)
    rng = np.random.default_rng(2)
    b, length, d, v = 2, 10, 8, 37
    hidden = jnp.asarray(rng.normal(size=(b, length, d)).astype(np.float32))
    head = jnp.asarray(rng.normal(size=(d, v)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, v, (b, length)).astype(np.int32))
    weights = jnp.asarray((rng.random((b, length)) > 0.3).astype(np.float32))

    def via_logits(h, w):
        s, n = losses.cross_entropy(jnp.einsum('BLD,DV->BLV', h, w), targets, weights)
        return 3.0 * s / n

    def fused(h, w):
        s, n = losses.head_cross_entropy(h, w, targets, weights)
        return 3.0 * s / n

    want, want_grads = jax.value_and_grad(via_logits, (0, 1))(hidden, head)
    got, got_grads = jax.jit(jax.value_and_grad(fused, (0, 1)))(hidden, head)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(fused(hidden, head)), float(want), rtol=1e-6)  # primal alone
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_chunk_length_divides_fits_and_bounds_the_chunks(monkeypatch):
    monkeypatch.setattr(losses, 'CHUNK_LOGITS', 2 ** 21)
    monkeypatch.setattr(losses, 'MAX_CHUNKS', 16)
    assert losses.chunk_length(16, 256, 4096) == 32  # 16 x 32 x 4096 = 2^21: 8 chunks
    assert losses.chunk_length(16, 250, 4096) == 25  # the longest divisor of 250 under 32
    assert losses.chunk_length(8, 2048, 129280) == 128  # 2 positions would fit; 16 chunks at most
    assert losses.chunk_length(8, 251, 129280) == 251  # a prime length: one chunk rather than 251
    assert losses.chunk_length(1, 8, 10) == 8  # it all fits: one chunk
