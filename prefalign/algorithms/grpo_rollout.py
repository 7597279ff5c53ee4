"""GRPO's rollout batch: G completions per prompt, scored, groups kept (DAPO's dynamic sampling refills),
rewards turned into group advantages, one experience row per completion.

An unscored sample (its reward function failed, or every function returned None) keeps its group: it is
left out of the group's statistics, gets advantage 0 and stays out of the loss (as TRL does), counted in
`rewards/unscored_samples`. A group with no scored sample at all is dropped (`rewards/dropped_groups`).
"""

from __future__ import annotations

import logging
import math

import torch

from prefalign import losses
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.rl.rollout import (
    ScoredGroups,
    completion_metrics,
    function_means,
    monitor_metrics,
    reward_metrics,
    sample_and_score,
)
from prefalign.algorithms.rl.source import Progress, RolloutBatch
from prefalign.errors import TrainingError
from prefalign.rewards import WeightedRewards, describe_failures
from prefalign.rollout.types import FINISH_LENGTH, SamplingParams

logger = logging.getLogger("prefalign")


def sampling_params(config: GRPOConfig, seed: int) -> SamplingParams:
    return SamplingParams(
        n=config.num_generations, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_new_tokens=config.max_new_tokens, seed=seed,
    )  # fmt: skip


def usable_groups(scores: torch.Tensor, config: GRPOConfig) -> list[bool]:
    """Groups that can train: a scored sample; with dynamic sampling, scored rewards not all equal."""
    usable = []
    for group in scores:
        scored = group[~torch.isnan(group)]
        keep = scored.numel() > 0
        if keep and config.dynamic_sampling:
            keep = not bool(losses.zero_std_groups(scored.unsqueeze(0), scored.numel()))
        usable.append(keep)
    return usable


def collect_rollout(
    engine, prompts, rewards: WeightedRewards, config: GRPOConfig, monitors: WeightedRewards | None = None
):
    """collect(progress, next_prompt) for the ExperienceSource: sample and score groups until the rollout
    batch is full (one generation call without dynamic sampling); the gold monitor, if any, scores every
    sampled completion for the metrics only."""

    def collect(progress: Progress, next_prompt) -> RolloutBatch:
        rewards.trainer_state.global_step = progress.step  # what TRL's reward functions read as trainer_state
        wanted = config.train.batch_size * config.train.grad_accum // config.num_generations
        wanted *= config.steps_per_generation
        kept: list[tuple[dict, list, torch.Tensor]] = []
        rounds: list[ScoredGroups] = []
        while len(rounds) < config.max_sampling_rounds and len(kept) < wanted:
            row_ids = [next_prompt() for _ in range(wanted)]
            # Seeds follow the count of generation calls, so a resumed run samples what the whole run would.
            seed = config.train.seed * 1_000_003 + progress.generation_calls
            progress.generation_calls += 1
            scored = sample_and_score(
                engine, [prompts[i] for i in row_ids], row_ids, rewards, sampling_params(config, seed)
            )
            if config.overlong_buffer:
                lengths = torch.tensor(
                    [[len(s.token_ids) for s in group] for group in scored.samples], dtype=torch.float32
                )
                scored.scores = scored.scores + losses.overlong_penalty(
                    lengths, config.max_new_tokens, config.overlong_buffer
                )
            rounds.append(scored)
            usable = usable_groups(scored.scores, config)
            groups = zip(scored.rows, scored.samples, scored.scores, strict=True)
            kept += [group for group, use in zip(groups, usable, strict=True) if use]
            if not config.dynamic_sampling:
                break
        failures = [failure for scored in rounds for failure in scored.failures]
        if failures:
            logger.warning("%s", describe_failures(failures))
        if not kept:
            raise TrainingError(
                f"no usable group in the rollout batch before optimizer step {progress.step + 1} "
                f"({len(rounds)} sampling round(s)): {no_group_reason(rounds, failures)}"
            )
        if config.dynamic_sampling and len(kept) < wanted:
            logger.warning(
                "dynamic sampling: %d of %d groups after %d rounds (max_sampling_rounds); training on those",
                len(kept), wanted, len(rounds),
            )  # fmt: skip
        kept = kept[:wanted]
        batch = RolloutBatch(rows=[], group_size=config.num_generations)
        batch.metrics = {**rollout_metrics(rounds, failures, config), **monitor_metrics(monitors, rounds)}
        batch.metrics["groups_trained"] = len(kept)
        if config.dynamic_sampling:
            batch.metrics["dynamic_sampling/rounds"] = len(rounds)
            batch.metrics["dynamic_sampling/short_batch"] = float(len(kept) < wanted)
        add_experience(batch, kept, config)
        return batch

    return collect


def no_group_reason(rounds: list[ScoredGroups], failures) -> str:
    if failures:
        return describe_failures(failures)
    if all(torch.isnan(scored.scores).all(dim=1).any() for scored in rounds):
        return "no sample scored (every reward function returned None) in any group"
    return "every group had all-equal rewards"


def rollout_metrics(rounds: list[ScoredGroups], failures, config: GRPOConfig) -> dict[str, float]:
    """Reward and completion statistics over every sampled completion (TRL's names)."""
    scores = torch.cat([scored.scores for scored in rounds])  # (groups, G), NaN = unscored
    samples = [sample for scored in rounds for group in scored.samples for sample in group]
    per_function: dict[str, list] = {}
    for scored in rounds:
        for name, groups in scored.per_function.items():
            per_function.setdefault(name, []).extend(groups)
    unscored = torch.isnan(scores)
    return {
        **reward_metrics(scores),
        **completion_metrics(samples),
        "rewards/failed_samples": len(failures),
        "rewards/unscored_samples": int(unscored.sum()),
        "rewards/dropped_groups": int(unscored.all(dim=1).sum()),
        **function_means(per_function),
    }


def advantages_of(scores: torch.Tensor, config: GRPOConfig) -> torch.Tensor:
    """Group advantages (losses.group_advantages); unscored samples are left out of their group's
    statistics and get 0. scale_rewards=batch divides by the std of every scored reward of the batch, over
    every process (each samples a share of the batch and every one holds all its scores: ShardedEngine)."""
    unscored = torch.isnan(scores)
    batch_std = None
    if config.scale_rewards == "batch":
        batch_std = scores[~unscored].std()
    if not unscored.any():
        return losses.group_advantages(
            scores, config.num_generations, scale=config.scale_rewards, batch_std=batch_std
        )
    advantages = torch.zeros_like(scores)
    for index, group in enumerate(scores):
        scored = ~torch.isnan(group)
        if int(scored.sum()) > 1:
            values = group[scored].unsqueeze(0)
            advantages[index, scored] = losses.group_advantages(
                values, values.shape[1], scale=config.scale_rewards, batch_std=batch_std
            ).squeeze(0)
    return advantages


def add_experience(batch: RolloutBatch, kept, config: GRPOConfig) -> None:
    """One experience row per completion, with its group advantage."""
    scores = torch.stack([score for _, _, score in kept])  # (groups, G)
    advantages = advantages_of(scores, config)
    for (row, samples, score), group_advantages in zip(kept, advantages, strict=True):
        for sample, reward, advantage in zip(samples, score.tolist(), group_advantages.tolist(), strict=True):
            truncated = sample.finish_reason == FINISH_LENGTH
            scored = not math.isnan(reward)
            batch.rows.append({
                "prompt_ids": row["prompt_ids"], "completion_ids": sample.token_ids,
                "sampler_logps": sample.logprobs, "advantage": advantage, "reward": reward,
                "trained": scored and not (truncated and config.mask_truncated_completions),
            })  # fmt: skip
            if len(batch.logged) < config.num_completions_to_log:
                batch.logged.append({
                    "prompt": row["prompt"], "completion": sample.text, "reward": reward,
                    "advantage": advantage, "finish_reason": sample.finish_reason,
                    "tokens": len(sample.token_ids),
                })  # fmt: skip
