"""Pre-training losses: masked next-token cross-entropy and its multi-token-prediction variant.

Axis legend: B batch, L length, V vocab, D model width, C a chunk of L.
"""
import jax
import jax.numpy as jnp

from dsjax.model.layers import constrain, dense

# head_cross_entropy's chunks hold at most this many logits (8 MiB in float32), enough for full-speed
# matmuls (2^20 to 2^22 time alike on llm_small's CPU step), unless that makes more than MAX_CHUNKS
# chunks: a scan of hundreds of small steps would serialise an accelerator (a 129K vocabulary at 8 x 2048).
CHUNK_LOGITS = 2 ** 21
MAX_CHUNKS = 16


def _target_logit(logits_BxLxV, targets_BxL):
    """(one-hot mask [B, L, V], the target's logit [B, L]). The pick compares against iota rather than
    using take_along_axis, whose gradient would be a scatter into a zeroed [B, L, V] buffer."""
    is_target_BxLxV = targets_BxL[..., None] == jnp.arange(logits_BxLxV.shape[-1], dtype=targets_BxL.dtype)
    return is_target_BxLxV, jnp.sum(jnp.where(is_target_BxLxV, logits_BxLxV, 0.0), axis=-1)


def token_nll(logits_BxLxV, targets_BxL):
    """-log p(target) per position, in float32: logsumexp(logits) - logits[target]."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    return jax.nn.logsumexp(logits_BxLxV, axis=-1) - _target_logit(logits_BxLxV, targets_BxL)[1]


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
    """Summed weighted -log p(target) and the summed weight (so callers can average globally)."""
    return (token_nll(logits_BxLxV, targets_BxL) * weights_BxL).sum(), weights_BxL.sum()


def mtp_targets(targets_BxL, weights_BxL, depth: int):
    """Targets and weights of MTP depth `depth` (1-based): token i+depth+1 for position i.

    A position counts only if every step from i to i+depth+1 stays inside one document, i.e.
    the next-token weights of positions i..i+depth are all 1.
    """
    def shift(x, j):
        return jnp.pad(x[:, j:], ((0, 0), (0, j)))

    w = weights_BxL
    for j in range(1, depth + 1):
        w = w * shift(weights_BxL, j)
    return shift(targets_BxL, depth), w


def mtp_cross_entropy(mtp_hidden_DxBxLxD, head_DxV, targets_BxL, weights_BxL):
    """Each MTP depth's summed cross-entropy and summed weight [D] (the spec's L_MTP before lambda is the
    mean over depths of their ratio), from each depth's normed hidden state through the shared head."""
    sums, counts = [], []
    for k in range(mtp_hidden_DxBxLxD.shape[0]):
        t, w = mtp_targets(targets_BxL, weights_BxL, k + 1)
        loss_sum, weight_sum = head_cross_entropy(mtp_hidden_DxBxLxD[k], head_DxV, t, w)
        sums.append(loss_sum)
        counts.append(weight_sum)
    return jnp.stack(sums), jnp.stack(counts)


def chunk_length(batch: int, length: int, vocab: int) -> int:
    """The longest divisor of `length` whose [batch, chunk, vocab] logits fit in CHUNK_LOGITS, or, if that
    cuts the sequence into more than MAX_CHUNKS chunks, the shortest divisor that does not."""
    divisors = [c for c in range(1, length + 1) if length % c == 0]
    fit = max(c for c in divisors if batch * c * vocab <= CHUNK_LOGITS or c == 1)
    if length // fit <= MAX_CHUNKS:
        return fit
    return min(c for c in divisors if length // c <= MAX_CHUNKS)


def _head_chunks(hidden_BxLxD, targets_BxL, weights_BxL, vocab: int):
    """[B, L, ...] -> [L / C, B, C, ...] chunks of the sequence, the layout head_cross_entropy scans."""
    b, length = targets_BxL.shape
    c = chunk_length(b, length, vocab)
    split = lambda x: jnp.swapaxes(x.reshape(b, length // c, c, *x.shape[2:]), 0, 1)
    return split(hidden_BxLxD), split(targets_BxL), split(weights_BxL)


def _chunk_logits(h_BxCxD, head_DxV):
    logits = dense(h_BxCxD, head_DxV, preferred_element_type=jnp.float32)
    return constrain(logits, ('batch', 'act_len', 'act_vocab'))


@jax.custom_vjp
def head_cross_entropy(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL):
    """cross_entropy(hidden @ head, targets, weights) without the [B, L, V] logits: the sequence is
    scanned in chunks (chunk_length), and the gradient is computed chunk by chunk in the forward pass
    (d loss_sum / d logits = weight * (softmax - onehot) needs nothing from later), so the logits and
    their gradient only ever exist one chunk at a time. `hidden` is the normed final hidden state in
    the compute dtype, `head` [D, V] the output head in it; logits are float32. Returns
    (loss_sum, weight_sum) like cross_entropy."""
    h_NxBxCxD, t_NxBxC, w_NxBxC = _head_chunks(hidden_BxLxD, targets_BxL, weights_BxL, head_DxV.shape[1])

    def chunk(total, inputs):
        h_BxCxD, t_BxC, w_BxC = inputs
        return total + (token_nll(_chunk_logits(h_BxCxD, head_DxV), t_BxC) * w_BxC).sum(), None

    loss_sum, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), (h_NxBxCxD, t_NxBxC, w_NxBxC))
    return loss_sum, weights_BxL.sum()


def _head_cross_entropy_fwd(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL):
    b, length, d = hidden_BxLxD.shape
    vocab = head_DxV.shape[1]
    h_NxBxCxD, t_NxBxC, w_NxBxC = _head_chunks(hidden_BxLxD, targets_BxL, weights_BxL, vocab)

    def chunk(carry, inputs):
        total, dhead_DxV = carry
        h_BxCxD, t_BxC, w_BxC = inputs
        logits_BxCxV = _chunk_logits(h_BxCxD, head_DxV)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        is_target_BxCxV, target_BxC = _target_logit(logits_BxCxV, t_BxC)
        total = total + ((lse_BxC - target_BxC) * w_BxC).sum()
        dlogits_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None]) - is_target_BxCxV) * w_BxC[..., None]
        dlogits_BxCxV = dlogits_BxCxV.astype(head_DxV.dtype)
        dh_BxCxD = dense(dlogits_BxCxV, head_DxV.T)
        # Over flattened rows, as in layers.dense: a contraction over both B and C costs a transposed copy.
        dhead_DxV = dhead_DxV + jnp.matmul(h_BxCxD.reshape(-1, d).T, dlogits_BxCxV.reshape(-1, vocab),
                                           preferred_element_type=jnp.float32)
        return (total, dhead_DxV), dh_BxCxD

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head_DxV.shape, jnp.float32))
    (loss_sum, dhead_DxV), dh_NxBxCxD = jax.lax.scan(chunk, init, (h_NxBxCxD, t_NxBxC, w_NxBxC))
    dhidden_BxLxD = jnp.swapaxes(dh_NxBxCxD, 0, 1).reshape(b, length, d)
    return (loss_sum, weights_BxL.sum()), (dhidden_BxLxD, dhead_DxV.astype(head_DxV.dtype))


def _head_cross_entropy_bwd(residuals, cotangents):
    """Only the loss sum is differentiable (the weight sum is data): scale the forward's gradients."""
    dhidden_BxLxD, dhead_DxV = residuals
    g = cotangents[0]
    return (dhidden_BxLxD * g.astype(dhidden_BxLxD.dtype), dhead_DxV * g.astype(dhead_DxV.dtype), None, None)


head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd)
