"""Pre-training losses: masked next-token cross-entropy and its multi-token-prediction variant.

Axis legend: B batch, L length, V vocab.
"""
import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV, targets_BxL):
    """-log p(target) per position, in float32: logsumexp(logits) - logits[target]."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    # The target logit is picked with a compare against iota, not take_along_axis: its gradient is then
    # an elementwise select that fuses into softmax - onehot, where take_along_axis's is a scatter into
    # a zeroed [B, L, V] buffer (about 10% of a CPU train step at vocab 4096, benchmarks/train_step.py).
    is_target_BxLxV = targets_BxL[..., None] == jnp.arange(logits_BxLxV.shape[-1], dtype=targets_BxL.dtype)
    target_BxL = jnp.sum(jnp.where(is_target_BxLxV, logits_BxLxV, 0.0), axis=-1)
    return jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL


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


def mtp_loss(mtp_logits_DxBxLxV, targets_BxL, weights_BxL):
    """(1/D) sum_k of the depth-k mean cross-entropy (the spec's L_MTP before lambda)."""
    depths = mtp_logits_DxBxLxV.shape[0]
    total = 0.0
    for k in range(depths):
        t, w = mtp_targets(targets_BxL, weights_BxL, k + 1)
        loss_sum, weight_sum = cross_entropy(mtp_logits_DxBxLxV[k], t, w)
        total += loss_sum / jnp.maximum(weight_sum, 1.0)
    return total / depths
