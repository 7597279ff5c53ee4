"""`builtin`: the built-in task's base model and data, resolved here (the commands layer) and nowhere lower.

Below this layer a model path is a path and `data.path` names files: given `builtin` they raise an error
that points here. A command calls `resolve_builtin` first; it builds (or reuses) the cached base model
for each model field set to `builtin`, and loads the task's rows when `data.path` is `builtin`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import datasets

from prefalign.config import is_config
from prefalign.models.loading import BUILTIN
from prefalign.recipes.base_model import ensure_base_model
from prefalign.runtime import distributed
from prefalign.tasks.arithmetic import preference_dataset, prompt_dataset, sft_dataset

logger = logging.getLogger("prefalign")

# Which rows each kind of command trains on; split is "train" or "held_out".
BUILTIN_ROWS: dict[str, Callable[[str], datasets.Dataset]] = {
    "sft": sft_dataset,
    "preference": preference_dataset,
    "prompts": prompt_dataset,
    # The reward model trains on the right answer against every near miss of each problem (about 4.9 per
    # problem; held-out accuracy 0.71 vs 0.62 after 500 steps, 0.81 vs 0.79 after 1500, against one near
    # miss each) and is evaluated on the task's one near miss per held-out problem, as every stage is.
    "reward_pairs": lambda split: preference_dataset(split, every_near_miss=split == "train"),
}
# Config fields that name a model folder (ModelConfig.name_or_path, a DPO reference, a reward model, ...).
MODEL_FIELDS = ("name_or_path", "reference", "reward_model", "model")


def builtin_rows(kind: str, split: str) -> datasets.Dataset:
    """The built-in task's rows of one kind (see BUILTIN_ROWS) and split ("train" or "held_out")."""
    return BUILTIN_ROWS[kind](split)


def resolve_builtin_models(config: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Replace every model field set to `builtin` (in nested sections too) with the base model's folder,
    built on first use. `skip` names dotted fields left alone (a policy given as an object, say)."""

    def walk(section: Any, prefix: str) -> None:
        for field in dataclasses.fields(section):
            value, dotted = getattr(section, field.name), f"{prefix}{field.name}"
            if is_config(value):
                walk(value, f"{dotted}.")
            elif field.name in MODEL_FIELDS and value == BUILTIN and dotted not in skip:
                # One process builds it (or finds it cached); the others then load the folder it wrote.
                with distributed.main_process_first():
                    setattr(section, field.name, str(ensure_base_model()))

    walk(config, "")


def builtin_data(
    data_config: Any,
    kind: str,
    dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
    *,
    train_split: str = "train",
) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """(dataset, eval_dataset) for a command: the task's rows when data.path is `builtin` and no dataset was
    given (held-out rows for evaluation unless eval_path / eval_fraction say otherwise), else as given."""
    if dataset is not None or list(data_config.path) != [BUILTIN]:
        return dataset, eval_dataset
    dataset = builtin_rows(kind, train_split)
    if eval_dataset is None and not data_config.eval_path and not data_config.eval_fraction:
        eval_dataset = builtin_rows(kind, "held_out")
    return dataset, eval_dataset


def announce_data(data_config: Any, kind: str, dataset: datasets.Dataset | None = None) -> None:
    """One log line naming the data a command is about to use (before any model is built or loaded)."""
    if dataset is not None:
        rows = sum(map(len, dataset.values())) if isinstance(dataset, datasets.DatasetDict) else len(dataset)
        logger.info("data: the dataset passed in (%d rows, %s rows expected)", rows, kind)
    elif list(data_config.path) == [BUILTIN]:
        logger.warning(
            "no data.path given: this run uses the BUILT-IN arithmetic task (%s rows), not your data; pass "
            "--data.path FILE (JSONL, JSON, Parquet, CSV, a save_to_disk folder or a hub name) to use yours",
            kind.replace("_", " "),
        )
    else:
        logger.info("data: %s", ", ".join(map(str, data_config.path)))


def resolve_builtin(
    config: Any,
    kind: str,
    *,
    dataset: datasets.Dataset | None = None,
    eval_dataset: datasets.Dataset | None = None,
    model: Any = None,
    train_split: str = "train",
) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """Both at once for a training command: models resolved in `config` (the policy only when no `model`
    object is given), the rows returned. Says first which data the run uses: a WARNING when it is the
    built-in task (a user who forgot data.path must not train a real model on arithmetic in silence)."""
    announce_data(config.data, kind, dataset)
    resolve_builtin_models(config, skip=("model.name_or_path",) if model is not None else ())
    return builtin_data(config.data, kind, dataset, eval_dataset, train_split=train_split)
