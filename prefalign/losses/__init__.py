"""Pure tensor functions for preference alignment: each has its formula and paper in its docstring."""

from prefalign.losses.advantages import gae, group_advantages, overlong_penalty, whiten, zero_std_groups
from prefalign.losses.dpo import DPO_LOSSES, dpo_loss, kto_loss, sft_term
from prefalign.losses.kl import kl_estimate
from prefalign.losses.logprobs import masked_mean, masked_sum, token_entropy, token_logprobs
from prefalign.losses.policy import adaptive_kl_update, clipped_surrogate, gspo_loss, value_loss
from prefalign.losses.reward import bradley_terry_loss, ranked_pairs_loss

__all__ = [
    "DPO_LOSSES",
    "adaptive_kl_update",
    "bradley_terry_loss",
    "clipped_surrogate",
    "dpo_loss",
    "gae",
    "group_advantages",
    "gspo_loss",
    "kl_estimate",
    "kto_loss",
    "masked_mean",
    "masked_sum",
    "overlong_penalty",
    "ranked_pairs_loss",
    "sft_term",
    "token_entropy",
    "token_logprobs",
    "value_loss",
    "whiten",
    "zero_std_groups",
]
