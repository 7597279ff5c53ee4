"""Policy-gradient objectives: PPO/GRPO clipped surrogate with its token aggregations, GSPO,
the clipped value loss, and the adaptive KL controller."""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.errors import ConfigError
from prefalign.losses.logprobs import masked_mean, masked_sum

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def _aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: str,
    *,
    max_new_tokens: int | None,
    num_sequences: int | None,
    num_tokens: int | Tensor | None,
) -> Tensor:
    """Reduce a (batch, T) per-token loss to this micro-batch's share of the optimizer-step loss.

    grpo:    Σ_i (Σ_t ℓ_it / |y_i|) / N_seq          token weight 1/(N_seq·|y_i|)
    dapo:    Σ_i Σ_t ℓ_it / N_tok                    token weight 1/N_tok
    dr_grpo: Σ_i Σ_t ℓ_it / (N_seq · max_new_tokens)  token weight 1/(N_seq·L_max)
    N_seq / N_tok count the whole optimizer step (default: this batch), so the shares add up.
    """
    if aggregation == "grpo":
        per_sequence = masked_mean(per_token, mask, dim=1)  # (batch,); an all-masked row gives 0
        return per_sequence.sum() / (num_sequences or per_token.shape[0])
    if aggregation == "dapo":
        count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=per_token.device)
        return masked_sum(per_token, mask) / count.to(per_token.dtype).clamp(min=1)
    if aggregation == "dr_grpo":
        if max_new_tokens is None:
            raise ConfigError("aggregation 'dr_grpo' needs max_new_tokens (the configured generation limit).")
        return masked_sum(per_token, mask) / ((num_sequences or per_token.shape[0]) * max_new_tokens)
    raise ConfigError(f"Unknown loss aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}.")


def _clip_metrics(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict:
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).to(ratio.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(ratio.dtype)
        return {
            "clip_ratio/low_mean": masked_mean(low, mask).item(),
            "clip_ratio/high_mean": masked_mean(high, mask).item(),
            "clip_ratio/region_mean": masked_mean(low + high, mask).item(),
        }


def clipped_surrogate(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "grpo",
    max_new_tokens: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | Tensor | None = None,
    kl: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017) as used by GRPO (Shao et al. 2024) and DAPO:

        ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t) + β·kl_t,
        ρ_t = exp(log π(y_t) − log π_old(y_t))   (old log-probs detached)

    aggregated over the masked tokens by `aggregation` (see _aggregate): "grpo" (mean per sequence,
    then over sequences), "dapo" (token-level mean, Yu et al. 2025), "dr_grpo" (token sum over
    N_seq · max_new_tokens, Liu et al. 2025). ε_high = 0.28 is DAPO's clip-higher.

    Gradient accumulation: pass the OPTIMIZER STEP's totals, num_tokens (dapo: masked tokens over all
    micro-batches) or num_sequences (grpo, dr_grpo), and the micro-batch losses sum to the step loss.

    logps, old_logps, mask: (batch, T); advantages: (batch,) or (batch, T); kl: (batch, T) per-token
    estimate (e.g. k3) or None. Metrics: `clip_ratio/low_mean` = token mean of [ρ < 1−ε_low and A < 0],
    `clip_ratio/high_mean` = [ρ > 1+ε_high and A > 0], `clip_ratio/region_mean` = either (this
    micro-batch's tokens); `kl` (token mean) when kl is given.
    """
    if beta and kl is None:
        raise ConfigError(f"beta={beta} asks for a KL penalty but no per-token kl was passed.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (batch, 1): one advantage for every token of a sequence
    ratio = torch.exp(logps - old_logps.detach())  # (batch, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)  # (batch, T)
    if beta:
        per_token = per_token + beta * kl
    loss = _aggregate(
        per_token, mask, aggregation,
        max_new_tokens=max_new_tokens, num_sequences=num_sequences, num_tokens=num_tokens,
    )  # fmt: skip
    metrics = _clip_metrics(ratio, advantages.expand_as(ratio), mask, eps_low, eps_high)
    if kl is not None:
        metrics["kl"] = masked_mean(kl.detach(), mask).item()
    return loss, metrics


def gspo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    num_sequences: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025): one length-normalised importance ratio per sequence,

        s_i = exp(mean_t (log π(y_it) − log π_old(y_it))),
        loss = −(1/N_seq) Σ_i min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i)

    with no token aggregation. The paper's clip ranges are tiny (ε_low ≈ 3e-4, ε_high ≈ 4e-4).
    With ρ = 1 its gradient equals token-level GRPO's with "grpo" aggregation; they differ once
    π ≠ π_old. logps, old_logps, mask: (batch, T); advantages: (batch,). num_sequences: sequences in
    the optimizer step (default: this batch). A row with no masked token (a masked truncated
    completion) adds nothing. Metrics as clipped_surrogate's, with each sequence's ratio on its
    tokens: token means over the mask, like the token-level metrics they are averaged with.
    """
    log_ratio = masked_mean(logps - old_logps.detach(), mask, dim=1)  # (batch,)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_sequence = -torch.minimum(ratio * advantages, clipped * advantages)  # (batch,)
    # An empty row has ratio exp(0) = 1 and would add −A_i to the loss value (with no gradient).
    has_tokens = mask.sum(dim=1) > 0
    loss = per_sequence.masked_fill(~has_tokens, 0.0).sum() / (num_sequences or per_sequence.shape[0])
    token_ratio = ratio.detach().unsqueeze(1).expand(mask.shape)  # (batch, T): s_i on every token of i
    metrics = _clip_metrics(token_ratio, advantages.unsqueeze(1).expand(mask.shape), mask, eps_low, eps_high)
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss, token mean over the mask:

        ½ · max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²),   ε_v = clip_range

    (Huang et al. 2024, "The N+ implementation details of RLHF with PPO"); weight it by vf_coef.
    All tensors (batch, T). Metric `value/clipfrac`: token fraction where the clipped term is larger.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).item()
    return loss, {"value/clipfrac": clip_fraction}


def adaptive_kl_update(beta: float, kl: float, target: float, horizon_factor: float = 0.1) -> float:
    """Ziegler et al. 2019's adaptive KL coefficient:

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β · (1 + K_β · e),   K_β = horizon_factor

    kl: the observed per-SEQUENCE KL (summed over tokens), in the units of target (6 nats there).
    """
    if not target > 0:
        raise ConfigError(f"KL target must be > 0, got {target}.")
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + horizon_factor * error)
