"""Advantages: group-relative (GRPO and variants), GAE (PPO), whitening, and DAPO's overlong penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.errors import ConfigError
from prefalign.losses.logprobs import masked_mean, masked_sum

GROUP_SCALES = ("group", "none", "batch")


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(num_groups, G) view of rewards given flat (num_groups*G,) or already (num_groups, G)."""
    if group_size < 2:
        raise ConfigError(
            f"group_size (G, completions per prompt) must be >= 2 for group advantages, got {group_size}."
        )
    if rewards.dim() == 2 and rewards.shape[1] == group_size:
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}: "
            "expected (num_groups * group_size,) or (num_groups, group_size)."
        )
    return rewards.view(-1, group_size)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(num_groups,) bool: groups whose rewards are all equal, which carry no learning signal.

    `.sum()` counts them; `.float().mean()` is TRL's `frac_reward_zero_std`.
    """
    groups = _as_groups(rewards, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4,
    batch_std: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages for G completions per prompt; every token of completion i gets A_i.

    scale="group" (GRPO, Shao et al. 2024): A_i = (r_i − mean(r)) / (std(r) + δ) within the group,
    with the SAMPLE (Bessel-corrected, divide by G − 1) std and δ = eps = 1e-4, as TRL does;
    so G = 2, r = (0, 1) gives ±0.5/(0.70711 + 1e-4) = ±0.70701 (the population std would give ±1).
    scale="none" (Dr. GRPO, Liu et al. 2025): A_i = r_i − mean(r).
    scale="batch": (r_i − group mean) / (sample std of all raw rewards in the batch + δ); `batch_std`, when
    given, is that std (the batch spread over several processes: prefalign.runtime.distributed gathers it).

    A group whose rewards are all equal gets exactly 0 (see zero_std_groups to count them).
    rewards: (num_groups * G,) with each group contiguous, or (num_groups, G); output: same shape.
    """
    if scale not in GROUP_SCALES:
        raise ConfigError(f"Unknown advantage scale {scale!r}; choose from {', '.join(GROUP_SCALES)}.")
    groups = _as_groups(rewards, group_size)  # (num_groups, G)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / ((groups.std() if batch_std is None else batch_std) + eps)
    # The mean of equal floats need not round back to them exactly; force the documented 0.
    flat = zero_std_groups(groups, group_size).unsqueeze(1)
    advantages = centered.masked_fill(flat, 0.0)
    return advantages.reshape(rewards.shape)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), as used in PPO for LMs:

        δ_t = r_t + γ V_{t+1} − V_t,   A_t = Σ_k (γλ)^k δ_{t+k},   R_t = A_t + V_t

    with V after the last valid token = 0 (the episode ends with the completion).
    rewards, values, mask: (batch, T); mask is 1 on completion tokens and 0 on RIGHT padding (each
    row a run of ones then zeros). Padding rewards and values are ignored (may hold garbage).
    Returns (advantages, returns), both (batch, T), 0 at padding, detached: they are targets.
    """
    mask = mask.to(values.dtype)
    # Zeroing padding makes V_{t+1} = 0 after the last token and δ = 0 on padding, so the plain
    # backward recursion stops at each row's end without special cases.
    rewards = rewards.detach().masked_fill(mask == 0, 0.0)
    values = values.detach().masked_fill(mask == 0, 0.0)
    num_steps = values.shape[1]
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])  # (batch,)
    for step in reversed(range(num_steps)):
        next_value = values[:, step + 1] if step + 1 < num_steps else torch.zeros_like(running)
        delta = rewards[:, step] + gamma * next_value - values[:, step]
        running = delta + gamma * lam * running
        advantages[:, step] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(v − mean) / sqrt(var + eps) over the masked positions of the whole batch.

    Mean and variance use only positions where mask == 1; the variance is the sample
    (Bessel-corrected) one. shift_mean=False adds the mean back (whitening rewards without moving
    their level). Masked positions come out as 0. values, mask: (batch, T); returns (batch, T).
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    count = mask.sum()
    squared = masked_sum((values - mean) ** 2, mask)
    variance = squared / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(mask == 0, 0.0)


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), added to the reward before advantages:

        0                              for |y| ≤ L_max − L_cache
        (L_max − L_cache − |y|) / L_cache   for L_max − L_cache < |y| ≤ L_max
        −1                             for |y| > L_max

    lengths: (batch,) completion token counts; returns (batch,) float.
    """
    if not 0 < cache_len <= max_len:
        raise ConfigError(
            f"overlong cache_len must satisfy 0 < cache_len <= max_len, got {cache_len} and {max_len}."
        )
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    soft_start = max_len - cache_len
    penalty = ((soft_start - lengths) / cache_len).clamp(min=-1.0, max=0.0)
    return penalty
