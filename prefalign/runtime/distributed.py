"""The distributed seam: the only module that talks to torch.distributed.

Rank and world size, and every statistic that crosses examples: step normalisers (tokens, completions,
pairs), batch-level reward statistics, whitening, logged means, dynamic-sampling decisions, gathers of
per-example outputs. With one process (no process group) every function is the identity, so results do not
depend on whether a process group exists; multi-process training fills this module in and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _group_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _group_active() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes run folders, logs and prints."""
    return rank() == 0


def sum_across(value: float) -> float:
    """The sum of `value` over every process (a step normaliser: tokens, pairs, completions)."""
    if not _group_active():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return float(total.item())


def sum_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over every process (sums and counts behind a logged mean or a std)."""
    if not _group_active():
        return values
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def gather_across(items: list[Any]) -> list[Any]:
    """Every process's `items`, concatenated in rank order (per-example outputs, whole groups)."""
    if not _group_active():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]
