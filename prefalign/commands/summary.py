"""What a user sees at the end of a training command: where the model is, the metrics that matter for that
algorithm (last train values, then the final eval), wall time and throughput. The CLI prints it on stdout."""

from __future__ import annotations

import math
from typing import Any

# The train metrics worth a line for each command, in order; eval metrics are the same names under `eval/`
# plus the policy evaluation's (accuracy, pass@k) where the command has one. Names absent from a run are
# left out, so a loss variant or an older metrics.jsonl never breaks the summary.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss",),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "nll_loss"),
    "reward": ("loss", "accuracy", "margin"),
    "grpo": ("reward", "kl", "completions/mean_length", "loss"),
    "ppo": ("objective/scores", "objective/rlhf_reward", "objective/kl", "completions/mean_length"),
}
EVAL_METRICS = ("loss", "accuracy", "mean_reward", "rewards/accuracies", "rewards/margins", "margin")


def _last(metrics: list[dict[str, Any]], key: str) -> float | None:
    for record in reversed(metrics):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _format(values: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in values.items())


def tokens_per_second(metrics: list[dict[str, Any]]) -> float | None:
    """Tokens over seconds of the logged steps (each step's tokens/s weighted by its time)."""
    tokens = seconds = 0.0
    for record in metrics:
        rate, step_time = record.get("tokens_per_second"), record.get("step_time")
        if isinstance(rate, (int, float)) and isinstance(step_time, (int, float)) and step_time > 0:
            tokens += rate * step_time
            seconds += step_time
    return tokens / seconds if seconds else None


def training_summary(command: str, result: Any) -> str:
    """A few lines: the final model's folder, the last train and eval metrics, wall time, tokens/s."""
    metrics = list(getattr(result, "metrics", []) or [])
    run_dir = getattr(result, "run_dir", None)
    final = getattr(result, "model_dir", None) or (run_dir / "final" if run_dir is not None else None)
    lines = [f"prefalign {command}: done, {getattr(result, 'step', 0)} steps"]
    if final is not None:
        where = str(final) if final.exists() else f"{final} (not saved: save=False)"
        lines.append(f"  model:   {where}")
    keys = KEY_METRICS.get(command, ("loss",))
    train = {key: value for key in keys if (value := _last(metrics, key)) is not None}
    if train:
        lines.append(f"  train:   {_format(train)} (last logged step)")
    evaluation = {}
    for key in EVAL_METRICS:
        value = _last(metrics, f"eval/{key}")
        if value is not None:
            evaluation[key] = value
    for key in sorted({k for record in metrics for k in record if k.startswith("eval/pass@")}):
        evaluation[key.removeprefix("eval/")] = _last(metrics, key)
    held_out = getattr(result, "evaluation", None)  # the reward model's pair metrics
    if isinstance(held_out, dict):
        for key in ("accuracy", "margin"):
            if isinstance(held_out.get(key), (int, float)):
                evaluation[key] = float(held_out[key])
    if evaluation:
        lines.append(f"  eval:    {_format(evaluation)}")
    wall = float(getattr(result, "wall_time", 0.0) or 0.0)
    rate = tokens_per_second(metrics)
    timing = f"  time:    {wall:.1f} s wall" if wall else "  time:    (finished earlier: nothing trained now)"
    if rate is not None:
        timing += f", {rate:,.0f} tokens/s"
    lines.append(timing)
    return "\n".join(lines)
