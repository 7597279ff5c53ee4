"""Pair statistics of a reward model: accuracy with a Wilson 95% interval, margins, length correlation,
AUC."""

from __future__ import annotations

import bisect
import math
from typing import Any

from prefalign.rewards.scorer import (
    RewardModelScorer,
)

Z_95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (better than p ± z·se near 0 or 1 and for small n)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # At p = 0 or 1 one bound is exactly 0 or 1; computed, it can miss by a rounding error.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == total else min(1.0, center + half)
    return low, high


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant (undefined, not NaN)."""
    n = len(xs)
    if n < 2:
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    if var_x <= 0 or var_y <= 0:
        return None
    return cov / math.sqrt(var_x * var_y)


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann–Whitney)."""
    positives = [s for s, label in zip(scores, labels, strict=True) if label]
    negatives = [s for s, label in zip(scores, labels, strict=True) if not label]
    if not positives or not negatives:
        return None
    ranked = sorted(negatives)
    wins = sum(
        bisect.bisect_left(ranked, p) + 0.5 * (bisect.bisect_right(ranked, p) - bisect.bisect_left(ranked, p))
        for p in positives
    )
    return wins / (len(positives) * len(negatives))


def pair_metrics(
    chosen: list[float], rejected: list[float], chosen_lengths: list[int], rejected_lengths: list[int],
) -> dict[str, Any]:
    """Held-out metrics: pairwise accuracy with a 95% Wilson interval, mean margin, reward statistics, and
    the correlation of reward with completion length (tokens) over every completion (a length-bias sign)."""
    correct = sum(good > bad for good, bad in zip(chosen, rejected, strict=True))
    low, high = wilson_interval(correct, len(chosen))
    rewards = chosen + rejected
    mean = sum(rewards) / len(rewards)
    return {
        "num_pairs": len(chosen),
        "accuracy": correct / len(chosen),
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "margin": sum(good - bad for good, bad in zip(chosen, rejected, strict=True)) / len(chosen),
        "mean_reward": mean,
        "std_reward": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)),
        "min_reward": min(rewards),
        "max_reward": max(rewards),
        "length_correlation": pearson(rewards, [float(n) for n in chosen_lengths + rejected_lengths]),
    }


def evaluate_pairs(scorer: RewardModelScorer, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """pair_metrics of encoded examples (one batched scoring pass over chosen and rejected together)."""
    scores = scorer.score_sequences(
        [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    )
    bad = sum(not math.isfinite(s) for s in scores)
    if bad:
        from prefalign.errors import TrainingError

        raise TrainingError(f"the reward model returned {bad} non-finite score(s) on the evaluation pairs")
    half = len(examples)
    return pair_metrics(
        scores[:half], scores[half:], [e["chosen_length"] for e in examples],
        [e["rejected_length"] for e in examples],
    )


def format_pair_metrics(metrics: dict[str, Any]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        shown = "n/a (a side is constant)" if value is None else (
            f"{value:.4f}" if isinstance(value, float) else str(value)
        )
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)
