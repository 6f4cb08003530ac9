"""Speculative decoding with the model's own MTP module as the drafter (greedy).

Axis legend: B batch, W prompt width, N new tokens, V vocab, D model width.

Each step, for a row whose newest token `last` (not yet fed) sits at position p with a draft for p+1:
  1. the main model runs on [last, draft] at positions [p, p+1]: t1 = its argmax at p, t2 at p+1;
  2. the draft is accepted iff draft == t1. t1 is always emitted; t2 too when the draft was accepted,
     since the main model then saw the right token at p+1;
  3. the MTP module runs on positions [p, p+1] with (h_p, t1) and (h_{p+1}, t2) and drafts the token
     after the newest emitted one.
Every emitted token is the main model's argmax given the tokens before it, so the output is plain
greedy decoding's; a step costs a 2-token forward plus one MTP block and emits 1 or 2 tokens.

Exactness: plain decoding computes a position's logits in a 1-token step, this in a 2-token verify block:
the same function of the same inputs, with other matmul shapes. The bits agree where a backend rounds a
row the same whatever rows are beside it, as the CPU does at its default precision in float32 and
bfloat16 (tests/infer/test_speculative.py). Where it picks kernels by shape (a GPU at default precision:
TF32 for float32, split-K reductions), a logit can move by the matmuls' rounding, and the two outputs
part at the first step whose top two logits lie within it; each then goes on as greedy decoding of its
own prefix (`bash benchmarks/device.sh --parts=speculative` measures it). Precision 'highest' narrows the
rounding to float32's.
Cache slots written for a rejected draft (main and MTP) hold position p+1's entry of a wrong token;
the next step writes that slot again before any query can see it.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.infer import cache as cache_lib
from dsjax.infer.decode import Generation, check_request, eos_array, prefill, resolve_prompts
from dsjax.model.transformer import MTPDraft, Transformer


def _argmax_and_logprob(logits_BxLxV):
    tokens_BxL = jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
    logprobs_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV, axis=-1), tokens_BxL[..., None], -1)[..., 0]
    return tokens_BxL, logprobs_BxL


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'absorb'), donate_argnames=('cache',))
def _generate_speculative(cfg, variables, prompt_BxW, lengths_B, cache, eos_id, pad_id, *, max_new_tokens, absorb):
    b, w = prompt_BxW.shape
    n = max_new_tokens
    rows_B = jnp.arange(b)
    model, drafter = Transformer(cfg, absorb), MTPDraft(cfg, absorb)

    logits_BxV, hidden_BxWxD, cache = prefill(cfg, variables, prompt_BxW, lengths_B, cache, absorb=absorb)
    first_Bx1, logprob_Bx1 = _argmax_and_logprob(logits_BxV[:, None])
    # MTP at position i reads token i+1: the prompt shifted left, then the first generated token.
    next_BxW = jnp.pad(prompt_BxW[:, 1:], ((0, 0), (0, 1))).at[rows_B, lengths_B - 1].set(first_Bx1[:, 0])
    positions_BxW = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    valid_BxW = (positions_BxW < lengths_B[:, None]).astype(jnp.int32)
    draft_logits_BxWxV, cache = drafter.apply(variables, hidden_BxWxD, next_BxW, positions_BxW, valid_BxW, cache)
    draft_B = jnp.argmax(draft_logits_BxWxV[rows_B, lengths_B - 1], axis=-1).astype(jnp.int32)

    tokens_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_Bx1[:, 0])
    mask_BxN = jnp.zeros((b, n), bool).at[:, 0].set(True)
    logprobs_BxN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprob_Bx1[:, 0])
    zero = jnp.int32(0)
    carry = dict(tokens=tokens_BxN, mask=mask_BxN, logprobs=logprobs_BxN, count=jnp.ones((b,), jnp.int32),
                 last=first_Bx1[:, 0], draft=draft_B, done=first_Bx1[:, 0] == eos_id, cache=cache,
                 drafted=zero, accepted=zero, steps=zero, row_steps=zero)

    def active(c):
        return ~c['done'] & (c['count'] < n)

    def step_fn(c):
        active_B = active(c)
        positions_Bx2 = (lengths_B + c['count'] - 1)[:, None] + jnp.arange(2, dtype=jnp.int32)
        feed_Bx2 = jnp.stack([c['last'], c['draft']], axis=1)
        live_Bx2 = jnp.broadcast_to(active_B[:, None], (b, 2)).astype(jnp.int32)
        logits_Bx2xV, aux = model.apply(variables, feed_Bx2, positions_Bx2, live_Bx2, cache=c['cache'])
        targets_Bx2, logprobs_Bx2 = _argmax_and_logprob(logits_Bx2xV)
        t1_B, t2_B = targets_Bx2[:, 0], targets_Bx2[:, 1]
        # A draft counts only where its token could still be emitted (room for two more).
        room_B = active_B & (c['count'] + 1 < n)
        accepted_B = room_B & (c['draft'] == t1_B)
        second_B = accepted_B & (t1_B != eos_id)

        # Columns count, count+1 (the second only when emitted); column n is out of range, so dropped.
        emit_Bx2 = jnp.stack([active_B, second_B], axis=1)
        cols_Bx2 = jnp.where(emit_Bx2, c['count'][:, None] + jnp.arange(2), n)
        at = (rows_B[:, None], cols_Bx2)
        tokens_BxN = c['tokens'].at[at].set(targets_Bx2, mode='drop')
        mask_BxN = c['mask'].at[at].set(True, mode='drop')
        logprobs_BxN = c['logprobs'].at[at].set(logprobs_Bx2, mode='drop')
        done_B = c['done'] | (active_B & (t1_B == eos_id)) | (second_B & (t2_B == eos_id))

        draft_logits_Bx2xV, cache = drafter.apply(variables, aux['hidden'], targets_Bx2, positions_Bx2, live_Bx2,
                                                  aux['cache'])
        newest_B = second_B.astype(jnp.int32)  # the draft comes from the newest emitted position
        draft_B = jnp.argmax(draft_logits_Bx2xV[rows_B, newest_B], axis=-1).astype(jnp.int32)
        return dict(tokens=tokens_BxN, mask=mask_BxN, logprobs=logprobs_BxN,
                    count=c['count'] + active_B + second_B,
                    last=jnp.where(active_B, jnp.where(second_B, t2_B, t1_B), c['last']),
                    draft=jnp.where(active_B, draft_B, c['draft']), done=done_B, cache=cache,
                    drafted=c['drafted'] + room_B.sum(), accepted=c['accepted'] + accepted_B.sum(),
                    steps=c['steps'] + 1, row_steps=c['row_steps'] + active_B.sum())

    c = jax.lax.while_loop(lambda c: jnp.any(active(c)), step_fn, carry)
    generation = Generation(tokens=c['tokens'], mask=c['mask'], logprobs=c['logprobs'], key=None)
    return generation, {k: c[k] for k in ('drafted', 'accepted', 'steps', 'row_steps')}, c['cache']


def generate_speculative(cfg: ModelConfig, variables, prompts, *, max_new_tokens: int, eos_id: int | None = None,
                         pad_id: int = 0, lengths=None, cache_length: int | None = None,
                         absorb: bool = True) -> tuple[Generation, dict]:
    """Greedy generation, the MTP module drafting one token per step; same tokens as `generate`.

    Arguments as for `decode.generate` (greedy only: a draft is accepted when it equals the main
    model's argmax). Returns the Generation (key None: nothing random is drawn) and statistics:
    `drafted` (drafts that could have been emitted), `accepted`, `acceptance_rate`, `steps` (verify
    steps of the batch) and `tokens_per_step` (tokens a row gets per verify step, after the first
    token, which prefill produces).
    """
    if not cfg.num_nextn_predict_layers:
        raise ValueError('speculative decoding drafts with the MTP module: model.num_nextn_predict_layers '
                         'must be >= 1')
    prompt_BxW, lengths_B = resolve_prompts(prompts, lengths, pad_id)
    cache_length = cache_length or prompt_BxW.shape[1] + max_new_tokens
    check_request(cfg, prompt_BxW, lengths_B, max_new_tokens, cache_length)
    cache = cache_lib.init_cache(cfg, prompt_BxW.shape[0], cache_length, mtp=True)
    generation, stats, _ = _generate_speculative(
        cfg, variables, jnp.asarray(prompt_BxW), jnp.asarray(lengths_B), cache, eos_array(eos_id), jnp.int32(pad_id),
        max_new_tokens=max_new_tokens, absorb=absorb)
    stats = {k: int(v) for k, v in stats.items()}
    stats['acceptance_rate'] = stats['accepted'] / max(stats['drafted'], 1)
    after_first = int(np.asarray(generation.mask).sum()) - prompt_BxW.shape[0]
    stats['tokens_per_step'] = after_first / max(stats.pop('row_steps'), 1)
    return generation, stats
