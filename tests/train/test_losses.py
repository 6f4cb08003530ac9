"""Cross-entropy and MTP targets against hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np

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
    logits = jnp.asarray(rng.normal(size=(2, 1, 6, 7)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, 7, size=(1, 6)))
    weights = jnp.ones((1, 6), jnp.float32)
    per_depth = []
    for k in (1, 2):
        t, w = losses.mtp_targets(targets, weights, k)
        s, n = losses.cross_entropy(logits[k - 1], t, w)
        per_depth.append(float(s / n))
    np.testing.assert_allclose(float(losses.mtp_loss(logits, targets, weights)), np.mean(per_depth), rtol=1e-6)
    grads = jax.grad(lambda x: losses.mtp_loss(x, targets, weights))(logits)
    assert np.all(np.asarray(grads[:, :, -1]) == 0)  # the last position has no target at any depth
