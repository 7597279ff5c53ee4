"""Reward over-optimisation (Gao, Schulman and Hilton 2022, "Scaling Laws for Reward Model Overoptimization"):
the learned reward model's score (the proxy the policy optimises) and a gold reward it never sees (the gold
monitor, `monitor/<name>/mean`) against √KL to the starting policy. Past some distance the proxy keeps rising
while the gold falls: the policy games the reward model.

For RL runs (GRPO, PPO) trained on a reward model with monitor functions. The distance is the held-out KL of
the evaluations (`eval/kl`, interpolated between them; the start is the starting policy, KL 0) when there are
at least three, else the KL the training steps log (`objective/kl`, `kl`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefalign.reporting.figures import COLOURS, DPI, FigureFile, ema, matching, new_figure, smoothing_span
from prefalign.reporting.runs import Run, series

PROXY_KEYS = ("rewards/reward_model/mean", "objective/scores", "reward")
TRAINING_KL_KEYS = (("objective/kl", "nats per sequence"), ("kl", "nats per token"))
MIN_EVALUATIONS = 3


@dataclass
class Trajectory:
    """One run's proxy and gold rewards along √KL: the logged points ordered by √KL, and running means over
    neighbouring points (a curve of reward against distance, as in the paper, whatever the step order)."""

    run: Run
    steps: list[float]
    sqrt_kl: list[float]
    proxy_key: str
    proxy: list[float]
    proxy_raw: list[float]
    gold: dict[str, list[float]]  # monitor key -> values
    kl_source: str  # in words, with its unit


def uses_reward_model(run: Run) -> bool:
    return bool(run.config.get("reward_model")) or "rewards/reward_model/mean" in run.keys()


def _interpolate(steps: Sequence[float], known_steps: Sequence[float], known: Sequence[float]) -> list[float]:
    import numpy

    return list(numpy.interp(steps, known_steps, known))


def kl_along(run: Run, steps: list[float]) -> tuple[list[float], str] | None:
    """KL to the starting policy at each of `steps`, and where it comes from; None when nothing logs it."""
    eval_steps, eval_kl = run.series("eval/kl")
    training = [(key, unit) for key, unit in TRAINING_KL_KEYS if key in run.keys()]
    if eval_steps and (len(eval_steps) >= MIN_EVALUATIONS or not training):
        start = [] if eval_steps[0] == 0 else [0.0]  # the starting policy is the reference: KL 0
        source = f"held-out, {len(eval_steps)} evaluation(s) interpolated (nats per sequence)"
        return _interpolate(steps, start + eval_steps, start + eval_kl), source
    for key, unit in training:
        kl_steps, kl = run.series(key)
        span = smoothing_span(len(kl))
        how = ", moving average" if span > 1 else ""
        return _interpolate(steps, kl_steps, ema(kl, span)), f"training `{key}`{how} ({unit})"
    return None


def trajectory(run: Run) -> Trajectory | None:
    keys = run.keys()
    gold_keys = matching(("monitor/*/mean",), keys)
    proxy_key = next((key for key in PROXY_KEYS if key in keys), None)
    if not (uses_reward_model(run) and gold_keys and proxy_key):
        return None
    steps, proxy = one_per_rollout(run, *run.series(proxy_key), gold_keys)
    kl = kl_along(run, steps)
    if not steps or kl is None:
        return None
    order = sorted(range(len(steps)), key=lambda index: (kl[0][index], steps[index]))
    window = max(1, round(len(steps) / 15))
    gold = {}
    for key in gold_keys:
        by_step = dict(zip(*series(run.records, key), strict=True))
        gold[key] = running_mean([by_step.get(steps[index], math.nan) for index in order], window)
    return Trajectory(
        run=run, steps=[steps[index] for index in order],
        sqrt_kl=[math.sqrt(max(kl[0][index], 0.0)) for index in order], proxy_key=proxy_key,
        proxy=running_mean([proxy[index] for index in order], window), proxy_raw=[proxy[i] for i in order],
        gold=gold, kl_source=kl[1],
    )


def one_per_rollout(
    run: Run, steps: list[float], proxy: list[float], gold_keys: list[str],
) -> tuple[list[float], list[float]]:
    """The first step of each rollout batch: the optimizer steps that train on one rollout (PPO's epochs,
    steps_per_generation) log its proxy and gold values again, which would count one point several times."""
    golds = [dict(zip(*series(run.records, key), strict=True)) for key in gold_keys]
    kept_steps, kept_proxy, previous = [], [], None
    for step, value in zip(steps, proxy, strict=True):
        rollout = (value, *(gold.get(step) for gold in golds))
        if rollout != previous:
            kept_steps.append(step)
            kept_proxy.append(value)
        previous = rollout
    return kept_steps, kept_proxy


def running_mean(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` neighbours (fewer at the ends), skipping NaN (a step that lacks the key)."""
    half = window // 2
    means = []
    for index in range(len(values)):
        near = [value for value in values[max(0, index - half):index + half + 1] if math.isfinite(value)]
        means.append(sum(near) / len(near) if near else math.nan)
    return means


def verdict(path: Trajectory) -> str:
    """What the curves show, in a sentence whose direction comes from the numbers: where the gold reward
    peaks, and whether the proxy kept rising while the gold fell after it."""
    name, gold_key = path.run.name, next(iter(path.gold))
    gold = [value for value in path.gold[gold_key] if math.isfinite(value)]
    if len(gold) < 2:
        return f"{name}: too few points to tell."
    peak = max(range(len(gold)), key=gold.__getitem__)
    fall, rise = gold[peak] - gold[-1], path.proxy[-1] - path.proxy[peak]
    spread = (max(gold) - min(gold)) or 1.0
    where = f"√KL {path.sqrt_kl[peak]:.2f} (step {path.steps[peak]:.0f})"
    gold_name = gold_key.removeprefix("monitor/").removesuffix("/mean")
    if peak < len(gold) - 1 and fall > 0.1 * spread and rise > 0:
        return (
            f"{name}: over-optimised. The gold reward ({gold_name}) peaks at {where} and then falls by "
            f"{fall:.3g} while the proxy ({path.proxy_key}) still rises by {rise:.3g}."
        )
    gold_change, proxy_change = gold[-1] - gold[0], path.proxy[-1] - path.proxy[0]
    together = "" if not (gold_change and proxy_change) else (
        " (together)" if (gold_change > 0) == (proxy_change > 0) else " (in opposite directions)"
    )
    return (
        f"{name}: no over-optimisation visible up to √KL {path.sqrt_kl[-1]:.2f}: from start to end the "
        f"gold reward ({gold_name}) {_moved(gold_change)} and the proxy {_moved(proxy_change)}"
        f"{together}."
    )


def _moved(change: float) -> str:
    return "did not change" if change == 0 else f"{'rose' if change > 0 else 'fell'} by {abs(change):.3g}"


def overoptimisation_figure(runs: Sequence[Run], folder: Path) -> tuple[FigureFile | None, list[str]]:
    """overoptimisation.png for the runs that have a reward model and a gold monitor, and what it shows."""
    paths = [path for run in runs if (path := trajectory(run))]
    if not paths:
        return None, []
    figure, (axes,) = new_figure(1, width=7.2, height=4.6)
    gold_axes = axes.twinx()
    lines, labels = [], []
    for index, path in enumerate(paths):
        single = len(paths) == 1
        proxy_colour = COLOURS[0] if single else COLOURS[index % len(COLOURS)]
        axes.plot(path.sqrt_kl, path.proxy_raw, ".", color=proxy_colour, alpha=0.18, markersize=3)
        prefix = "" if single else f"{path.run.name}: "
        marker = "o" if len(path.steps) < 20 else None  # few rollouts: show where the points are
        lines += axes.plot(path.sqrt_kl, path.proxy, "-", color=proxy_colour, linewidth=1.8, marker=marker,
                           markersize=4)  # fmt: skip
        labels.append(f"{prefix}proxy ({path.proxy_key})")
        for gold_index, (key, values) in enumerate(path.gold.items()):
            colour = COLOURS[1 + gold_index] if single else proxy_colour
            lines += gold_axes.plot(path.sqrt_kl, values, "--", color=colour, linewidth=1.8, marker=marker,
                                    markersize=4, markerfacecolor="white")  # fmt: skip
            labels.append(f"{prefix}gold ({key})")
    sources = "; ".join(dict.fromkeys(path.kl_source for path in paths))
    axes.set_title("Reward over-optimisation: proxy vs gold reward", fontsize=11)
    axes.set_xlabel(f"√KL to the starting policy (√nats)\nKL: {sources}", fontsize=9)
    axes.set_ylabel("proxy: reward-model score (solid)", fontsize=9, color="black")
    gold_axes.set_ylabel("gold: monitor reward per completion (dashed)", fontsize=9)
    for target in (axes, gold_axes):
        target.tick_params(labelsize=8)
    axes.grid(True, alpha=0.25, linewidth=0.6)
    axes.legend(lines, labels, fontsize=7.5, loc="best", framealpha=0.85)
    out = folder / "overoptimisation.png"
    figure.savefig(out, dpi=DPI)
    caption = (
        "Proxy (the reward model the policy optimises, solid, left axis) and gold reward (a monitor the "
        "policy never sees, dashed, right axis) against √KL to the starting policy, as in Gao et al. 2022; "
        "lines are running means over the logged points ordered by √KL, faint dots the logged proxy values."
    )
    return FigureFile(out, "Reward over-optimisation", caption, labels, ["over-optimisation"]), [
        verdict(path) for path in paths
    ]
