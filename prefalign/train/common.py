"""Set-up steps every command shares: threads and seeds, the run folder, rows in, tokenized data out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets

from prefalign.data import load_splits

logger = logging.getLogger("prefalign")

BuiltinData = Callable[[str], datasets.Dataset]  # split ("train" / "held_out") -> rows


def resolve_rows(
    data_config,
    *,
    builtin: BuiltinData | None,
    dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and eval rows from an in-memory dataset, the built-in task, or the configured files."""
    if dataset is None and data_config.path == ["builtin"]:
        if builtin is None:
            raise ValueError("this command has no built-in data; set data.path")
        dataset = builtin("train")
        if eval_dataset is None and not data_config.eval_path and not data_config.eval_fraction:
            eval_dataset = builtin("held_out")
    train, evaluation = load_splits(data_config, dataset=dataset) if dataset is not None else load_splits(data_config)
    if eval_dataset is not None:
        evaluation = eval_dataset
        if data_config.max_eval_samples:
            evaluation = evaluation.select(range(min(len(evaluation), data_config.max_eval_samples)))
    return train, evaluation


def log_stats(name: str, stats: Any) -> dict[str, Any]:
    """Truncation and drops are reported, never silent."""
    logger.warning("%s data: %s", name, stats.summary()) if (stats.dropped_too_long_prompt or stats.truncated_prompts or stats.truncated_completions) else logger.info("%s data: %s", name, stats.summary())
    return stats.as_dict()
