"""Training and eval rows for a command: an in-memory dataset or the configured files; tokenize stats
logged."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import datasets

from prefalign.data.sources import load_splits
from prefalign.errors import DataError

logger = logging.getLogger("prefalign")

EVAL_SPLITS = ("test", "validation")  # a DatasetDict's split used for evaluation, in this order


def resolve_rows(
    data_config,
    *,
    dataset: datasets.Dataset | datasets.DatasetDict | None = None,
    eval_dataset: datasets.Dataset | datasets.DatasetDict | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training and eval rows from `dataset` (in memory) or the configured files; `eval_dataset` replaces
    the configured eval rows (cut to data.max_eval_samples). A DatasetDict gives its `data.split` (train)
    split for training and its test split (else validation) for evaluation, unless eval rows are given
    (eval_dataset or data.eval_path). `data.path: builtin` is resolved above this layer
    (prefalign.commands.builtin): here it is an error that says so."""
    if isinstance(eval_dataset, datasets.DatasetDict):
        eval_dataset = _eval_split(eval_dataset, required=True)
    if isinstance(dataset, datasets.DatasetDict):
        splits, dataset = dataset, _train_split(dataset, data_config.split)
        if eval_dataset is None and not data_config.eval_path:
            eval_dataset = _eval_split(splits, required=False)
            if eval_dataset is not None and data_config.eval_fraction:
                # the test split is the eval data: nothing is split off the training rows
                data_config = dataclasses.replace(data_config, eval_fraction=0.0)
    train, evaluation = load_splits(data_config, dataset=dataset)
    if eval_dataset is not None:
        evaluation = eval_dataset
        if data_config.max_eval_samples:
            evaluation = evaluation.select(range(min(len(evaluation), data_config.max_eval_samples)))
    return train, evaluation


def _train_split(splits: datasets.DatasetDict, split: str) -> datasets.Dataset:
    if split in splits:
        return splits[split]
    raise DataError(
        f"the DatasetDict given as dataset has no split {split!r} (data.split); it has "
        f"{', '.join(splits)}. Set data.split to one of them."
    )


def _eval_split(splits: datasets.DatasetDict, *, required: bool) -> datasets.Dataset | None:
    for name in EVAL_SPLITS:
        if name in splits:
            return splits[name]
    if required:
        raise DataError(
            f"the DatasetDict given as eval_dataset has no {' or '.join(EVAL_SPLITS)} split; it has "
            f"{', '.join(splits)}. Pass the split itself (eval_dataset=splits['...'])."
        )
    return None


def log_stats(name: str, stats: Any) -> dict[str, Any]:
    """Truncation and drops are reported, never silent."""
    cut = stats.dropped_too_long_prompt or stats.truncated_prompts or stats.truncated_completions
    (logger.warning if cut else logger.info)("%s data: %s", name, stats.summary())
    return stats.as_dict()
