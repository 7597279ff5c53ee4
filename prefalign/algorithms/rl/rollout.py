"""Rollout collection: G completions per prompt from the rollout engine, scored through
`WeightedRewards.score_groups` (the one place that flattens groups and counts failures), the statistics
RL logs about them (TRL's names), and the gold monitor that GRPO and PPO share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from prefalign import losses
from prefalign.errors import ConfigError
from prefalign.options import option
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import GroupScores, RewardFailure, as_completion, get_reward_function
from prefalign.rollout.types import FINISH_LENGTH, Sample, SamplingParams
from prefalign.runtime import distributed


@dataclass
class ScoredGroups:
    """One generation call's groups: rows[i] (a prompt row) has samples[i] (G of them) and scores[i]."""

    rows: list[dict[str, Any]]
    samples: list[list[Sample]]
    scores: torch.Tensor  # (rows, G), NaN where a sample has no score (a reward failed, or all returned None)
    per_function: dict[str, list[list[float | None]]] = field(default_factory=dict)
    failures: list[RewardFailure] = field(default_factory=list)


def sample_and_score(
    engine, rows: list[dict[str, Any]], row_ids: list[int], rewards: WeightedRewards, params: SamplingParams
) -> ScoredGroups:
    """Generate params.n completions of each tokenized prompt row and score them (failures name the row)."""
    samples = engine.generate([row["prompt_ids"] for row in rows], params)
    scored = score_samples(rewards, rows, samples)
    for failure in scored.failures:  # the group's position -> the training row, so the message points at it
        failure.prompt_index = row_ids[failure.prompt_index]
    scores = torch.tensor(
        [[math.nan if value is None else value for value in group] for group in scored.scores]
    )
    return ScoredGroups(rows, samples, scores.view(len(rows), params.n), scored.per_function, scored.failures)


def score_samples(rewards: WeightedRewards, rows: list[dict[str, Any]], samples: list[list[Sample]]):
    """Score each row's samples in one score_groups call (GroupScores): the prompt, the completion (an
    assistant message for a conversational prompt, TRL's convention), its token ids and the row's extra
    columns, by name."""
    prompts = [row["prompt"] for row in rows]
    completions = [
        [as_completion(row["prompt"], s.text) for s in group]
        for row, group in zip(rows, samples, strict=True)
    ]
    columns = {name: [row[name] for row in rows] for name in rows[0] if name not in ("prompt", "prompt_ids")}
    token_ids = {"completion_ids": [[s.token_ids for s in group] for group in samples]}
    if distributed.world_size() == 1:
        return rewards.score_groups(prompts, completions, columns, token_ids)
    # Every process holds every group (ShardedEngine): each scores a contiguous share (a reward model's
    # forwards are not repeated on every rank) and all get every score back, in group order.
    start, end = distributed.shard_bounds(len(rows))
    local = rewards.score_groups(
        prompts[start:end], completions[start:end], {name: v[start:end] for name, v in columns.items()},
        {name: v[start:end] for name, v in token_ids.items()},
    )
    for failure in local.failures:  # this share's group index -> the batch's
        failure.prompt_index += start
    parts = distributed.gather_across([local])
    return GroupScores(
        scores=[group for part in parts for group in part.scores],
        per_function={  # a share with no groups may list no functions: it adds no groups either
            name: [group for part in parts for group in part.per_function.get(name, [])]
            for name in dict.fromkeys(name for part in parts for name in part.per_function)
        },
        failures=[failure for part in parts for failure in part.failures],
        failed=[group for part in parts for group in part.failed],
    )


def reward_metrics(scores: torch.Tensor) -> dict[str, float]:
    """Mean reward, mean within-group std and the share of all-equal groups, over the scored samples."""
    groups = [group[~torch.isnan(group)] for group in scores]  # each group's scored samples
    groups = [group for group in groups if group.numel()]
    if not groups:  # nothing scored: no statistic (metrics.jsonl never holds NaN)
        return {}
    if scores.shape[1] < 2:  # one completion per prompt (PPO): no groups to describe
        return {"reward": torch.cat(groups).mean().item()}
    # a group with one scored sample has no spread to describe (and is no group for zero_std_groups)
    spread = [group for group in groups if group.numel() > 1]
    metrics = {"reward": torch.cat(groups).mean().item()}
    if spread:
        equal = [bool(losses.zero_std_groups(group.unsqueeze(0), group.numel())) for group in spread]
        metrics["reward_std"] = sum(group.std().item() for group in spread) / len(spread)
        metrics["frac_reward_zero_std"] = sum(equal) / len(equal)
    return metrics


def completion_metrics(samples: list[Sample]) -> dict[str, float]:
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(s.finish_reason == FINISH_LENGTH for s in samples) / len(samples),
    }


def function_means(per_function: dict[str, list[list[float | None]]]) -> dict[str, float]:
    """Each reward function's mean over the samples it scored (None left out); a function that scored no
    sample has no mean and its metric is left out (WeightedRewards warns, naming it), never NaN."""
    means = {}
    for name, groups in per_function.items():
        values = [value for group in groups for value in group if value is not None]
        if values:
            means[f"rewards/{name}/mean"] = sum(values) / len(values)
    return means


def monitor_functions_option():
    """The `monitor_functions` field of GRPO's and PPO's configs (one help text for both)."""
    return option(
        help="Gold monitor: reward functions that score the same completions without being optimised, logged "
        "as monitor/<name>/mean (reward hacking shows as the proxy rising while the gold falls).",
        factory=list,
    )


def check_monitors(names: list[str], prefix: str = "") -> None:
    """An unknown monitor function is a config error naming the key, said before anything loads (GRPO's and
    PPO's check(); a reward_model:<folder> monitor loads only when the run builds its monitors)."""
    for name in names:
        if isinstance(name, str) and not name.startswith("reward_model:"):
            try:
                get_reward_function(name)
            except ConfigError as error:
                raise ConfigError(f"{prefix}monitor_functions: {error}") from None


def build_monitors(names: list[str]) -> WeightedRewards | None:
    """The gold monitor's scorers, or None when no monitor function is configured."""
    return WeightedRewards(list(names)) if names else None


def monitor_metrics(monitors: WeightedRewards | None, rounds: list[ScoredGroups]) -> dict[str, float]:
    """The gold monitor: each monitor function's mean over every completion the rollout sampled, as
    monitor/<name>/mean. Only logged: its scores never reach the advantages or the loss."""
    if monitors is None:
        return {}
    per_function: dict[str, list] = {}
    for scored in rounds:
        for name, groups in score_samples(monitors, scored.rows, scored.samples).per_function.items():
            per_function.setdefault(name, []).extend(groups)
    means = function_means(per_function)
    return {key.replace("rewards/", "monitor/", 1): value for key, value in means.items()}
