"""The one context fitter: a prompt fits when its tokens plus max_new_tokens fit the model's positions."""

from __future__ import annotations

import datasets
import pytest

from prefalign.data.context import fit_to_context
from prefalign.errors import DataError


def prompts(*lengths: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"prompt": str(n), "prompt_ids": [1] * n} for n in lengths])


def test_too_long_prompts_are_dropped_and_positions_kept():
    kept, positions = fit_to_context(prompts(4, 7, 6, 3), 10, 4, too_long="drop", name="train")
    assert positions == [0, 2, 3]  # 7 + 4 > 10; 6 + 4 = 10 fits exactly
    assert [len(ids) for ids in kept["prompt_ids"]] == [4, 6, 3]


def test_refused_with_the_numbers_when_asked_or_when_none_fits():
    with pytest.raises(DataError, match=r"train prompt 1 is 7 tokens; with max_new_tokens=4 it exceeds the "
                                        r"model's context of 10 tokens \(1 of 2 prompts do\)"):  # fmt: skip
        fit_to_context(prompts(4, 7), 10, 4, too_long="error", name="train")
    with pytest.raises(DataError, match=r"eval prompt 0 is 9 tokens.*\(2 of 2 prompts do\)"):
        fit_to_context(prompts(9, 12), 10, 4, too_long="drop", name="eval")


def test_no_known_context_keeps_everything():
    kept, positions = fit_to_context(prompts(4000, 3), None, 256, too_long="error", name="train")
    assert positions == [0, 1] and len(kept) == 2
