"""report.md and its figures for one or more run folders (`prefalign report`, and every training command at
its end): what ran, how far it got, what it lacks, the curves, the held-out evaluations, the over-optimisation
view where it applies, and a few of the completions an RL run sampled last."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefalign.errors import ConfigError
from prefalign.files import atomic_file
from prefalign.reporting.figures import (
    EVALUATION_SKIPPED,
    TRAINING_FIGURES,
    FigureFile,
    evaluation_figure,
    evaluation_panels,
    matching,
    training_figures,
)
from prefalign.reporting.overoptimisation import overoptimisation_figure
from prefalign.reporting.runs import Run, load_run, number, unique_names
from prefalign.runtime.run_folder import CONFIG_FILE

REPORT_FILE = "report.md"
# Every file a report writes besides report.md: a figure no longer drawn is removed, so none goes stale.
FIGURE_FILES = (
    *(f"training-{name}.png" for name in TRAINING_FIGURES), "evaluation.png", "overoptimisation.png",
)
# The train metrics a run's summary line shows, per algorithm (those a run logged).
HEADLINE: dict[str, tuple[str, ...]] = {
    "sft": ("loss",),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "iterative_dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "reward": ("loss", "accuracy", "margin"),
    "grpo": ("reward", "reward_std", "kl", "entropy", "completions/mean_length"),
    "ppo": ("objective/scores", "objective/kl", "policy/entropy_avg", "completions/mean_length"),
}
COMPLETIONS_SHOWN = 6
HELD_OUT_LISTED = 6  # the first held-out metrics of the evaluation figure's panels (accuracy, loss, ...)


@dataclass
class Report:
    path: Path
    runs: list[Run]
    figures: list[FigureFile] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)


def load_runs(folders: Sequence[str | Path]) -> list[Run]:
    if not folders:
        raise ConfigError(
            "no run folder given: prefalign report RUN_DIR [RUN_DIR ...] (or --runs a,b), where RUN_DIR is a "
            "run's train.output_dir"
        )
    for folder in folders:
        path = Path(folder)
        if not path.is_dir():
            raise ConfigError(f"run folder {str(folder)!r} does not exist (or is not a folder)")
        if not (path / CONFIG_FILE).is_file() and not (path / "metrics.jsonl").is_file():
            raise ConfigError(
                f"{str(folder)!r} is not a run folder: it has neither {CONFIG_FILE} nor metrics.jsonl (name "
                "the folder a run wrote, its train.output_dir)"
            )
    names = unique_names([Path(folder) for folder in folders])
    return [load_run(folder, name) for folder, name in zip(folders, names, strict=True)]


def write_report(folders: Sequence[str | Path], output: str | Path, *, title: str | None = None) -> Report:
    """Read the run folders, write every figure that has data and report.md into `output`."""
    runs = load_runs(folders)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figures = training_figures(runs, output)
    evaluation = evaluation_figure(runs, output)
    figures += [evaluation] if evaluation else []
    overoptimisation, statements = overoptimisation_figure(runs, output)
    figures += [overoptimisation] if overoptimisation else []
    written = {figure.path.name for figure in figures}
    for name in FIGURE_FILES:
        if name not in written and (output / name).is_file():
            (output / name).unlink()
    report = Report(output / REPORT_FILE, runs, figures, statements)
    with atomic_file(report.path) as staging:
        staging.write_text(markdown(report, title))
    return report


def _format(value: float) -> str:
    return f"{value:.4g}"


def last_values(run: Run, keys: Sequence[str]) -> tuple[int | None, dict[str, float]]:
    """The last logged value of each of `keys` (those the run has) and the latest step among them."""
    values, step = {}, None
    for key in keys:
        steps, series = run.series(key)
        if series:
            values[key] = series[-1]
            step = max(step or 0, int(steps[-1]))
    return step, values


def run_lines(run: Run, relative_to: Path) -> list[str]:
    try:
        where = run.folder.resolve().relative_to(relative_to.resolve())
    except ValueError:
        where = run.folder.resolve()
    planned = f" of {run.planned_steps}" if run.planned_steps else ""
    status = "finished" if run.finished else "**not finished**"
    lines = [f"- **{run.name}**: {run.label}, `{where}`, {run.last_step}{planned} steps, {status}."]
    step, train = last_values(run, HEADLINE.get(run.algorithm, ("loss",)))
    if train:
        listed = ", ".join(f"{key} {_format(value)}" for key, value in train.items())
        lines.append(f"  Last logged (step {step}): {listed}")
    eval_keys = [key for panel in evaluation_panels([run]) for key in matching(panel.keys, run.keys())]
    step, held_out = last_values(run, eval_keys[:HELD_OUT_LISTED])
    if held_out:
        listed = ", ".join(f"{key.split('/', 1)[1]} {_format(value)}" for key, value in held_out.items())
        lines.append(f"  Held-out (step {step}): {listed}")
    return lines


def _cell(text: Any, limit: int = 60) -> str:
    text = str(text).replace("\n", "⏎").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def completions_table(run: Run) -> list[str]:
    """The completions an RL run logged last (completions.jsonl), as a table."""
    steps = [record["step"] for record in run.completions if isinstance(record.get("step"), int)]
    if not steps:
        return []
    last = [record for record in run.completions if record.get("step") == max(steps)][:COMPLETIONS_SHOWN]
    columns = [key for key in ("reward", "score", "advantage", "finish_reason", "tokens") if key in last[0]]
    lines = [
        f"**{run.name}**, step {max(steps)} ({len(last)} shown):", "",
        "| prompt | completion | " + " | ".join(columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for record in last:
        cells = [
            _format(value) if (value := number(record.get(key))) is not None else _cell(record.get(key, ""))
            for key in columns
        ]
        lines.append(
            f"| {_cell(_prompt_text(record.get('prompt', '')))} | {_cell(record.get('completion', ''))} | "
            + " | ".join(cells) + " |"
        )
    return [*lines, ""]


def unplotted(run: Run) -> list[str]:
    """Metrics the run logged that no panel shows (listed so nothing is silently left out)."""
    panels = [panel for _, group in TRAINING_FIGURES.values() for panel in group] + evaluation_panels([run])
    shown = {key for panel in panels for key in matching(panel.keys, run.keys())}
    bookkeeping = {"step", "epoch", "round", *EVALUATION_SKIPPED}
    return sorted(key for key in run.keys() if key not in shown and key not in bookkeeping)


def markdown(report: Report, title: str | None) -> str:
    runs, folder = report.runs, report.path.parent
    names = ", ".join(run.name for run in runs)
    lines = [f"# {title or ('Run report: ' + names)}", ""]
    lines += [line for run in runs for line in run_lines(run, folder)] + [""]
    missing = [run for run in runs if run.missing]
    if missing:
        lines += ["## What is missing", ""]
        for run in missing:
            lines += [f"- **{run.name}**:", *(f"  - {note}" for note in run.missing)]
        lines.append("")
    for figure in report.figures:
        lines += [f"## {figure.title}", "", f"![{figure.title}]({figure.path.name})", "", figure.caption, ""]
        if figure.path.name == "overoptimisation.png":
            lines += [f"- {statement}" for statement in report.statements] + [""]
    if not report.figures:
        lines += ["No figure: no run logged a metric to plot.", ""]
    if "evaluation.png" not in {figure.path.name for figure in report.figures} and any(
        key.startswith(("eval/", "heldout/")) for run in runs for key in run.keys()
    ):
        lines += [
            "## Held-out evaluations", "",
            "One evaluation per run (the values are listed at the top); with `train.eval_every N` the next "
            "report draws them over steps.", "",
        ]  # fmt: skip
    tables = [line for run in runs for line in completions_table(run)]
    if tables:
        lines += ["## Sampled completions (last logged step)", "", *tables]
    others = [(run, keys) for run in runs if (keys := unplotted(run))]
    if others:
        lines += ["## Logged but not plotted", ""]
        lines += [f"- **{run.name}**: " + ", ".join(f"`{key}`" for key in keys) for run, keys in others]
        lines.append("")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"Written by `prefalign report` on {stamp}.")
    return "\n".join(lines) + "\n"
