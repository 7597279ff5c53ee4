"""Training and eval rows for a command: an in-memory dataset or the configured files; tokenize stats
logged."""

from __future__ import annotations

import logging
from typing import Any

import datasets

from prefalign.data.sources import load_splits

logger = logging.getLogger("prefalign")


def resolve_rows(
    data_config,
    *,
    dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and eval rows from `dataset` (in memory) or the configured files; `eval_dataset` replaces
    the configured eval rows (cut to data.max_eval_samples). `data.path: builtin` is resolved above this
    layer (prefalign.commands.builtin): here it is an error that says so."""
    train, evaluation = load_splits(data_config, dataset=dataset)
    if eval_dataset is not None:
        evaluation = eval_dataset
        if data_config.max_eval_samples:
            evaluation = evaluation.select(range(min(len(evaluation), data_config.max_eval_samples)))
    return train, evaluation


def log_stats(name: str, stats: Any) -> dict[str, Any]:
    """Truncation and drops are reported, never silent."""
    cut = stats.dropped_too_long_prompt or stats.truncated_prompts or stats.truncated_completions
    (logger.warning if cut else logger.info)("%s data: %s", name, stats.summary())
    return stats.as_dict()
