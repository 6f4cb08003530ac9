"""Sampling: top-k / top-p supports against numpy, temperature -> 0 is greedy, log-probs, bad settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.infer import sampling
from dsjax.infer.sampling import SamplingConfig

B, V = 4, 12


def _logits(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, V)) * 2, jnp.float32)


def _numpy_support(logits, temperature, top_k, top_p):
    """HF's order by hand: scale, keep the k largest, then the nucleus of the renormalised rest."""
    out = []
    for row in np.asarray(logits, np.float64) / temperature:
        order = np.argsort(-row)
        kept = order[:top_k] if top_k else order
        probs = np.exp(row[kept] - row[kept].max())
        probs /= probs.sum()
        mass, nucleus = 0.0, []
        for token, p in zip(kept, probs):
            if mass >= top_p:
                break
            nucleus.append(token)
            mass += p
        out.append(set(int(t) for t in nucleus))
    return out


def _draws(logits, cfg, n=2000):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    # Eager: a handful of vmapped ops, cheaper than compiling one program per setting.
    tokens, logprobs = jax.vmap(lambda k: sampling.sample(logits, k, cfg))(keys)
    return np.asarray(tokens), np.asarray(logprobs)  # [n, B]


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 3, 1.0), (0.7, 0, 0.6), (1.3, 5, 0.8), (1.0, 0, 0.05)])
def test_draws_stay_in_the_support(temperature, top_k, top_p):
    logits = _logits()
    cfg = SamplingConfig(temperature, top_k, top_p)
    want = _numpy_support(logits, temperature, top_k, top_p)
    support = np.asarray(sampling.support(logits / temperature, cfg))
    tokens, _ = _draws(logits, cfg)
    for row in range(B):
        assert set(np.flatnonzero(support[row])) == want[row]
        # 2000 draws reach every kept token (each has >= 1% mass here) and nothing else.
        assert set(tokens[:, row]) == want[row]


def test_draw_frequencies_follow_the_renormalised_distribution():
    logits = _logits(1)
    cfg = SamplingConfig(temperature=0.8, top_k=4)
    tokens, _ = _draws(logits, cfg, n=4000)
    scaled = np.asarray(logits, np.float64) / 0.8
    for row in range(B):
        kept = np.argsort(-scaled[row])[:4]
        p = np.exp(scaled[row, kept] - scaled[row, kept].max())
        p /= p.sum()
        freq = np.array([(tokens[:, row] == t).mean() for t in kept])
        np.testing.assert_allclose(freq, p, atol=0.03)


def test_logprobs_are_under_the_temperature_over_the_whole_vocabulary():
    logits = _logits(2)
    cfg = SamplingConfig(temperature=0.5, top_k=3)
    tokens, logprobs = _draws(logits, cfg, n=50)
    full = np.asarray(jax.nn.log_softmax(logits / 0.5, axis=-1))
    np.testing.assert_allclose(logprobs, full[np.arange(B), tokens], rtol=1e-5, atol=1e-6)


def test_temperature_to_zero_is_greedy():
    logits = _logits(3)
    greedy_tokens, greedy_logprobs = sampling.sample(logits, None, SamplingConfig())
    np.testing.assert_array_equal(greedy_tokens, np.argmax(np.asarray(logits), -1))
    np.testing.assert_allclose(greedy_logprobs, np.max(np.asarray(jax.nn.log_softmax(logits)), -1), rtol=1e-6)
    tokens, _ = _draws(logits, SamplingConfig(temperature=1e-4), n=200)
    assert (tokens == np.asarray(greedy_tokens)[None]).all()


def test_ties_at_the_cut_are_kept():
    logits = jnp.array([[3.0, 1.0, 1.0, 0.0]])
    assert np.asarray(sampling.top_k_mask(logits, 2)).tolist() == [[True, True, True, False]]
    assert np.asarray(sampling.top_p_mask(logits, 0.5)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=-0.1), 'temperature=-0.1 is invalid: must be >= 0'),
    (dict(top_p=0.0), r'top_p=0.0 is invalid: must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p=1.5 is invalid: must be in \(0, 1\]'),
    (dict(top_k=-1), 'top_k=-1 is invalid: must be an integer >= 0'),
    (dict(top_k=2.5), 'top_k=2.5 is invalid'),
])
def test_bad_settings_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
