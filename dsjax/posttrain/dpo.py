"""Direct Preference Optimization, as DeepSeek-LLM Chat was aligned after SFT (DeepSeek-LLM paper 5.2).

Axis legend: P preference pairs, L length, V vocab.

For a prompt x with a chosen answer y_w and a rejected one y_l, and the frozen reference policy pi_ref
(the model DPO starts from):

    L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

with each log pi(y|x) summed over the answer's tokens. It is Bradley-Terry on the implicit rewards
beta * (log pi - log pi_ref), so `losses.bradley_terry` computes it.
"""
from dsjax.posttrain import losses


def sequence_logprobs(logits_BxLxV, targets_BxL, weights_BxL):
    """sum over the weighted (answer) positions of log softmax(logits)[target], per row [B], float32."""
    return (losses.token_logprobs(logits_BxLxV, targets_BxL) * weights_BxL).sum(axis=-1)


def dpo_loss(chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, beta: float):
    """Per-pair DPO loss [P] and the implicit rewards beta * (log pi - log pi_ref) of both answers [P]."""
    chosen_reward_P = beta * (chosen_P - ref_chosen_P)
    rejected_reward_P = beta * (rejected_P - ref_rejected_P)
    return losses.bradley_terry(chosen_reward_P, rejected_reward_P), chosen_reward_P, rejected_reward_P


def preference_accuracy(chosen_P, rejected_P, ref_chosen_P=None, ref_rejected_P=None):
    """Share of pairs [P] whose chosen answer the policy ranks higher: by log-likelihood, or with the
    reference's log-probs given, by implicit reward (TRL's `rewards/accuracies`)."""
    if ref_chosen_P is not None:
        chosen_P, rejected_P = chosen_P - ref_chosen_P, rejected_P - ref_rejected_P
    return losses.pairwise_accuracy(chosen_P, rejected_P)

