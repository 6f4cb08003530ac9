"""Post-training losses as pure functions.

Axis legend: B batch (completions), N completion tokens, V vocab, G group size, P prompts (B = P * G).
"""
import jax
import jax.numpy as jnp

from dsjax.train import losses as train_losses

# ---------------------------------------------------------------------------------------------------
# GRPO (spec: posttraining.md, "GRPO")
# ---------------------------------------------------------------------------------------------------

AGGREGATIONS = ('seq-mean-token-mean', 'token-mean', 'seq-mean-token-sum-norm')


def group_advantages(rewards_B, group_size: int, eps_std: float = 1e-4):
    """A_i = (r_i - mean_group r) / (std_group r + eps_std), the population std of each group of
    `group_size` consecutive completions.

    Returns (advantages [B], zero_groups): a group whose rewards are all equal has std 0 and so zero
    advantage for every member; `zero_groups` counts those groups (they teach nothing).
    """
    rewards_PxG = jnp.asarray(rewards_B, jnp.float32).reshape(-1, group_size)
    centred_PxG = rewards_PxG - rewards_PxG.mean(axis=1, keepdims=True)
    std_Px1 = rewards_PxG.std(axis=1, keepdims=True)
    advantages_PxG = centred_PxG / (std_Px1 + eps_std)
    # Exactly zero, not rounding noise over eps_std: an all-equal group must not move the policy.
    advantages_PxG = jnp.where(std_Px1 > 0, advantages_PxG, 0.0)
    return advantages_PxG.reshape(-1), jnp.sum(std_Px1[:, 0] == 0)


def token_logprobs(logits_BxNxV, tokens_BxN, temperature: float = 1.0):
    """log_softmax(logits / T) of the given tokens [B, N], in float32 (T = the sampling temperature)."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp_BxNxV, tokens_BxN[..., None], axis=-1)[..., 0]


def token_entropy(logits_BxNxV, temperature: float = 1.0):
    """Entropy [B, N] of softmax(logits / T), in nats."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)


def k3_kl(logp_BxN, ref_logp_BxN):
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(lr) - lr - 1, lr = log pi_ref - log pi_theta.

    Unbiased and non-negative; unlike k1 its gradient on on-policy samples is not zero in expectation.
    """
    lr_BxN = ref_logp_BxN - logp_BxN
    return jnp.exp(lr_BxN) - lr_BxN - 1.0


def aggregate(values_BxN, mask_BxN, mode: str, max_len: int | None = None):
    """Reduces per-token values over the completion tokens (mask, EOS included) to a scalar.

    'seq-mean-token-mean': mean over sequences of each sequence's token mean (original GRPO);
    'token-mean': sum over all tokens / their count (DAPO);
    'seq-mean-token-sum-norm': sum over all tokens / (B * max_len) (Dr. GRPO; `max_len` defaults to N,
    the generation budget, so a long and a short completion weigh their tokens alike).
    """
    mask_BxN = mask_BxN.astype(jnp.float32)
    total_BxN = values_BxN * mask_BxN
    if mode == 'seq-mean-token-mean':
        return jnp.mean(total_BxN.sum(axis=1) / jnp.maximum(mask_BxN.sum(axis=1), 1.0))
    if mode == 'token-mean':
        return total_BxN.sum() / jnp.maximum(mask_BxN.sum(), 1.0)
    if mode == 'seq-mean-token-sum-norm':
        return total_BxN.sum() / (values_BxN.shape[0] * (max_len or values_BxN.shape[1]))
    raise ValueError(f'aggregation mode {mode!r} is invalid: must be one of {AGGREGATIONS}')


def grpo_loss(logp_BxN, old_logp_BxN, ref_logp_BxN, advantages_B, mask_BxN, *, eps_low: float,
              eps_high: float, beta: float, mode: str, max_len: int | None = None):
    """The GRPO objective to minimise: Agg(-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3).

    Args:
      logp_BxN: log pi_theta of the completion tokens (differentiable).
      old_logp_BxN: log pi_old, stored at rollout (with one update per batch pass
        stop_gradient(logp_BxN): rho = 1).
      ref_logp_BxN: log pi_ref of the frozen reference, or None when beta == 0.
      advantages_B: one advantage per completion.
      mask_BxN: the completion tokens, EOS included.
      eps_low, eps_high: the clip range of the ratio.
      beta: weight of the k3 KL term.
      mode: one of AGGREGATIONS.
      max_len: the 'seq-mean-token-sum-norm' normaliser (default N).

    Returns:
      (loss, stats): stats hold the aggregated policy term, k3 KL (token mean) and the fraction of
      tokens whose ratio was clipped (token mean).
    """
    ratio_BxN = jnp.exp(logp_BxN - old_logp_BxN)
    adv_Bx1 = advantages_B[:, None]
    unclipped_BxN = ratio_BxN * adv_Bx1
    clipped_BxN = jnp.clip(ratio_BxN, 1.0 - eps_low, 1.0 + eps_high) * adv_Bx1
    policy_BxN = -jnp.minimum(unclipped_BxN, clipped_BxN)
    loss_BxN = policy_BxN
    kl_BxN = jnp.zeros_like(logp_BxN)
    if ref_logp_BxN is not None:
        kl_BxN = k3_kl(logp_BxN, ref_logp_BxN)
        loss_BxN = loss_BxN + beta * kl_BxN
    was_clipped_BxN = (clipped_BxN < unclipped_BxN).astype(jnp.float32)
    stats = {'policy_loss': aggregate(policy_BxN, mask_BxN, mode, max_len),
             'kl': aggregate(kl_BxN, mask_BxN, 'token-mean'),
             'clip_fraction': aggregate(was_clipped_BxN, mask_BxN, 'token-mean')}
    return aggregate(loss_BxN, mask_BxN, mode, max_len), stats


# ---------------------------------------------------------------------------------------------------
# SFT, reward model, distillation (spec: posttraining.md, "SFT", "Reward model", "Distillation")
# Axis legend here: L sequence length, P preference pairs.
# ---------------------------------------------------------------------------------------------------


def sft_loss(logits_BxLxV, targets_BxL, weights_BxL, num_target_tokens):
    """Masked next-token cross-entropy of one (micro-)batch divided by the target-token count of the
    whole batch, so that summing it over micro-batches gives the big batch's token mean (gradient
    accumulation equals one big batch, however unevenly the assistant tokens fall)."""
    loss_sum, _ = train_losses.cross_entropy(logits_BxLxV, targets_BxL, weights_BxL)
    return loss_sum / jnp.maximum(num_target_tokens, 1.0)


def bradley_terry(reward_chosen_P, reward_rejected_P, margin=0.0):
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin) [P]."""
    return -jax.nn.log_sigmoid(reward_chosen_P - reward_rejected_P - margin)


def pairwise_accuracy(reward_chosen_P, reward_rejected_P):
    """1 where the chosen answer scores higher, 0.5 on a tie, else 0 [P]."""
    diff = reward_chosen_P - reward_rejected_P
    return jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))


def _kl(logp_BxLxV, logq_BxLxV):
    """KL(p || q) per position [B, L] from log-probabilities."""
    return jnp.sum(jnp.exp(logp_BxLxV) * (logp_BxLxV - logq_BxLxV), axis=-1)


def generalized_jsd(student_logits_BxLxV, teacher_logits_BxLxV, beta: float, temperature: float = 1.0):
    """Generalised Jensen-Shannon divergence per position [B, L], teacher P and student Q at
    temperature T: beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q.

    beta = 0 is the forward KL(P || Q), beta = 1 the reverse KL(Q || P) (the limits of the mixture
    form divided by beta and 1 - beta), beta = 0.5 the symmetric JSD (GKD, Agarwal et al. 2024).
    `beta` is a Python float: it picks the formula at trace time.
    """
    logq = jax.nn.log_softmax(student_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    logp = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32) / temperature, axis=-1)
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    logm = jnp.logaddexp(logp + jnp.log(beta), logq + jnp.log1p(-beta))
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def distill_loss(student_logits_BxLxV, teacher_logits_BxLxV, weights_BxL, num_target_tokens, beta: float,
                 temperature: float = 1.0):
    """Generalised JSD summed over the completion tokens (weight 1) of this (micro-)batch, divided by
    the whole batch's count: prompt and padding positions never count."""
    jsd_BxL = generalized_jsd(student_logits_BxLxV, teacher_logits_BxLxV, beta, temperature)
    return (jsd_BxL * weights_BxL).sum() / jnp.maximum(num_target_tokens, 1.0)
