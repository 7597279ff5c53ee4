"""Reward-model losses: Bradley–Terry on pairs, and InstructGPT's all-pairs loss on K ranked answers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.errors import ConfigError


def _as_scores(rewards: Tensor, name: str) -> Tensor:
    """(num_pairs,) from (num_pairs,) or a scalar head's (num_pairs, 1)."""
    if rewards.dim() == 2 and rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)
    if rewards.dim() != 1:
        raise ValueError(
            f"{name} must have shape (num_pairs,) or (num_pairs, 1), got {tuple(rewards.shape)}."
        )
    return rewards


def _as_margin(margin: Tensor | float, difference: Tensor) -> Tensor | float:
    """A scalar, or one margin per pair: (num_pairs,) or (num_pairs, 1), never broadcast across pairs."""
    if not isinstance(margin, Tensor) or margin.dim() == 0:
        return margin
    margin = margin.squeeze(-1) if margin.dim() == 2 and margin.shape[-1] == 1 else margin
    if margin.shape != difference.shape:
        raise ValueError(
            f"margin must be a scalar or one value per pair, shape {tuple(difference.shape)}, got "
            f"{tuple(margin.shape)}."
        )
    return margin


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Bradley–Terry pairwise loss: mean over pairs of −log σ(r_w − r_l − m), plus reward centering
    c · mean((r_w + r_l)²) (Eisenstein et al. 2023 suggest c = 0.01), which pins the free offset of
    the scores near 0. Margin m: one value per pair, (num_pairs,) or (num_pairs, 1), or a scalar (Llama 2's
    margin).

    chosen_rewards, rejected_rewards: (num_pairs,) or (num_pairs, 1).
    Metrics: `accuracy` = mean [r_w > r_l], `margin` = mean (r_w − r_l), `rewards/chosen`,
    `rewards/rejected` (means).
    """
    if not center_coefficient >= 0 or math.isinf(center_coefficient):  # `not >=` also catches NaN
        raise ConfigError(
            f"center_coefficient must be a finite number >= 0 (0 = no centering), got {center_coefficient}."
        )
    chosen = _as_scores(chosen_rewards, "chosen_rewards")
    rejected = _as_scores(rejected_rewards, "rejected_rewards")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen.shape)} and rejected_rewards {tuple(rejected.shape)} differ."
        )
    difference = chosen - rejected  # (num_pairs,)
    logits = difference if margin is None else difference - _as_margin(margin, difference)
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (difference > 0).float().mean().item(),
            "margin": difference.mean().item(),
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
        }
    return loss, metrics


def ranked_pairs_loss(scores: Tensor) -> Tensor:
    """InstructGPT's reward loss (Ouyang et al. 2022) for K answers to one prompt, ranked best first:

        (1 / C(K,2)) · Σ_{i<j} −log σ(s_i − s_j)

    so that every prompt weighs the same whatever its K. scores: (K,) or (batch, K), each row in
    rank order (index 0 = best); a batch gives the mean over rows.
    """
    rows = scores.unsqueeze(0) if scores.dim() == 1 else scores  # (batch, K)
    num_answers = rows.shape[-1]
    if num_answers < 2:
        raise ConfigError(f"ranked_pairs_loss needs at least 2 ranked answers per prompt, got {num_answers}.")
    better, worse = torch.triu_indices(num_answers, num_answers, offset=1, device=rows.device)
    pair_losses = -F.logsigmoid(rows[:, better] - rows[:, worse])  # (batch, C(K,2))
    return (pair_losses.sum(dim=-1) / math.comb(num_answers, 2)).mean()
