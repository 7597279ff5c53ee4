"""The figures of a run report: panels of metrics over optimizer steps, several runs overlaid.

Each figure is a grid of panels; a panel is drawn when at least one run logged one of its metrics, so a
figure is built from whatever metrics exist (a killed run's partial log included). Training curves show the
raw values faint and an exponential moving average on top; held-out evaluations (few points) are drawn as
points joined by lines. One run: one colour per metric. Several runs: one colour per run (the legend above
the panels names them), one line style per metric.

matplotlib is used through `matplotlib.figure.Figure` and the Agg canvas only: no pyplot state, no display.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.reporting.runs import Run

COLOURS = (  # matplotlib's tab10, reordered so the first ones differ most (also in greyscale)
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f",
)  # fmt: skip
LINE_STYLES = ("-", "--", ":", "-.")
DPI = 110


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # metric names; `*` matches any part (rewards/*/mean)
    ylabel: str
    log: bool | None = None  # None: log scale when every value is positive and they span over 30x
    band: tuple[str, str] | None = None  # metrics that bound a shaded interval (a 95% CI)
    min_keys: int = 1  # drawn only when a run logged at least this many of its metrics


@dataclass
class FigureFile:
    """A figure written to disk: its file, what it shows (the report's caption), the legend's entries."""

    path: Path
    title: str
    caption: str
    legend: list[str] = field(default_factory=list)
    panels: list[str] = field(default_factory=list)


# Units that depend on the algorithm, by the name a panel's axis label uses ({loss}, {pair_reward}).
UNITS: dict[str, dict[str, str]] = {
    "loss": {
        "sft": "nats per token", "dpo": "nats per pair", "iterative_dpo": "nats per pair",
        "reward": "nats per pair", "grpo": "surrogate, no unit", "ppo": "surrogate, no unit",
    },
    "pair_reward": {
        "dpo": "β·log π/π_ref, nats", "iterative_dpo": "β·log π/π_ref, nats", "reward": "reward-model score",
    },
}  # fmt: skip

TRAINING_FIGURES: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "optimisation": ("optimisation", (
        Panel("Training loss", ("loss",), "loss ({loss})"),
        Panel("Gradient norm (before clipping)", ("grad_norm",), "global L2 norm"),
        Panel("Learning rate", ("learning_rate",), "learning rate"),
        Panel("Throughput", ("tokens_per_second",), "tokens / s"),
        Panel("Generation share of the step", ("generation_share",), "fraction of step time"),
    )),
    "preferences": ("preference pairs", (
        Panel("Rewards of chosen and rejected", ("rewards/chosen", "rewards/rejected"),
              "reward ({pair_reward})"),
        Panel("Reward margin (chosen − rejected)", ("rewards/margins", "margin"), "margin ({pair_reward})"),
        Panel("Pair accuracy (chosen above rejected)", ("rewards/accuracies", "accuracy"),
              "fraction of pairs"),
        Panel("Sequence log-probabilities", ("logps/chosen", "logps/rejected"), "log π (nats per sequence)"),
        Panel("NLL term (RPO)", ("nll_loss",), "nats per token"),
        Panel("Reward-model scores", ("mean_reward", "std_reward"), "score (reward-model units)"),
    )),
    "rl-reward": ("RL rewards", (
        Panel("Reward", ("reward",), "reward per completion"),
        Panel("Reward spread", ("reward_std",), "reward std"),
        Panel("Reward by function", ("rewards/*/mean",), "mean reward per completion", min_keys=2),
        Panel("Gold monitor (not optimised)", ("monitor/*/mean",), "mean gold reward per completion"),
        Panel("PPO objective", ("objective/scores", "objective/rlhf_reward", "objective/non_score_reward"),
              "per completion (score units)"),
        Panel("Groups with no reward spread", ("frac_reward_zero_std",), "fraction of groups"),
    )),
    "rl-policy": ("RL policy", (
        Panel("KL to the reference (GRPO)", ("kl",), "KL (nats per token)"),
        Panel("KL to the reference (PPO)", ("objective/kl",), "KL (nats per sequence)"),
        Panel("Entropy", ("entropy", "policy/entropy_avg"), "entropy (nats per token)"),
        Panel("Clipped fraction", ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                   "policy/clipfrac_avg", "val/clipfrac_avg"), "fraction of tokens"),
        Panel("Completion length", ("completions/mean_length",), "tokens"),
        Panel("Completions cut at max_new_tokens", ("completions/clipped_ratio",), "fraction of completions"),
        Panel("Value loss (critic)", ("loss/value_avg",), "squared error (score units²)"),
        Panel("Policy change per update", ("policy/approxkl_avg",), "approx. KL (nats per token)"),
        Panel("KL coefficient β", ("beta",), "β"),
    )),
}  # fmt: skip

EVALUATION_PANELS = (
    Panel("Held-out loss", ("eval/loss",), "loss ({loss})"),
    Panel("Held-out accuracy", ("eval/accuracy", "heldout/accuracy", "eval/pass@*"), "fraction correct",
          band=("eval/accuracy_ci95_low", "eval/accuracy_ci95_high")),
    Panel("Held-out pair accuracy (implicit reward)", ("eval/rewards/accuracies",), "fraction of pairs"),
    Panel("Held-out rewards of chosen and rejected", ("eval/rewards/chosen", "eval/rewards/rejected"),
          "reward ({pair_reward})"),
    Panel("Held-out margin", ("eval/rewards/margins", "eval/margin"), "margin ({pair_reward})"),
    Panel("Held-out log-probabilities", ("eval/logps/chosen", "eval/logps/rejected"),
          "log π (nats per sequence)"),
    Panel("Held-out mean reward", ("eval/mean_reward", "heldout/mean_reward"), "reward per completion"),
    Panel("Held-out gold monitor", ("eval/monitor/*",), "gold reward per completion"),
    Panel("Held-out KL to the starting policy", ("eval/kl",), "KL (nats per sequence)"),
    Panel("Held-out completion length", ("eval/mean_length", "heldout/mean_length"), "tokens"),
    Panel("Held-out NLL (RPO)", ("eval/nll_loss",), "nats per token"),
)  # fmt: skip
# Bookkeeping of an evaluation, not a curve (the CI bounds are drawn as the accuracy's band).
EVALUATION_SKIPPED = (
    "eval/num_prompts", "eval/num_pairs", "eval/reward_failures", "eval/accuracy_ci95_low",
    "eval/accuracy_ci95_high", "eval/min_reward", "eval/max_reward", "eval/std_reward", "eval/seconds",
)  # fmt: skip


def matching(patterns: Sequence[str], keys: set[str]) -> list[str]:
    """The metric names among `keys` a panel shows, in the panel's order (patterns expand sorted)."""
    found: list[str] = []
    for pattern in patterns:
        hits = sorted(key for key in keys if fnmatch.fnmatchcase(key, pattern)) if "*" in pattern else (
            [pattern] if pattern in keys else []
        )
        found += [key for key in hits if key not in found]
    return found


def smoothing_span(points: int) -> float:
    """EMA span in steps: about a fortieth of the curve, so 300 steps average over ~8 and 2,500 over ~60;
    curves under 60 points are not smoothed (every point is already visible)."""
    return points / 40 if points >= 60 else 1.0


def ema(values: Sequence[float], span: float) -> list[float]:
    """Exponential moving average with weight 1 − 1/span, debiased at the start (as TensorBoard's)."""
    if span <= 1:
        return list(values)
    weight = 1 - 1 / span
    average = normaliser = 0.0
    smoothed = []
    for value in values:
        average = weight * average + (1 - weight) * value
        normaliser = weight * normaliser + (1 - weight)
        smoothed.append(average / normaliser)
    return smoothed


def wants_log(values: Sequence[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) > 30


def short_label(key: str) -> str:
    return key.removeprefix("eval/").removesuffix("/mean").removesuffix("_mean").removesuffix("_avg")


def new_figure(panels: int, *, columns: int = 3, width: float = 4.4, height: float = 3.2, top: float = 0.0):
    """An Agg figure with a grid of `panels` axes (constrained layout: nothing clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows + top), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, list(axes[:panels])


def style_axes(axes, title: str, ylabel: str, xlabel: str = "optimizer step") -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title, fontsize=10.5)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(True, alpha=0.25, linewidth=0.6)


def axis_label(label: str, runs: Sequence[Run]) -> str:
    """`label` with its {unit} fields filled for the runs' algorithms; where they differ the axis says so and
    the caption lists them (unit_notes)."""
    fields = {}
    for name, table in UNITS.items():
        units = list(dict.fromkeys(table.get(run.algorithm, "no unit") for run in runs))
        fields[name] = units[0] if len(units) == 1 else "unit by algorithm: see the caption"
    return label.format(**fields)


def unit_notes(runs: Sequence[Run]) -> str:
    """The units of the runs' algorithms where an axis mixes them (several algorithms overlaid)."""
    notes = []
    for name, table in UNITS.items():
        units = {run.label: table.get(run.algorithm, "no unit") for run in runs}
        if len(set(units.values())) > 1:
            listed = ", ".join(f"{label}: {unit}" for label, unit in units.items())
            notes.append(f" Units of {name.replace('_', ' ')}: {listed}.")
    return "".join(notes)


def draw_panel(axes, panel: Panel, runs: Sequence[Run], *, evaluation: bool) -> list[str]:
    """Draw every run's metrics of `panel`; returns the labels drawn (for the panel's legend)."""
    keys = matching(panel.keys, set().union(*(run.keys() for run in runs)))
    labels, values_seen = [], []
    for run_index, run in enumerate(runs):
        for key_index, key in enumerate(keys):
            steps, values = run.series(key)
            if not steps:
                continue
            colour = COLOURS[(run_index if len(runs) > 1 else key_index) % len(COLOURS)]
            style = LINE_STYLES[key_index % len(LINE_STYLES)] if len(runs) > 1 else "-"
            label = short_label(key) if len(runs) == 1 else (
                run.name if len(keys) == 1 else f"{run.name}: {short_label(key)}"
            )
            values_seen += values
            if evaluation or len(steps) < 8:
                axes.plot(steps, values, style, color=colour, marker="o", markersize=3.5, linewidth=1.4,
                          label=label)  # fmt: skip
            else:
                axes.plot(steps, values, "-", color=colour, alpha=0.22, linewidth=0.8)
                axes.plot(steps, ema(values, smoothing_span(len(values))), style, color=colour, linewidth=1.6,
                          label=label)  # fmt: skip
            labels.append(label)
            if panel.band and key == panel.keys[0]:
                _draw_band(axes, run, panel.band, colour)
        for start in run.round_starts[1:]:  # iterative DPO: where each round after the first starts
            axes.axvline(start, color="#999999", linestyle=":", linewidth=0.9)
    log = panel.log if panel.log is not None else wants_log(values_seen)
    if log:
        axes.set_yscale("log")
    else:  # a flat curve (a constant learning rate) reads 1e-4, not "1e-16 + 1e-4"
        axes.ticklabel_format(axis="y", useOffset=False)
    style_axes(axes, panel.title, axis_label(panel.ylabel, runs) + (", log scale" if log else ""))
    if len(labels) > 1 and (len(runs) == 1 or len(keys) > 1):
        axes.legend(fontsize=7.5, framealpha=0.85, loc="best")
    return labels


def _draw_band(axes, run: Run, band: tuple[str, str], colour: str) -> None:
    low_steps, low = run.series(band[0])
    high_steps, high = run.series(band[1])
    if low_steps and low_steps == high_steps:
        axes.fill_between(low_steps, low, high, color=colour, alpha=0.15, linewidth=0, label="_95% CI")


def run_legend(figure, runs: Sequence[Run]) -> list[str]:
    """Several runs: one legend above the panels, a colour per run name."""
    from matplotlib.lines import Line2D

    if len(runs) < 2:
        return [run.name for run in runs]
    handles = [Line2D([], [], color=COLOURS[i % len(COLOURS)], linewidth=2.2) for i in range(len(runs))]
    names = [f"{run.name} ({run.label})" for run in runs]
    figure.legend(handles, names, loc="outside lower center", ncols=min(len(runs), 4), fontsize=9.5,
                  frameon=False)  # fmt: skip
    return names


def has_panel(run: Run, panel: Panel, points: int) -> bool:
    keys = matching(panel.keys, run.keys())
    return len(keys) >= panel.min_keys and any(len(run.series(key)[0]) >= points for key in keys)


def grid_figure(
    path: Path, title: str, caption: str, panels: Sequence[Panel], runs: Sequence[Run], *, evaluation: bool,
) -> FigureFile | None:
    """One figure of the `panels` that have data in `runs`; None (nothing written) when none has. Held-out
    panels need a curve: two evaluations or more in some run (a lone final one is listed in report.md)."""
    points = 2 if evaluation else 1
    shown = [panel for panel in panels if any(has_panel(run, panel, points) for run in runs)]
    if not shown:
        return None
    figure, axes = new_figure(len(shown), top=0.35 if len(runs) > 1 else 0.0)
    for panel, axis in zip(shown, axes, strict=True):
        draw_panel(axis, panel, runs, evaluation=evaluation)
    figure.suptitle(title, fontsize=12, fontweight="bold")
    legend = run_legend(figure, runs)
    figure.savefig(path, dpi=DPI)
    return FigureFile(path, title, caption, legend, [panel.title for panel in shown])


def training_figures(runs: Sequence[Run], folder: Path) -> list[FigureFile]:
    """training-<group>.png for each group of panels some run logged."""
    written = []
    smoothing = (
        "a curve of 60 or more points is drawn as its moving average (EMA, span about 1/40 of the curve) "
        "over the logged values, faint"
    )
    for name, (title, panels) in TRAINING_FIGURES.items():
        done = grid_figure(
            folder / f"training-{name}.png", f"Training: {title}",
            f"{title[0].upper()}{title[1:]} over optimizer steps; {smoothing}.{unit_notes(runs)}", panels,
            runs, evaluation=False,
        )
        if done:
            written.append(done)
    return written


def evaluation_panels(runs: Sequence[Run]) -> list[Panel]:
    """EVALUATION_PANELS, then one panel for each other held-out metric a run logged."""
    keys = set().union(*(run.keys() for run in runs)) if runs else set()
    covered = {key for panel in EVALUATION_PANELS for key in matching(panel.keys, keys)}
    others = sorted(
        key for key in keys
        if key.startswith(("eval/", "heldout/")) and key not in covered and key not in EVALUATION_SKIPPED
    )  # fmt: skip
    extra = [Panel(f"Held-out {short_label(key)}", (key,), short_label(key)) for key in others]
    return [*EVALUATION_PANELS, *extra]


def evaluation_figure(runs: Sequence[Run], folder: Path) -> FigureFile | None:
    return grid_figure(
        folder / "evaluation.png", "Held-out evaluations",
        "Held-out evaluations at each evaluation step (train.eval_every) and at the end; for iterative DPO "
        "the held-out accuracy after each round. The shaded band is a 95% confidence interval where the "
        f"evaluation gives one.{unit_notes(runs)}", evaluation_panels(runs), runs, evaluation=True,
    )
