"""Cached generation: decode == teacher-forced argmax, absorbed MLA == naive, padding, EOS, sampling
log-probs, sharded == one device, and errors that name the bad argument."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEW_TOKENS, PROMPTS, teacher_forced_logits

from dsjax import sharding
from dsjax.infer import cache as cache_lib
from dsjax.infer import decode
from dsjax.infer.sampling import SamplingConfig
from dsjax.model import rope
from dsjax.model.attention import MLA


@pytest.mark.parametrize('name', ['dense', 'v2', 'v3'])
def test_greedy_decode_is_teacher_forced_argmax(models, greedy, name):
    """The cached decode (absorbed MLA for v2/v3) against the training forward (naive MLA)."""
    cfg, variables = models[name]
    out = greedy[name]
    tokens = np.asarray(out.tokens)
    assert np.asarray(out.mask).all()
    logits = teacher_forced_logits(cfg, variables, PROMPTS, tokens)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    logprobs = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.take_along_axis(logprobs, tokens[..., None], -1)[..., 0],
                               atol=1e-5)


def test_absorbed_mla_equals_naive_mla(models):
    """One MLA layer attending over a partly filled cache: absorbed weights vs expanded K/V."""
    cfg, _ = models['v2']  # YaRN on: the softmax scale carries mscale^2
    b, s, length = 2, 12, 3
    x = jax.random.normal(jax.random.PRNGKey(1), (b, length, cfg.hidden_size))
    positions = jnp.array([[4, 5, 6], [8, 9, 10]])
    cos, sin = rope.cos_sin(positions, cfg)
    cache = {'latent': jax.random.normal(jax.random.PRNGKey(2), (b, s, cfg.kv_lora_rank)),
             'rope_key': jax.random.normal(jax.random.PRNGKey(3), (b, s, cfg.qk_rope_head_dim))}
    params = jax.jit(MLA(cfg).init)(jax.random.PRNGKey(0), x, cos, sin, None, cache, positions)

    @jax.jit
    def both(params, x, cache):
        absorbed, cache_a = MLA(cfg, absorb=True).apply(params, x, cos, sin, None, cache, positions)
        naive, cache_n = MLA(cfg, absorb=False).apply(params, x, cos, sin, None, cache, positions)
        return absorbed, naive, cache_a, cache_n

    absorbed, naive, cache_a, cache_n = both(params, x, cache)
    diff = float(jnp.abs(absorbed - naive).max())
    assert diff < 1e-5, diff
    assert float(jnp.abs(naive).max()) > 0.1  # not trivially small
    jax.tree.map(np.testing.assert_array_equal, cache_a, cache_n)
    # The cache holds the normed latent and the roped key of exactly the new positions.
    c_new, k_new = jax.jit(lambda p: MLA(cfg).apply(p, x, cos, sin, method=MLA.latent))(params)
    np.testing.assert_allclose(cache_a['latent'][1, 8:11], c_new[1], atol=1e-6)
    np.testing.assert_allclose(cache_a['rope_key'][0, 4:7], k_new[0], atol=1e-6)
    np.testing.assert_array_equal(cache_a['latent'][0, :4], cache['latent'][0, :4])


@pytest.mark.parametrize('name', ['dense', 'v3'])
def test_fresh_prefill_equals_attending_over_the_cache(models, name):
    """A prefill from position 0 attends to its own tokens (fresh_cache, the training kernels) and gives
    the last logits, hidden states and cache of a prefill that attends over the whole cache."""
    cfg, variables = models[name]
    prompt, lengths = decode.pad_prompts(PROMPTS)
    cache = cache_lib.init_cache(cfg, len(PROMPTS), prompt.shape[1] + 3)
    run = jax.jit(decode.prefill, static_argnums=0)
    fresh = run(cfg, variables, prompt, lengths, cache)
    over_cache = run(cfg, variables, prompt, lengths, cache, jnp.zeros(len(PROMPTS), jnp.int32))
    valid = np.arange(prompt.shape[1]) < lengths[:, None]
    np.testing.assert_allclose(fresh[0], over_cache[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(fresh[1])[valid], np.asarray(over_cache[1])[valid], atol=1e-5)
    w = prompt.shape[1]
    for a, b in zip(jax.tree.leaves(fresh[2]), jax.tree.leaves(over_cache[2])):  # [layers, B, S, ...]
        np.testing.assert_allclose(np.asarray(a)[:, :, :w][:, valid], np.asarray(b)[:, :, :w][:, valid], atol=1e-5)


def test_padded_batch_gives_each_row_what_it_gives_alone(models, greedy):
    cfg, variables = models['v3']
    prompt, lengths = decode.pad_prompts(PROMPTS)
    cache_length = prompt.shape[1] + NEW_TOKENS
    for row in range(len(PROMPTS)):
        # Same width and cache for every row alone: one compile; the padding differs per row.
        alone = decode.generate(cfg, variables, prompt[row:row + 1], lengths=lengths[row:row + 1],
                                max_new_tokens=NEW_TOKENS, cache_length=cache_length)
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(greedy['v3'].tokens)[row])
        np.testing.assert_allclose(np.asarray(alone.logprobs)[0], np.asarray(greedy['v3'].logprobs)[row], atol=1e-5)


def test_rows_stop_at_eos_and_keep_it(models, greedy):
    cfg, variables = models['dense']
    free = np.asarray(greedy['dense'].tokens)
    eos = int(free[0, 2])
    out = decode.generate(cfg, variables, PROMPTS, max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=-1)
    tokens, mask, logprobs = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else NEW_TOKENS
        assert mask[row].tolist() == [True] * end + [False] * (NEW_TOKENS - end)
        np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
        assert (tokens[row, end:] == -1).all() and (logprobs[row, end:] == 0).all()
    assert mask[0].sum() <= 3 and tokens[0, mask[0].sum() - 1] == eos


def test_sampled_logprobs_are_the_forward_pass_at_temperature(models):
    cfg, variables = models['dense']
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)
    key = jax.random.PRNGKey(3)
    out = decode.generate(cfg, variables, PROMPTS, key, max_new_tokens=NEW_TOKENS, sampling=sampling)
    tokens = np.asarray(out.tokens)
    logits = teacher_forced_logits(cfg, variables, PROMPTS, tokens) / 0.7
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-5)
    ranks = (logits > np.take_along_axis(logits, tokens[..., None], -1)).sum(-1)
    assert (ranks < 20).all()  # every draw is inside the top-k
    # The key is threaded: the returned one differs, and drawing with it gives another sample.
    assert not np.array_equal(np.asarray(out.key), np.asarray(key))
    again = decode.generate(cfg, variables, PROMPTS, out.key, max_new_tokens=NEW_TOKENS, sampling=sampling)
    assert not np.array_equal(np.asarray(again.tokens), tokens)


@pytest.mark.parametrize('name,mesh', [('v3', dict(data=1, fsdp=1, expert=4, tensor=2)),
                                       ('dense', dict(data=2, fsdp=2, expert=1, tensor=2))])
def test_sharded_generation_equals_one_device(models, greedy, name, mesh):
    cfg, variables = models[name]
    if cfg.n_routed_experts:  # experts split over `expert`, tokens moved by all_to_all
        import dataclasses
        cfg = dataclasses.replace(cfg, moe_dispatch='expert_parallel')
    mesh = sharding.make_mesh(mesh)
    placed = decode.place_variables(cfg, variables, mesh)
    out = decode.generate(cfg, placed, PROMPTS, max_new_tokens=NEW_TOKENS, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy[name].tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy[name].logprobs), atol=1e-5)


@pytest.mark.parametrize('prompts,kwargs,match', [
    ([[1, 2], []], {}, 'prompt 1 is empty'),
    ([[1, 2, 3, 4, 5]], dict(cache_length=4), r'prompt 0 has 5 tokens, longer than the cache \(cache_length=4\)'),
    ([[1, 2, 3]], dict(cache_length=6), 'max_new_tokens=4 exceeds cache_length=6'),
    ([[1, 200]], {}, r'token id 200, outside the vocabulary \[0, 96\)'),
    ([[1, 2]], dict(max_new_tokens=0), 'max_new_tokens=0 is invalid'),
    ([[1, 2]], dict(sampling=SamplingConfig(temperature=1.0), key=None), 'needs a PRNG key'),
    ([[1, 2]], dict(cache_length=5000), 'exceeds model.max_position_embeddings=4096'),
])
def test_bad_requests_name_the_argument(models, prompts, kwargs, match):
    cfg, variables = models['dense']
    kwargs = {'max_new_tokens': 4, **kwargs}
    key = kwargs.pop('key', jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=match):
        decode.generate(cfg, variables, prompts, key, **kwargs)


def test_bad_sampling_settings_fail_before_generating():
    with pytest.raises(ValueError, match=r'top_p=1.2 is invalid: must be in \(0, 1\]'):
        SamplingConfig(temperature=1.0, top_p=1.2)
    with pytest.raises(ValueError, match='temperature=-1.0 is invalid'):
        SamplingConfig(temperature=-1.0)


def test_mesh_needs_rows_for_every_batch_shard(models):
    cfg, variables = models['dense']
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=1, tensor=2))
    with pytest.raises(ValueError, match='3 prompts cannot be split over the 4 batch shards'):
        decode.generate(cfg, variables, PROMPTS[:3], max_new_tokens=2, mesh=mesh)


def test_cache_bytes_of_a_generation(models):
    cfg, _ = models['v3']
    cache = cache_lib.init_cache(cfg, batch=len(PROMPTS), length=13)
    per_token_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache_lib.cache_bytes(cache) == len(PROMPTS) * 13 * cfg.num_hidden_layers * per_token_layer
