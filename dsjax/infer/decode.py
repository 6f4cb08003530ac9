"""Generation with a KV cache: prefill the prompts, then one jitted `lax.while_loop` of decode steps.

Axis legend: B batch, W prompt width (padded), N new tokens, S cache slots, V vocab, D model width.

Prompts of different lengths are right-padded: row b's prompt fills positions 0..len_b-1 and the row
then advances from its own length, so cache slot s always holds position s. The slots written by
padding are overwritten before any query can see them (a slot is visible only from positions at or
past it), so each row decodes exactly as it would alone.
"""
import functools
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sharding
from dsjax.config import ModelConfig
from dsjax.infer import cache as cache_lib
from dsjax.infer.sampling import SamplingConfig, sample
from dsjax.model.transformer import Transformer


@flax.struct.dataclass
class Generation:
    """What `generate` returns, rows aligned with the prompts."""
    tokens: jax.Array  # [B, N] int32; pad_id after a row's end
    mask: jax.Array  # [B, N] bool: the generated tokens, EOS included
    logprobs: jax.Array  # [B, N] float32 under the sampling temperature; 0 where mask is False
    key: jax.Array  # the PRNG key after this call: pass it to the next one


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> right-padded [B, W] int32 array and lengths [B]."""
    if not len(prompts):
        raise ValueError('prompts is empty: give at least one prompt')
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    prompt_BxW = np.full((len(prompts), max(1, lengths_B.max())), pad_id, np.int32)
    for row, p in enumerate(prompts):
        prompt_BxW[row, :len(p)] = p
    return prompt_BxW, lengths_B


def check_request(cfg: ModelConfig, prompt_BxW, lengths_B, max_new_tokens: int, cache_length: int) -> None:
    """Raises ValueError naming the argument when a generation request cannot be served."""
    prompt_BxW, lengths_B = np.asarray(prompt_BxW), np.asarray(lengths_B)
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f'max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 1')
    if prompt_BxW.ndim != 2 or lengths_B.shape != prompt_BxW.shape[:1]:
        raise ValueError(f'prompts must be [batch, width] with lengths [batch]; got {prompt_BxW.shape} '
                         f'and {lengths_B.shape}')
    for row, n in enumerate(lengths_B):
        if n < 1:
            raise ValueError(f'prompt {row} is empty: generation needs at least one prompt token (e.g. BOS)')
        if n > prompt_BxW.shape[1]:
            raise ValueError(f'lengths[{row}]={n} exceeds the prompt width {prompt_BxW.shape[1]}')
        if n > cache_length:
            raise ValueError(f'prompt {row} has {n} tokens, longer than the cache (cache_length={cache_length})')
        if n + max_new_tokens > cache_length:
            raise ValueError(f'prompt {row} ({n} tokens) + max_new_tokens={max_new_tokens} exceeds '
                             f'cache_length={cache_length}: raise cache_length or lower max_new_tokens')
    real = prompt_BxW[np.arange(prompt_BxW.shape[1]) < lengths_B[:, None]]
    if real.size and (real.min() < 0 or real.max() >= cfg.vocab_size):
        bad = real[(real < 0) | (real >= cfg.vocab_size)][0]
        raise ValueError(f'prompts hold token id {bad}, outside the vocabulary [0, {cfg.vocab_size})')
    if cache_length > cfg.max_position_embeddings:
        raise ValueError(f'cache_length={cache_length} exceeds model.max_position_embeddings='
                         f'{cfg.max_position_embeddings}: positions past it were never trained')


def prefill(cfg: ModelConfig, variables, prompt_BxW, lengths_B, cache, start_B=None, absorb: bool = True):
    """Runs each row's prompt into the cache at positions start .. start+len-1 (start defaults to 0: then
    the prompt attends to itself with the training kernels, `fresh_cache`, not to the whole cache).

    Returns the logits of each row's last prompt token [B, V] (the only ones computed: [B, W, V] would be
    67 GB at V3's vocabulary and 128K tokens), the pre-norm hidden states [B, W, D] (what MTP drafts from)
    and the cache.
    """
    b, w = prompt_BxW.shape
    offsets_W = jnp.arange(w, dtype=jnp.int32)
    fresh = start_B is None
    start_B = jnp.zeros((b,), jnp.int32) if fresh else start_B
    valid_BxW = offsets_W[None, :] < lengths_B[:, None]
    normed_BxWxD, aux = Transformer(cfg, absorb, fresh_cache=fresh).apply(
        variables, prompt_BxW, start_B[:, None] + offsets_W, valid_BxW.astype(jnp.int32), cache=cache,
        apply_head=False)
    last_BxD = jnp.take_along_axis(normed_BxWxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    last_BxV = jnp.matmul(last_BxD, aux['head']).astype(jnp.float32)
    return last_BxV, aux['hidden'], aux['cache']


def decode_step(cfg: ModelConfig, variables, tokens_B, positions_B, active_B, cache, key,
                sampling: SamplingConfig, absorb: bool = True):
    """Feeds one token per row at its position and samples the next: (tokens [B], logprobs [B], cache)."""
    logits_Bx1xV, aux = Transformer(cfg, absorb).apply(
        variables, tokens_B[:, None], positions_B[:, None], active_B[:, None].astype(jnp.int32), cache=cache)
    next_B, logprobs_B = sample(logits_Bx1xV[:, 0], key, sampling)
    return next_B, logprobs_B, aux['cache']


def eos_array(eos_id: int | None) -> jax.Array:
    """The EOS id as a traced scalar (-1, which no token equals, for none), so it never recompiles."""
    return jnp.int32(-1 if eos_id is None else eos_id)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'sampling', 'absorb'),
                   donate_argnames=('cache',))
def _generate(cfg, variables, prompt_BxW, lengths_B, cache, key, eos_id, pad_id, *, max_new_tokens, sampling,
              absorb):
    b, n = prompt_BxW.shape[0], max_new_tokens
    logits_BxV, _, cache = prefill(cfg, variables, prompt_BxW, lengths_B, cache, absorb=absorb)
    key, sub = jax.random.split(key)
    first_B, logprob_B = sample(logits_BxV, sub, sampling)
    tokens_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_B)
    mask_BxN = jnp.zeros((b, n), bool).at[:, 0].set(True)
    logprobs_BxN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprob_B)

    def unfinished(carry):
        step, _, _, _, done_B, _, _ = carry
        return (step < n) & ~jnp.all(done_B)

    def step_fn(carry):
        step, tokens_BxN, mask_BxN, logprobs_BxN, done_B, cache, key = carry
        key, sub = jax.random.split(key)
        active_B = ~done_B
        # Token step-1 sits at position len + step - 1; finished rows keep stepping, masked out.
        next_B, logprob_B, cache = decode_step(cfg, variables, tokens_BxN[:, step - 1], lengths_B + step - 1,
                                               active_B, cache, sub, sampling, absorb)
        tokens_BxN = tokens_BxN.at[:, step].set(jnp.where(active_B, next_B, pad_id))
        mask_BxN = mask_BxN.at[:, step].set(active_B)
        logprobs_BxN = logprobs_BxN.at[:, step].set(jnp.where(active_B, logprob_B, 0.0))
        done_B = done_B | (active_B & (next_B == eos_id))
        return step + 1, tokens_BxN, mask_BxN, logprobs_BxN, done_B, cache, key

    carry = (jnp.int32(1), tokens_BxN, mask_BxN, logprobs_BxN, first_B == eos_id, cache, key)
    _, tokens_BxN, mask_BxN, logprobs_BxN, _, cache, key = jax.lax.while_loop(unfinished, step_fn, carry)
    # Returning the cache lets the donated input buffers be updated in place rather than copied.
    return Generation(tokens=tokens_BxN, mask=mask_BxN, logprobs=logprobs_BxN, key=key), cache


def variable_shardings(cfg: ModelConfig, mesh, rules=sharding.DEFAULT_RULES):
    """NamedShardings of the Transformer's variables on `mesh`, from their logical axes."""
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return sharding.logical_sharding(boxed, mesh, rules)


def place_variables(cfg: ModelConfig, variables, mesh, rules=sharding.DEFAULT_RULES):
    """The variables (params, moe_bias) laid out on `mesh` as training lays them out."""
    shardings = variable_shardings(cfg, mesh, rules)
    return jax.device_put(variables, {k: shardings[k] for k in variables})


def resolve_prompts(prompts, lengths, pad_id: int):
    """(prompt [B, W] int32, lengths [B]) from token-id lists, or from a padded array and its lengths."""
    if lengths is None:
        if isinstance(prompts, (np.ndarray, jax.Array)):
            prompts = np.asarray(prompts)
            return prompts.astype(np.int32), np.full((prompts.shape[0],), prompts.shape[1], np.int32)
        return pad_prompts(prompts, pad_id)
    return np.asarray(prompts, np.int32), np.asarray(lengths, np.int32)


def generate(cfg: ModelConfig, variables, prompts, key=None, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), eos_id: int | None = None, pad_id: int = 0,
             lengths=None, cache_length: int | None = None, absorb: bool = True, mesh=None) -> Generation:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      cfg: the model config.
      variables: {'params': ..., 'moe_bias': ...} of a Transformer (placed on `mesh` if one is given;
        see `place_variables`).
      prompts: token-id lists, or a right-padded [B, W] array (with `lengths`, else all W long).
      key: PRNG key, required when sampling (temperature > 0); the returned Generation carries the
        advanced key so the next call draws fresh numbers.
      max_new_tokens: most tokens per row; a row stops early after producing `eos_id`.
      sampling: temperature / top_k / top_p (default greedy).
      eos_id: the end-of-sequence id (None: never stop early).
      pad_id: written after a row's end.
      lengths: prompt lengths when `prompts` is a padded array.
      cache_length: cache slots per row; default the prompt width + max_new_tokens.
      absorb: MLA attention with absorbed weights (True) or naive expansion (False).
      mesh: run sharded on this mesh (rows over the batch axes, heads over `tensor`, experts over
        `expert`); None for the default device.

    Returns:
      Generation(tokens [B, N], mask [B, N] (EOS included), logprobs [B, N], key).
    """
    prompt_BxW, lengths_B = resolve_prompts(prompts, lengths, pad_id)
    cache_length = cache_length or prompt_BxW.shape[1] + max_new_tokens
    check_request(cfg, prompt_BxW, lengths_B, max_new_tokens, cache_length)
    if key is None:
        if not sampling.greedy:
            raise ValueError(f'key=None: sampling at temperature={sampling.temperature} needs a PRNG key')
        key = jax.random.PRNGKey(0)  # never drawn from: greedy decoding uses no randomness
    batch = prompt_BxW.shape[0]
    run = functools.partial(_generate, cfg, max_new_tokens=max_new_tokens, sampling=sampling, absorb=absorb)
    ids = (eos_array(eos_id), jnp.int32(pad_id))
    if mesh is None:
        cache = cache_lib.init_cache(cfg, batch, cache_length)
        return run(variables, jnp.asarray(prompt_BxW), jnp.asarray(lengths_B), cache, key, *ids)[0]
    rows = sharding.batch_sharding(mesh)
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))
    if batch % shards:
        raise ValueError(f'{batch} prompts cannot be split over the {shards} batch shards of the mesh '
                         f'{dict(mesh.shape)}: give a multiple of {shards}')
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        cache = jax.jit(cache_lib.init_cache, static_argnums=(0, 1, 2),
                        out_shardings=cache_lib.cache_shardings(cfg, mesh))(cfg, batch, cache_length)
        return run(variables, jax.device_put(prompt_BxW, rows), jax.device_put(lengths_B, rows), cache, key, *ids)[0]
