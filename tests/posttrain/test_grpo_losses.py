"""GRPO math against hand-computed values and numpy: advantages, log-probs, k3, clipping, aggregation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.posttrain import losses

VALUES = np.array([[1., 2., 3.], [4., 5., 6.]])
MASK = np.array([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize('mode,max_len,expected', [
    ('seq-mean-token-mean', None, ((1 + 2) / 2 + 4) / 2),
    ('token-mean', None, (1 + 2 + 4) / 3),
    ('seq-mean-token-sum-norm', None, (1 + 2 + 4) / (2 * 3)),
    ('seq-mean-token-sum-norm', 4, (1 + 2 + 4) / (2 * 4)),
])
def test_aggregation_modes(mode, max_len, expected):
    assert float(losses.aggregate(jnp.asarray(VALUES), jnp.asarray(MASK), mode, max_len)) == pytest.approx(expected)


def test_unknown_aggregation_names_the_valid_ones():
    with pytest.raises(ValueError, match='token-mean'):
        losses.aggregate(jnp.asarray(VALUES), jnp.asarray(MASK), 'mean')


def test_advantages_are_group_normalised_and_all_equal_groups_are_zero():
    rewards = np.array([1., 0., 1., 0., 2., 2., 2., 2., 0.5, 0., 0., 3.], np.float32)
    adv, zero_groups = losses.group_advantages(rewards, 4, eps_std=1e-4)
    groups = rewards.reshape(3, 4)
    expected = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-4)
    expected[1] = 0.0
    np.testing.assert_allclose(np.asarray(adv), expected.reshape(-1), rtol=1e-5)
    assert np.all(np.asarray(adv)[4:8] == 0.0)
    assert int(zero_groups) == 1


def test_token_logprobs_and_entropy_at_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 3))
    scaled = logits / 0.7
    logp = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(losses.token_logprobs(logits, tokens, 0.7)),
                               np.take_along_axis(logp, tokens[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.token_entropy(logits, 0.7)), -(np.exp(logp) * logp).sum(-1),
                               rtol=1e-5)


def test_k3_value_and_gradient():
    rng = np.random.default_rng(1)
    logp, ref = rng.normal(size=(3, 4)) - 2, rng.normal(size=(3, 4)) - 2
    k3 = np.asarray(losses.k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
    np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-6)
    assert np.all(k3 >= 0) and float(losses.k3_kl(jnp.ones(3), jnp.ones(3)).max()) == 0.0
    grad = jax.grad(lambda x: losses.k3_kl(x, jnp.asarray(ref)).sum())(jnp.asarray(logp))
    # d/dlogp [e^(ref - logp) - (ref - logp) - 1] = 1 - e^(ref - logp): pulls logp towards ref.
    np.testing.assert_allclose(np.asarray(grad), 1 - np.exp(ref - logp), rtol=1e-5)


def _loss(logp, old, adv, mode, ref=None, beta=0.0, mask=np.ones((2, 2))):
    return losses.grpo_loss(jnp.asarray(logp), jnp.asarray(old), None if ref is None else jnp.asarray(ref),
                            jnp.asarray(adv), jnp.asarray(mask), eps_low=0.2, eps_high=0.28, beta=beta, mode=mode)


def test_on_policy_loss_is_minus_advantage_and_its_gradient_is_the_policy_gradient():
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.125]]))
    adv = np.array([1.0, -1.0])
    mask = np.array([[1, 1], [1, 0]])
    expected = {'seq-mean-token-mean': (-1 + 1) / 2, 'token-mean': (-2 + 1) / 3,
                'seq-mean-token-sum-norm': (-2 + 1) / 4}
    for mode, value in expected.items():
        loss, stats = _loss(logp, jax.lax.stop_gradient(logp), adv, mode, mask=mask)
        assert float(loss) == pytest.approx(value) and float(stats['clip_fraction']) == 0.0
    grad = jax.grad(lambda x: _loss(x, jax.lax.stop_gradient(x), adv, 'token-mean', mask=mask)[0])(logp)
    np.testing.assert_allclose(np.asarray(grad), [[-1 / 3, -1 / 3], [1 / 3, 0.0]], rtol=1e-6)


def test_clipping_with_eps_low_and_eps_high():
    ratio = np.array([[1.5, 0.5], [1.5, 0.5]])
    adv = np.array([1.0, -1.0])
    loss, stats = _loss(np.log(ratio), np.zeros((2, 2)), adv, 'token-mean')
    # A > 0: min(1.5, 1.28) = 1.28 (clipped), min(0.5, 0.8) = 0.5; A < 0: -min(-1.5, -1.28) = 1.5,
    # -min(-0.5, -0.8) = 0.8 (clipped).
    assert float(loss) == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8) / 4)
    assert float(stats['clip_fraction']) == pytest.approx(0.5)
    grad = jax.grad(lambda x: _loss(x, np.zeros((2, 2)), adv, 'token-mean')[0])(jnp.log(ratio))
    # A clipped token gets no gradient; others get -A * ratio / 4.
    np.testing.assert_allclose(np.asarray(grad), [[0.0, -0.5 / 4], [1.5 / 4, 0.0]], rtol=1e-6)


def test_kl_term_is_beta_times_k3():
    logp, ref = np.log([[0.5, 0.2], [0.1, 0.3]]), np.log([[0.4, 0.2], [0.3, 0.3]])
    adv = np.zeros(2)
    loss, stats = _loss(logp, logp, adv, 'token-mean', ref=ref, beta=0.1)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    assert float(stats['kl']) == pytest.approx(k3.mean(), rel=1e-5)
    assert float(loss) == pytest.approx(0.1 * k3.mean(), rel=1e-5)
