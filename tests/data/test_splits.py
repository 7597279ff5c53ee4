"""Training and eval rows for a command: a DatasetDict is accepted wherever a dataset is."""

from __future__ import annotations

import datasets
import pytest

from prefalign.config import DataConfig
from prefalign.data.splits import resolve_rows
from prefalign.errors import DataError


def rows(prefix: str, count: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": f"{prefix}{index}"} for index in range(count)])


def test_a_dataset_dict_gives_its_train_and_test_splits():
    splits = datasets.DatasetDict({"train": rows("t", 4), "test": rows("e", 2)})
    train, evaluation = resolve_rows(DataConfig(), dataset=splits)
    assert train["prompt"] == ["t0", "t1", "t2", "t3"] and evaluation["prompt"] == ["e0", "e1"]
    # test is the eval data: nothing is split off the training rows
    train, evaluation = resolve_rows(DataConfig(eval_fraction=0.5), dataset=splits)
    assert len(train) == 4 and evaluation["prompt"] == ["e0", "e1"]
    # eval rows given win over the test split; a DatasetDict as eval_dataset gives its test split
    train, evaluation = resolve_rows(DataConfig(), dataset=splits, eval_dataset=rows("x", 1))
    assert evaluation["prompt"] == ["x0"]
    _, evaluation = resolve_rows(DataConfig(), dataset=rows("t", 2), eval_dataset=splits)
    assert evaluation["prompt"] == ["e0", "e1"]
    # no test split: validation, else no eval rows
    _, evaluation = resolve_rows(DataConfig(), dataset=datasets.DatasetDict({"train": rows("t", 2)}))
    assert evaluation is None


def test_a_dataset_dict_without_the_split_names_the_ones_it_has():
    with pytest.raises(DataError, match="no split 'train'.*it has prefs"):
        resolve_rows(DataConfig(), dataset=datasets.DatasetDict({"prefs": rows("t", 2)}))
    train, _ = resolve_rows(DataConfig(split="prefs"), dataset=datasets.DatasetDict({"prefs": rows("t", 2)}))
    assert len(train) == 2
