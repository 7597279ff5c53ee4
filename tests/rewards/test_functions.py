"""Scorers: weighted sums with None left out, failures dropped and counted (never scored 0), groups."""

from __future__ import annotations

import math
import sys

import pytest

from prefalign.errors import ConfigError
from prefalign.rewards import (
    WeightedRewards,
    describe_failures,
    get_reward_function,
    register_reward_function,
)
from prefalign.rewards.functions import REWARD_FUNCTIONS


def ones_or_none(prompts, completions, **_):
    return [None if completion == "skip" else 1.0 for completion in completions]


def length_reward(prompts, completions, **_):
    return [float(len(completion)) for completion in completions]


def fails_on_boom(prompts, completions, **_):
    # Raises for the whole batch whenever one completion is "boom": the per-sample retry finds which.
    if "boom" in completions:
        raise RuntimeError("cannot score boom")
    return [0.5] * len(completions)


def nan_on_bad(prompts, completions, **_):
    return [math.nan if completion == "bad" else 2.0 for completion in completions]


def test_weighted_sum_leaves_none_out():
    rewards = WeightedRewards([ones_or_none, length_reward], [2.0, 0.5])
    total, per_function, failures = rewards(["p"] * 3, ["ab", "skip", "abcd"])
    # "ab": 2*1 + 0.5*2 = 3; "skip": only the length term 0.5*4 = 2; "abcd": 2*1 + 0.5*4 = 4.
    assert total == [3.0, 2.0, 4.0]
    assert per_function["ones_or_none"] == [1.0, None, 1.0]
    assert failures == []


def test_all_none_means_no_score_not_zero():
    rewards = WeightedRewards([ones_or_none])
    total, _, failures = rewards(["p", "p"], ["skip", "x"])
    assert total == [None, 1.0]
    assert failures == []


def test_raising_function_drops_only_the_failing_sample():
    rewards = WeightedRewards([fails_on_boom, length_reward])
    total, per_function, failures = rewards(["p"] * 3, ["a", "boom", "abc"])
    # The failing sample has no score at all, even though length_reward worked for it.
    assert total == [1.5, None, 3.5]
    assert per_function["fails_on_boom"] == [0.5, None, 0.5]
    assert len(failures) == 1
    assert failures[0].function == "fails_on_boom" and failures[0].prompt_index == 1
    assert "RuntimeError: cannot score boom" in failures[0].reason


def test_nan_and_non_numbers_are_failures():
    def strings(prompts, completions, **_):
        return ["1.0" if completion == "text" else 1.0 for completion in completions]

    total, _, failures = WeightedRewards([nan_on_bad])(["p", "p"], ["bad", "good"])
    assert total == [None, 2.0]
    assert [failure.prompt_index for failure in failures] == [0]
    assert "nan" in failures[0].reason
    total, _, failures = WeightedRewards([strings])(["p", "p"], ["text", "x"])
    assert total == [None, 1.0] and len(failures) == 1


def test_bools_count_as_zero_and_one():
    def is_long(prompts, completions, **_):
        return [len(completion) > 2 for completion in completions]

    total, _, failures = WeightedRewards([is_long], [3.0])(["p", "p"], ["abc", "a"])
    assert total == [3.0, 0.0] and failures == []


def test_wrong_length_or_none_is_a_config_error():
    def too_few(prompts, completions, **_):
        return [1.0]

    def returns_none(prompts, completions, **_):
        return None

    with pytest.raises(ConfigError, match="returned 1 values for 2 completions"):
        WeightedRewards([too_few])(["p", "p"], ["a", "b"])
    with pytest.raises(ConfigError, match="returned None"):
        WeightedRewards([returns_none])(["p"], ["a"])


def test_columns_follow_the_signature():
    seen = {}

    def plain(prompts, completions, answer):  # no **kwargs: extra columns must not be passed
        seen["answer"] = answer
        pairs = zip(completions, answer, strict=True)
        return [float(completion == expected) for completion, expected in pairs]

    rewards = WeightedRewards([plain])
    total, _, failures = rewards(["p", "p"], ["3", "4"], answer=["3", "5"], difficulty=[1, 2])
    assert total == [1.0, 0.0] and failures == []
    assert seen["answer"] == ["3", "5"]


def test_registry_and_import_path():
    register_reward_function("test_length", length_reward)
    try:
        rewards = WeightedRewards(["test_length", "tests.rewards.test_functions:ones_or_none"])
        total, _, _ = rewards(["p"], ["abc"])
        assert total == [4.0]
    finally:
        REWARD_FUNCTIONS.pop("test_length")
    with pytest.raises(ConfigError, match="unknown reward function 'nope'"):
        WeightedRewards(["nope"])
    with pytest.raises(ConfigError, match="2 values for 1 reward functions"):
        WeightedRewards(["exact_match"], [1.0, 2.0])


def test_score_groups_names_prompt_and_sample():
    rewards = WeightedRewards([fails_on_boom, nan_on_bad])
    groups = [["a", "b", "c"], ["d", "bad", "boom"]]
    scored = rewards.score_groups(["p0", "p1"], groups, {"answer": ["1", "2"]})
    # fails_on_boom 0.5 + nan_on_bad 2.0 = 2.5 for the good samples.
    assert scored.scores == [[2.5, 2.5, 2.5], [2.5, None, None]]
    assert scored.failed == [[False, False, False], [False, True, True]]
    where = sorted((f.function, f.prompt_index, f.sample_index) for f in scored.failures)
    assert where == [("fails_on_boom", 1, 2), ("nan_on_bad", 1, 1)]
    text = describe_failures(scored.failures)
    assert text.startswith("2 reward failure(s)") and "prompt 1, sample 2" in text


def test_score_groups_repeats_columns_per_sample():
    def match(prompts, completions, answer, **_):
        pairs = zip(completions, answer, strict=True)
        return [float(completion == expected) for completion, expected in pairs]

    groups = [["1", "2"], ["2", "2", "3"]]
    scored = WeightedRewards([match]).score_groups(["x", "y"], groups, {"answer": ["1", "3"]})
    assert scored.scores == [[1.0, 0.0], [0.0, 0.0, 1.0]]


def test_two_scorers_with_one_name_keep_their_own_values():
    # Two lambdas are both named '<lambda>': each must still count with its own value and weight.
    rewards = WeightedRewards(
        [lambda prompts, completions, **_: [1.0], lambda prompts, completions, **_: [10.0]], [1.0, 0.5]
    )
    total, per_function, failures = rewards(["p"], ["c"])
    assert total == [6.0]  # 1·1 + 0.5·10 (was 1·10 + 0.5·10 = 15: the second overwrote the first)
    assert per_function == {"<lambda>": [1.0], "<lambda>_2": [10.0]}
    assert rewards.names == ["<lambda>", "<lambda>_2"] and failures == []


def test_a_failure_of_one_same_named_scorer_is_its_own():
    def raising(prompts, completions, **_):
        raise RuntimeError("no")

    raising.__name__ = "length_reward"  # the same name as the working one
    total, per_function, failures = WeightedRewards([length_reward, raising])(["p"], ["abc"])
    assert total == [None] and per_function["length_reward"] == [3.0]
    assert [failure.function for failure in failures] == ["length_reward_2"]


@pytest.mark.parametrize("weight", [math.nan, math.inf])
def test_non_finite_weight_is_a_config_error(weight):
    with pytest.raises(ConfigError, match="reward_weights"):
        WeightedRewards([length_reward], [weight])


# ------------------------------------------------------------------------ reward functions as users have them


def test_module_function_is_imported_from_the_current_folder(tmp_path, monkeypatch):
    # `prefalign grpo --reward_functions my_rewards:fn` run in the folder that holds my_rewards.py
    (tmp_path / "prefalign_test_my_rewards.py").write_text(
        "def fn(prompts, completions, **_):\n    return [2.0 for _ in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "prefalign_test_my_rewards", raising=False)
    function = get_reward_function("prefalign_test_my_rewards:fn")
    assert function(["p"], ["c"]) == [2.0]
    assert str(tmp_path) not in sys.path  # looked there for this import only, as `python -m` does
    sys.modules.pop("prefalign_test_my_rewards", None)


def test_a_module_not_found_names_the_paths_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no module 'no_such_rewards_module'") as error:
        get_reward_function("no_such_rewards_module:fn")
    assert str(tmp_path) in str(error.value) and "sys.path" in str(error.value)
    with pytest.raises(ConfigError, match="has no 'missing'"):
        get_reward_function("prefalign.rewards.math:missing")


def test_trl_arguments_are_passed_trainer_state_included():
    seen = []

    def shaped(prompts, completions, completion_ids, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, completion_ids, "trainer_state" in kwargs))
        return [float(trainer_state.global_step)] * len(completions)

    rewards = WeightedRewards([shaped])
    rewards.trainer_state.global_step = 3
    total, _, failures = rewards(["p"], ["c"], completion_ids=[[5, 6]])
    assert total == [3.0] and failures == [] and seen == [(3, [[5, 6]], False)]


def test_a_required_argument_nobody_passes_is_named():
    def needs_solution(prompts, completions, solution):
        return [1.0] * len(completions)

    with pytest.raises(ConfigError, match="requires argument.*'solution'.*not passed"):
        WeightedRewards([needs_solution])(["p"], ["c"], answer=["1"])


def test_a_function_that_scores_nothing_is_named_in_a_warning(caplog):
    def never(prompts, completions, **_):
        return [None] * len(completions)

    rewards = WeightedRewards([length_reward, never])
    with caplog.at_level("WARNING", logger="prefalign"):
        total, per_function, _ = rewards(["p", "q"], ["ab", "c"])
    assert total == [2.0, 1.0] and per_function["never"] == [None, None]
    assert "'never' returned None" in caplog.text and "for all 2 samples" in caplog.text


def test_metric_names_are_short_and_unique():
    def reward_model(prompts, completions, **_):
        return [0.0] * len(completions)

    reward_model.name = "reward_model:runs/rm/final"
    other = lambda prompts, completions, **_: [0.0] * len(completions)  # noqa: E731
    other.name = "reward_model:runs/rm2/final"
    rewards = WeightedRewards([reward_model, other, "prefalign.rewards.math:format_reward", "format"])
    assert rewards.names == ["reward_model", "reward_model_2", "format_reward", "format"]
    assert rewards.labels[0] == "reward_model:runs/rm/final"  # messages still name the folder
    assert not any("/" in name or ":" in name for name in rewards.names)
