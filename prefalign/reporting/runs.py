"""Reading a run folder for a report: its config, its per-step metrics, its logged completions, which
algorithm wrote it, and what a finished run would have that this one lacks (a killed run still reports).

Only reads; never changes the folder. Metric names are the trainers' own (DESIGN.md, "Metrics names").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefalign.runtime.run_folder import CONFIG_FILE, read_log, stored_config

# Keys that say which trainer wrote a config.yaml (the first match wins: PPO and GRPO share most keys).
ALGORITHM_KEYS = (
    ("ppo", "vf_coef"),
    ("grpo", "num_generations"),
    ("iterative_dpo", "rounds"),
    ("dpo", "loss_type"),
    ("reward", "center_rewards_coefficient"),
)
# Without a config.yaml (copied metrics, a folder stopped before its first write): the metric that says it.
ALGORITHM_METRICS = (
    ("ppo", "objective/kl"),
    ("grpo", "reward_std"),
    ("iterative_dpo", "heldout/accuracy"),
    ("dpo", "rewards/margins"),
    ("reward", "margin"),
    ("sft", "loss"),
)
ALGORITHM_NAMES = {
    "sft": "SFT", "dpo": "DPO", "iterative_dpo": "iterative DPO", "reward": "reward model", "grpo": "GRPO",
    "ppo": "PPO", "unknown": "unknown",
}  # fmt: skip

# What each algorithm logs at every step; a run that lacks one of them is told so (with why, when known).
EXPECTED_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "grad_norm"),
    "dpo": ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"),
    "iterative_dpo": ("loss", "rewards/margins", "rewards/accuracies", "heldout/accuracy"),
    "reward": ("loss", "accuracy", "margin"),
    "grpo": ("reward", "reward_std", "entropy", "kl", "completions/mean_length", "clip_ratio/region_mean"),
    "ppo": ("objective/scores", "objective/kl", "policy/entropy_avg", "policy/clipfrac_avg",
            "completions/mean_length"),
}  # fmt: skip
WHY_MISSING = {
    ("grpo", "kl"): "GRPO logs its KL only with beta > 0 (beta = 0 loads no reference)",
}


@dataclass
class Run:
    """One run folder as a report sees it."""

    folder: Path
    name: str
    algorithm: str
    config: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl (for iterative DPO: its rounds' steps, numbered on)
    completions: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    planned_steps: int | None = None
    round_starts: list[int] = field(default_factory=list)  # iterative DPO: the step each round starts after
    missing: list[str] = field(default_factory=list)  # what a finished run would have, in words

    @property
    def label(self) -> str:
        return ALGORITHM_NAMES.get(self.algorithm, self.algorithm)

    def keys(self) -> set[str]:
        return {key for record in self.records for key in record}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        return series(self.records, key)

    @property
    def last_step(self) -> int:
        steps = [record["step"] for record in self.records if isinstance(record.get("step"), int)]
        return max(steps, default=0)


def number(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN and infinities are not points on a curve)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the records that hold a finite number for it, in step order; a step
    logged twice (a resumed run) keeps its last value."""
    points: dict[float, float] = {}
    for record in records:
        step, value = number(record.get("step")), number(record.get(key))
        if step is not None and value is not None:
            points[step] = value
    steps = sorted(points)
    return steps, [points[step] for step in steps]


def algorithm_of(config: dict[str, Any], keys: set[str]) -> str:
    for name, key in ALGORITHM_KEYS:
        if key in config and (name != "iterative_dpo" or (config.get(key) or 1) > 1):
            return name
    if config:
        return "sft"
    return next((name for name, key in ALGORITHM_METRICS if key in keys), "unknown")


def _count_torn_lines(path: Path) -> int:
    torn = 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            torn += bool(line.strip())
    return torn


def _iterative_records(folder: Path, top: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Iterative DPO: each round's DPO steps with the steps of the rounds before added, then the rounds'
    own records (held-out accuracy, sampling statistics) at the step each round ended."""
    rounds = sorted(
        (path for path in folder.glob("round-*") if path.name[6:].isdigit()), key=lambda p: int(p.name[6:]),
    )
    records, offset, starts = [], 0, []
    for round_dir in rounds:
        steps = read_log(round_dir / "metrics.jsonl")
        starts.append(offset)
        records += [{**record, "step": record["step"] + offset} for record in steps if "step" in record]
        offset += max((record.get("step", 0) for record in steps), default=0)
    own = ("step", "round", "heldout/", "sample/")
    records += [{k: v for k, v in record.items() if k.startswith(own)} for record in top]
    return records, starts


def _planned_steps(config: dict[str, Any], records: list[dict[str, Any]], algorithm: str) -> int | None:
    train = config.get("train") or {}
    max_steps = train.get("max_steps") or 0
    if max_steps:
        rounds = (config.get("rounds") or 1) if algorithm == "iterative_dpo" else 1
        return max_steps * rounds
    epochs = train.get("epochs")
    for record in reversed(records):  # epoch-based: steps per epoch from the last record that says both
        epoch, step = number(record.get("epoch")), number(record.get("step"))
        if epoch and step and epochs:
            return round(step / epoch * epochs)
    return None


def load_run(folder: str | Path, name: str | None = None) -> Run:
    """Read `folder`; never raises for what a killed or half-written run lacks (it is listed in `missing`)."""
    folder = Path(folder)
    config = stored_config(folder) or {}
    if not config and (folder / CONFIG_FILE).is_file():
        try:  # a config.yaml that is not a prefalign run's: still read its keys for the algorithm
            loaded = yaml.safe_load((folder / CONFIG_FILE).read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (yaml.YAMLError, UnicodeDecodeError):
            config = {}
    top = read_log(folder / "metrics.jsonl")
    keys = {key for record in top for key in record}
    algorithm = algorithm_of(config, keys)
    records, starts = _iterative_records(folder, top) if algorithm == "iterative_dpo" else (top, [])
    run = Run(
        folder=folder, name=name or folder.resolve().name, algorithm=algorithm, config=config,
        records=records, completions=read_log(folder / "completions.jsonl"),
        finished=(folder / "final").is_dir(), planned_steps=_planned_steps(config, records, algorithm),
        round_starts=starts,
    )
    run.missing = missing_parts(run)
    return run


def missing_parts(run: Run) -> list[str]:
    """What a finished run of this algorithm would show that `run` does not, each in a sentence."""
    notes = []
    if not run.config:
        notes.append("no config.yaml: the algorithm is guessed from the metric names")
    if not run.records:
        notes.append("metrics.jsonl is missing or empty: there is nothing to plot")
        return notes
    torn = _count_torn_lines(run.folder / "metrics.jsonl")
    if torn:
        notes.append(f"{torn} line(s) of metrics.jsonl could not be read (torn by a kill mid-write); skipped")
    if not run.finished:
        notes.append("no final/ model: the run did not finish (stopped, killed, or still running)")
    if run.planned_steps and run.last_step < run.planned_steps:
        notes.append(f"metrics stop at step {run.last_step} of {run.planned_steps} planned")
    keys = run.keys()
    if not any(key.startswith(("eval/", "heldout/")) for key in keys):
        every = (run.config.get("train") or {}).get("eval_every")
        when = f"every {every} steps and at the end" if every else "at the end only (train.eval_every = 0)"
        notes.append(f"no held-out evaluation in metrics.jsonl (evaluations come {when})")
    for key in EXPECTED_METRICS.get(run.algorithm, ()):
        if key not in keys:
            why = WHY_MISSING.get((run.algorithm, key))
            notes.append(f"`{key}` was not logged" + (f": {why}" if why else ""))
    return notes


def unique_names(folders: list[Path]) -> list[str]:
    """Run names for legends: the folder's name, with its parents added until every name differs."""
    resolved = [Path(folder).resolve() for folder in folders]
    depth = 1
    while depth < 6:
        names = ["/".join(path.parts[-depth:]) for path in resolved]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(path) for path in resolved]
