"""GRPO's rollout batch: sample G completions per prompt, score them, keep usable groups (DAPO's dynamic
sampling refills), turn rewards into group advantages, and the statistics to log."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prefalign import losses
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.errors import TrainingError
from prefalign.rewards import WeightedRewards, describe_failures
from prefalign.rewards.functions import as_completion
from prefalign.rollout.types import FINISH_LENGTH, SamplingParams

logger = logging.getLogger("prefalign")


@dataclass
class Rollout:
    """Scored, kept groups ready for optimisation, and what to log about them."""

    examples: list[dict[str, Any]] = field(default_factory=list)  # one per completion, groups contiguous
    metrics: dict[str, float] = field(default_factory=dict)
    logged: list[dict[str, Any]] = field(default_factory=list)
    generation_time: float = 0.0


def sample_groups(engine, rows, row_ids, rewards: WeightedRewards, config: GRPOConfig, seed: int):
    """Generate G completions per row and score them.

    Returns samples (per row, G each), scores (rows, G) with NaN where a sample has no score (a reward
    failed or every function returned None), per-function scores and the failures.
    """
    group = config.num_generations
    params = SamplingParams(
        n=group, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_new_tokens=config.max_new_tokens, seed=seed,
    )
    samples = engine.generate([row["prompt_ids"] for row in rows], params)
    owners = [row for row in rows for _ in range(group)]
    flat = [sample for samples_of_row in samples for sample in samples_of_row]
    # TRL's convention: conversational prompts get their completion as an assistant message.
    completions = [as_completion(o["prompt"], s.text) for s, o in zip(flat, owners, strict=True)]
    columns = {name: [o[name] for o in owners] for name in rows[0] if name not in ("prompt", "prompt_ids")}
    total, per_function, failures = rewards(
        [o["prompt"] for o in owners], completions, completion_ids=[s.token_ids for s in flat], **columns,
    )
    for failure in failures:  # flat position -> (training row, sample), so the message points at the data
        row, failure.sample_index = divmod(failure.prompt_index, group)
        failure.prompt_index = row_ids[row]
    scores = torch.tensor([math.nan if value is None else value for value in total]).view(len(rows), group)
    if config.overlong_buffer:
        lengths = torch.tensor([len(s.token_ids) for s in flat], dtype=torch.float32).view(len(rows), group)
        scores = scores + losses.overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer)
    return samples, scores, per_function, failures


def collect_rollout(
    engine, prompts, stream, rewards, config: GRPOConfig, progress: dict[str, int],
) -> Rollout:
    """Sample and score groups until the rollout batch is full (one round without dynamic sampling)."""
    started = time.perf_counter()
    wanted = (
        config.train.batch_size * config.train.grad_accum // config.num_generations
        * config.steps_per_generation
    )
    kept: list[tuple[dict, list, torch.Tensor]] = []
    all_scores, all_samples, per_function, failures = [], [], {}, []
    rounds = 0
    while rounds < config.max_sampling_rounds and len(kept) < wanted:
        row_ids = [next(stream) for _ in range(wanted)]
        rows = [prompts[i] for i in row_ids]
        # Seeds follow the count of generation calls, so a resumed run samples what the whole run would.
        seed = config.train.seed * 1_000_003 + progress["generation_calls"]
        progress["position"] += wanted
        progress["generation_calls"] += 1
        rounds += 1
        samples, scores, scored, failed = sample_groups(engine, rows, row_ids, rewards, config, seed)
        failures += failed
        for name, values in scored.items():
            per_function.setdefault(name, []).extend(v for v in values if v is not None)
        all_scores.append(scores)
        all_samples += [s for samples_of_row in samples for s in samples_of_row]
        usable = ~torch.isnan(scores).any(dim=1)  # a group with an unscored sample is dropped (counted)
        if config.dynamic_sampling:
            usable &= ~losses.zero_std_groups(torch.nan_to_num(scores), config.num_generations)
        kept += [
            item
            for item, use in zip(zip(rows, samples, scores, strict=True), usable.tolist(), strict=True)
            if use
        ]
        if not config.dynamic_sampling:
            break
    if failures:
        logger.warning("%s", describe_failures(failures))
    if not kept:
        unscored = bool(torch.isnan(torch.cat(all_scores)).any())
        reason = (
            describe_failures(failures) if failures
            else "a sample with no score (every reward function returned None) in every group" if unscored
            else "every group had all-equal rewards"
        )
        raise TrainingError(
            f"no usable group in the rollout batch before optimizer step {progress['step'] + 1} ({rounds} "
            f"sampling round(s)): {reason}"
        )
    if config.dynamic_sampling and len(kept) < wanted:
        logger.warning(
            "dynamic sampling: %d of %d groups after %d rounds (max_sampling_rounds); training on those",
            len(kept), wanted, rounds,
        )
    kept = kept[:wanted]
    rollout = Rollout(generation_time=time.perf_counter() - started)
    rollout.metrics = rollout_metrics(torch.cat(all_scores), all_samples, per_function, failures, config)
    if config.dynamic_sampling:
        rollout.metrics.update(
            {"dynamic_sampling/rounds": rounds, "dynamic_sampling/short_batch": float(len(kept) < wanted)}
        )
    rollout.metrics["groups_trained"] = len(kept)
    build_examples(rollout, kept, config)
    return rollout


def rollout_metrics(scores, samples, per_function, failures, config: GRPOConfig) -> dict[str, float]:
    """Reward and completion statistics over every sampled completion (TRL's names)."""
    scored = scores[~torch.isnan(scores).any(dim=1)]  # (scored groups, G)
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    has_scores = scored.numel() > 0
    metrics = {
        "reward": scored.mean().item() if has_scores else math.nan,
        "reward_std": scored.std(dim=1).mean().item() if has_scores else math.nan,  # mean within-group std
        "frac_reward_zero_std": (
            losses.zero_std_groups(scored, config.num_generations).float().mean().item() if has_scores
            else math.nan
        ),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(s.finish_reason == FINISH_LENGTH for s in samples) / len(samples),
        "rewards/failed_samples": len(failures),
        "rewards/dropped_groups": int(torch.isnan(scores).any(dim=1).sum()),
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = sum(values) / len(values) if values else math.nan
    return metrics


def build_examples(rollout: Rollout, kept, config: GRPOConfig) -> None:
    """One training example per completion, with its group advantage and log π_old."""
    scores = torch.stack([score for _, _, score in kept])  # (groups, G)
    advantages = losses.group_advantages(scores, config.num_generations, scale=config.scale_rewards)
    for (row, samples, score), group_advantages in zip(kept, advantages, strict=True):
        for sample, reward, advantage in zip(samples, score.tolist(), group_advantages.tolist(), strict=True):
            truncated = sample.finish_reason == FINISH_LENGTH
            rollout.examples.append({
                "prompt_ids": row["prompt_ids"], "completion_ids": sample.token_ids,
                "old_logps": sample.logprobs, "advantage": advantage,
                "trained": not (truncated and config.mask_truncated_completions),
            })  # fmt: skip
            if len(rollout.logged) < config.num_completions_to_log:
                rollout.logged.append({
                    "prompt": row["prompt"], "completion": sample.text, "reward": reward,
                    "advantage": advantage, "finish_reason": sample.finish_reason,
                    "tokens": len(sample.token_ids),
                })  # fmt: skip
