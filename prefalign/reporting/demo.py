"""The demo report's figures and statements (`prefalign demo` -> runs/demo/report.md), from its results.json
and the stages' run folders: held-out greedy accuracy by method, accuracy against training compute and against
KL to the base, each stage's training curves, and sentences on the seed's claims whose direction comes from
the numbers (DPO cheaper and a little worse; RL costlier and best at reasoning; reward models can be gamed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.reporting.compute import Compute, method_compute, stage_folder
from prefalign.reporting.figures import DPI, FigureFile, new_figure
from prefalign.reporting.report import REPORT_FILE, write_report

METHODS = {"base": "base (SFT)", "dpo": "DPO", "iterative": "iterative DPO", "grpo": "GRPO", "ppo": "PPO"}
RL_METHODS = ("grpo", "ppo")
METHOD_COLOURS = {
    "base": "#7f7f7f", "dpo": "#1f77b4", "iterative": "#17becf", "grpo": "#d62728", "ppo": "#ff7f0e",
}  # fmt: skip
PART_COLOURS = (
    "#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a", "#ff7f0e", "#9467bd",
)  # fmt: skip
# The stages' figure shown in the demo report (all of them are in <stage>/report/).
STAGE_FIGURES = {
    "reward": ("reward model", "training-preferences.png"),
    "dpo": ("DPO", "training-preferences.png"),
    "iterative": ("iterative DPO", "training-preferences.png"),
    "grpo": ("GRPO", "training-rl-reward.png"),
    "ppo": ("PPO", "overoptimisation.png"),
}
TERA = 1e12


@dataclass
class MethodResult:
    method: str
    accuracy: float
    num_prompts: int
    pass_at_8: float | None
    kl: float | None
    compute: Compute | None

    @property
    def label(self) -> str:
        return METHODS[self.method]

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.accuracy, self.num_prompts)


def wilson_interval(share: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion measured on `count` items."""
    if count <= 0:
        return share, share
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return centre - half, centre + half


def method_results(results: dict[str, Any]) -> list[MethodResult]:
    """The methods the demo ran, in METHODS order, with their held-out numbers and training compute."""
    found = []
    for method in METHODS:
        entry = results.get(method)
        if not isinstance(entry, dict):
            continue
        held_out = entry if method == "base" else entry.get("after")
        if not isinstance(held_out, dict) or not isinstance(held_out.get("accuracy"), (int, float)):
            continue
        found.append(MethodResult(
            method=method, accuracy=float(held_out["accuracy"]),
            num_prompts=int(held_out.get("num_prompts", 0)), pass_at_8=held_out.get("pass@8"),
            kl=0.0 if method == "base" else held_out.get("kl"),
            compute=None if method == "base" else method_compute(method, results),
        ))  # fmt: skip
    return found


def accuracy_figure(methods: Sequence[MethodResult], folder: Path) -> FigureFile:
    figure, (axes,) = new_figure(1, width=7.0, height=4.2)
    positions = range(len(methods))
    for index, result in zip(positions, methods, strict=True):
        low, high = result.interval
        axes.bar(index, result.accuracy, color=METHOD_COLOURS[result.method], width=0.62)
        axes.errorbar(index, result.accuracy, yerr=[[result.accuracy - low], [high - result.accuracy]],
                      color="black", capsize=4, linewidth=1)  # fmt: skip
        axes.text(index, 0.02, f"{result.accuracy:.3f}", ha="center", fontsize=9.5, color="white")
    with_pass = [(i, r.pass_at_8) for i, r in zip(positions, methods, strict=True) if r.pass_at_8 is not None]
    if with_pass:
        axes.plot([i for i, _ in with_pass], [v for _, v in with_pass], "D", color="black", markersize=5,
                  markerfacecolor="white", label="pass@8 (any of 8 samples right)")  # fmt: skip
        axes.legend(fontsize=8.5, loc="upper left")
    axes.set_xticks(list(positions), [result.label for result in methods], fontsize=9)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("held-out greedy accuracy (fraction of prompts)", fontsize=9)
    prompts = max((result.num_prompts for result in methods), default=0)
    axes.set_title(f"Held-out greedy accuracy by method ({prompts} prompts, 95% CI)", fontsize=10.5)
    axes.grid(True, axis="y", alpha=0.25)
    path = folder / "accuracy-by-method.png"
    figure.savefig(path, dpi=DPI)
    caption = (
        "Held-out greedy accuracy of each method's final model (error bars: 95% Wilson intervals); white "
        "diamonds: pass@8 from 8 samples at temperature 1."
    )
    return FigureFile(path, "Accuracy by method", caption, [result.label for result in methods])


def _scatter(axes, methods: Sequence[MethodResult], x_of, base: MethodResult | None) -> None:
    for result in methods:
        x = x_of(result)
        if x is None:
            continue
        low, high = result.interval
        axes.errorbar(x, result.accuracy, yerr=[[result.accuracy - low], [high - result.accuracy]], fmt="o",
                      color=METHOD_COLOURS[result.method], markersize=8, capsize=3)  # fmt: skip
        axes.annotate(result.label, (x, result.accuracy), textcoords="offset points", xytext=(7, 5),
                      fontsize=9)  # fmt: skip
    if base is not None:
        axes.axhline(base.accuracy, color=METHOD_COLOURS["base"], linestyle="--", linewidth=1)
        axes.annotate("base", (1, base.accuracy), xycoords=("axes fraction", "data"), xytext=(-4, 4),
                      textcoords="offset points", fontsize=8.5, color=METHOD_COLOURS["base"],
                      ha="right")  # fmt: skip
    axes.set_ylabel("held-out greedy accuracy", fontsize=9)
    axes.grid(True, alpha=0.25)


def log_axis(axes) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... in plain numbers (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def compute_figure(methods: Sequence[MethodResult], folder: Path) -> FigureFile | None:
    """Accuracy against training FLOPs and against KL to the base, and where each method's FLOPs go."""
    trained = [result for result in methods if result.compute and result.compute.total > 0]
    if not trained:
        return None
    base = next((result for result in methods if result.method == "base"), None)
    figure, (by_compute, by_kl, parts) = new_figure(3, width=5.0, height=4.2)
    _scatter(by_compute, trained, lambda r: r.compute.total / TERA, base)
    log_axis(by_compute)
    by_compute.set_xlabel("training compute (10¹² FLOPs, log scale)", fontsize=9)
    by_compute.set_title("Accuracy against training compute", fontsize=10.5)
    _scatter(by_kl, [r for r in methods if r.method != "base"], lambda r: r.kl, base)
    by_kl.set_xlabel("KL to the base model (nats per sequence)", fontsize=9)
    by_kl.set_title("Accuracy against KL to the base", fontsize=10.5)
    by_kl.set_xlim(left=0)
    _breakdown(parts, trained)
    path = folder / "accuracy-vs-compute.png"
    figure.savefig(path, dpi=DPI)
    caption = (
        "Left: accuracy against training compute, FLOPs ≈ 2N per forward token + 4N per backward token "
        "(N = non-embedding parameters) summed over every model a method runs (policy, reference, "
        "generation, reward model and its training, critic); evaluation excluded. Middle: accuracy against "
        "the KL of the final policy to the base on held-out prompts. Right: where each method's FLOPs go."
    )
    return FigureFile(path, "Accuracy, compute and KL", caption, [result.label for result in trained])


def _breakdown(axes, trained: Sequence[MethodResult]) -> None:
    names = list(dict.fromkeys(part for result in trained for part in result.compute.parts))
    lefts = [0.0] * len(trained)
    for index, name in enumerate(names):
        widths = [result.compute.parts.get(name, 0.0) / TERA for result in trained]
        axes.barh(range(len(trained)), widths, left=lefts, color=PART_COLOURS[index % len(PART_COLOURS)],
                  label=name, height=0.6)  # fmt: skip
        lefts = [left + width for left, width in zip(lefts, widths, strict=True)]
    for row, total in enumerate(lefts):
        axes.text(total, row, f" {total:.3g}", va="center", fontsize=8.5)
    axes.set_yticks(range(len(trained)), [result.label for result in trained], fontsize=9)
    axes.invert_yaxis()
    axes.set_xlim(0, max(lefts) * 1.25)
    axes.set_xlabel("training compute (10¹² FLOPs)", fontsize=9)
    axes.set_title("Where the compute goes", fontsize=10.5)
    axes.legend(fontsize=7.5, loc="upper right", framealpha=0.9)
    axes.grid(True, axis="x", alpha=0.25)


def _points(difference: float) -> str:
    return f"{abs(100 * difference):.1f} points"


def _overlap(first: MethodResult, second: MethodResult) -> bool:
    (low_a, high_a), (low_b, high_b) = first.interval, second.interval
    return low_a <= high_b and low_b <= high_a


def _clear(first: MethodResult, second: MethodResult) -> str:
    if not _overlap(first, second):
        return ""
    return f" (but the 95% intervals of {first.label} and {second.label} overlap: not a clear difference)"


def _ranking(methods: Sequence[MethodResult]) -> str:
    ordered = sorted(methods, key=lambda result: -result.accuracy)
    text = f"{ordered[0].label} ({ordered[0].accuracy:.3f})"
    for previous, result in zip(ordered, ordered[1:], strict=False):
        relation = "=" if result.accuracy == previous.accuracy else ">"
        text += f" {relation} {result.label} ({result.accuracy:.3f})"
    return f"Held-out greedy accuracy ranks the methods {text}."


def _dpo_against_rl(dpo: MethodResult, rl: MethodResult) -> str | None:
    if not (dpo.compute and rl.compute and dpo.compute.total and rl.compute.total):
        return None
    ratio = rl.compute.total / dpo.compute.total
    cheaper, worse = ratio > 1, dpo.accuracy < rl.accuracy
    spend = f"{ratio:.1f}× less" if cheaper else f"{1 / ratio:.1f}× more"
    verdict = "holds here" if cheaper and worse else "does not hold here"
    standing = "the same" if dpo.accuracy == rl.accuracy else (
        f"{_points(rl.accuracy - dpo.accuracy)} {'lower' if worse else 'higher'}"
    )
    return (
        f"DPO used {spend} training compute than {rl.label} ({dpo.compute.total:.2g} vs "
        f"{rl.compute.total:.2g} FLOPs) and reached {standing} accuracy ({dpo.accuracy:.3f} vs "
        f"{rl.accuracy:.3f}): the claim 'DPO is cheaper and a little worse than RL' {verdict}"
        f"{_clear(dpo, rl)}."
    )


def _iterative_against_offline(offline: MethodResult, iterative: MethodResult) -> str:
    gained = iterative.accuracy - offline.accuracy
    cost = ""
    if offline.compute and iterative.compute and offline.compute.total:
        cost = f" at {iterative.compute.total / offline.compute.total:.1f}× its training compute"
    return (
        f"On-policy pairs (iterative DPO) {'gained' if gained > 0 else 'lost' if gained < 0 else 'changed'} "
        f"{_points(gained)} over offline DPO{cost}{_clear(offline, iterative)}."
    )


def _best_and_furthest(methods: Sequence[MethodResult]) -> list[str]:
    trained = [result for result in methods if result.method != "base"]
    best = max(trained, key=lambda result: result.accuracy)
    runner_up = max((r for r in trained if r is not best), key=lambda r: r.accuracy, default=None)
    kind = "an RL method" if best.method in RL_METHODS else "not an RL method"
    holds = "holds" if best.method in RL_METHODS else "does not hold"
    margin = f", {_points(best.accuracy - runner_up.accuracy)} ahead of {runner_up.label}" if runner_up else (
        ""
    )
    lines = [
        f"The most accurate method is {best.label} ({best.accuracy:.3f}{margin}), {kind}: the claim that RL "
        f"is best at this reasoning task {holds} here{_clear(best, runner_up) if runner_up else ''}."
    ]
    with_kl = [result for result in trained if isinstance(result.kl, (int, float))]
    if len(with_kl) > 1:
        furthest = max(with_kl, key=lambda result: result.kl)
        same = "and it is also the most accurate" if furthest is best else (
            f"but {best.label} is more accurate"
        )
        lines.append(
            f"{furthest.label} moved furthest from the base (KL {furthest.kl:.2f} nats per sequence), {same}."
        )
    return lines


def power_of_ten(value: float) -> tuple[float, str]:
    """10^k at or below `value`, and how it is written (10¹²)."""
    exponent = math.floor(math.log10(value))
    return 10.0**exponent, "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def _efficiency(methods: Sequence[MethodResult], base: MethodResult | None) -> str | None:
    trained = [result for result in methods if base and result.compute and result.compute.total]
    if len(trained) < 2:
        return None
    unit, written = power_of_ten(min(result.compute.total for result in trained))
    rates = {
        result.label: 100 * (result.accuracy - base.accuracy) * unit / result.compute.total
        for result in trained
    }
    best = max(rates, key=rates.get)
    listed = ", ".join(f"{label} {rate:+.3g}" for label, rate in rates.items())
    return (
        f"Accuracy points gained over the base per {written} training FLOPs: {listed}; {best} is the most "
        "efficient."
    )


def _ppo_proxy(results: dict[str, Any], ppo: MethodResult, base: MethodResult | None) -> str | None:
    entry = results.get("ppo", {})
    before, after = entry.get("proxy_before"), entry.get("proxy_after")
    if not (isinstance(before, (int, float)) and isinstance(after, (int, float)) and base):
        return None
    proxy_up, gold_change = after > before, ppo.accuracy - base.accuracy
    if proxy_up and gold_change < 0:
        reading = "the proxy rose while the gold fell: PPO gamed the reward model"
    elif proxy_up:
        reading = "proxy and gold rose together: no sign here that the reward model was gamed"
    else:
        reading = "the proxy did not rise"
    text = (
        f"PPO moved the reward model's score of held-out greedy answers {before:.3f} → {after:.3f} and exact "
        f"match {base.accuracy:.3f} → {ppo.accuracy:.3f}: {reading}{_clear(base, ppo)}."
    )
    best, last = entry.get("monitor_best"), entry.get("monitor_last")
    if isinstance(best, (int, float)) and isinstance(last, (int, float)) and last < best:
        text += f" The rollouts' exact match (gold monitor) peaked at {best:.3f} and ended at {last:.3f}."
    return text


def statements(results: dict[str, Any], methods: Sequence[MethodResult]) -> list[str]:
    """Sentences on what the numbers show; each direction is computed, none is written in advance."""
    if len(methods) < 2:
        return []
    by_method = {result.method: result for result in methods}
    base = by_method.get("base")
    lines = [_ranking(methods)]
    dpo = by_method.get("dpo")
    for method in RL_METHODS:
        if dpo and method in by_method and (line := _dpo_against_rl(dpo, by_method[method])):
            lines.append(line)
    if dpo and "iterative" in by_method:
        lines.append(_iterative_against_offline(dpo, by_method["iterative"]))
    if any(result.method != "base" for result in methods):
        lines += _best_and_furthest(methods)
    if efficiency := _efficiency(methods, base):
        lines.append(efficiency)
    if "ppo" in by_method and (proxy := _ppo_proxy(results, by_method["ppo"], base)):
        lines.append(proxy)
    return lines


def stage_reports(results: dict[str, Any], run_dir: Path) -> list[str]:
    """Each stage's report (<stage>/report/, rebuilt when its metrics are newer) and its key figure."""
    lines = []
    for stage, (label, figure) in STAGE_FIGURES.items():
        folder = stage_folder(results.get(stage, {}) if isinstance(results.get(stage), dict) else {})
        metrics = folder / "metrics.jsonl" if folder else None
        if metrics is None or not metrics.is_file():
            continue
        report = folder / "report" / REPORT_FILE
        if not report.is_file() or report.stat().st_mtime < metrics.stat().st_mtime:
            write_report([folder], folder / "report", title=f"Demo stage: {label}")
        where = Path(os.path.relpath(folder / "report", run_dir))
        if (folder / "report" / figure).is_file():
            lines += [f"### {label}", "", f"![{label}]({where / figure})", ""]
        lines += [f"Every curve of the {label} stage: [{where / REPORT_FILE}]({where / REPORT_FILE}).", ""]
    return lines


def demo_section(results: dict[str, Any], run_dir: str | Path) -> str:
    """Markdown for the demo's report.md below its table: figures (written into `run_dir`) and statements."""
    run_dir = Path(run_dir)
    methods = method_results(results)
    if not methods:
        return ""
    lines = ["", "## What the numbers show", ""]
    figures = [accuracy_figure(methods, run_dir)]
    if compute := compute_figure(methods, run_dir):
        figures.append(compute)
    lines += [f"- {statement}" for statement in statements(results, methods)] + [""]
    for figure in figures:
        lines += [f"![{figure.title}]({figure.path.name})", "", figure.caption, ""]
    missing = [
        f"{result.label}: {'; '.join(result.compute.missing)}"
        for result in methods if result.compute and result.compute.missing
    ]  # fmt: skip
    if missing:
        lines += ["Compute not counted: " + " / ".join(missing) + ".", ""]
    stages = stage_reports(results, run_dir)
    if stages:
        lines += ["## Training curves of each stage", "", *stages]
    return "\n".join(lines)
