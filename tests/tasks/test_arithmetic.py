"""The built-in task: fixed disjoint splits, the exact-match reward, near-miss wrong answers."""

from __future__ import annotations

from prefalign.tasks import arithmetic
from tests.helpers import assistant


def test_task_splits_are_disjoint_and_fixed():
    held_out, train = arithmetic.problems("held_out"), arithmetic.problems("train")
    assert len(held_out) == 500 and len(train) == 9500
    assert not set(held_out) & set(train)
    assert held_out[:3] == arithmetic.problems("held_out")[:3]


def test_exact_match_ignores_format_details():
    completions = ["68", " 68.", "= 68", "The answer is 68", "86", "", [assistant("68")]]
    rewards = arithmetic.exact_match_reward(None, completions, ["68"] * len(completions))
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_near_misses_are_wrong_and_plausible():
    # 27 + 15 = 42: digit off by one (41, 43), off by ten (32, 52), dropped carry (32), swapped digits (24).
    assert arithmetic.near_misses(27, 15) == [24, 32, 41, 43, 52]
    for a, b in arithmetic.problems("train")[:200]:
        assert all(m != a + b and m >= 0 for m in arithmetic.near_misses(a, b))
    pairs = arithmetic.preference_dataset("train", limit=50)
    assert all(row["chosen"] != row["rejected"] for row in pairs)
