"""Math-answer, format and length reward functions; the math reward on real GSM8K references."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest

from prefalign.rewards import WeightedRewards, get_reward_function
from prefalign.rewards.math import (
    extract_final_answer,
    format_reward,
    length_penalty,
    make_overlong_reward,
    math_answer_reward,
    math_answer_strict_reward,
    parse_number,
    think_format_reward,
)


def math_reward(completion, answer):
    return math_answer_reward(["q"], [completion], [answer])[0]


@pytest.mark.parametrize(
    "completion",
    [
        "She makes 9 * 2 = $18 every day.\n#### 18",
        "#### 18.0",
        "The answer is 18.",
        "so the final answer is $18.00",
        "Answer: 18 dollars",
        "Step one.\nA: 18",
        "We get \\boxed{18}.",
        "<think>9*2</think><answer>18</answer>",
        "9 times 2 gives 18",  # no marker: the last number
    ],
)
def test_math_answer_formats_score_correct(completion):
    assert math_reward(completion, "18") == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("#### 70,000", "70000"),
        ("The answer is $70000", "70,000"),
        ("#### 1,450,000", "1450000"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{1}{2}}", "1/2"),
        ("The answer is 3/4", "0.75"),
        ("#### -5", "-5"),
        ("The answer is \u22125", "-5"),  # typographic minus
        ("\\boxed{-12}", "-12.0"),
        ("A: 0.5", ".5"),
        ("#### 50%", "50"),
        # the whole reference solution as the answer
        ("It costs 3 + 4 = 7 dollars.\n#### 7", "Reference: 3 + 4 = <<3+4=7>>7\n#### 7"),
    ],
)
def test_numbers_compare_robustly(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("#### 19", "18"),
        ("#### -18", "18"),
        ("The answer is 1.8", "18"),
        ("\\boxed{18} was wrong, so \\boxed{19}", "18"),  # the last box counts
        ("I computed 18 first.\n#### 17", "18"),  # the marker wins over earlier numbers
        ("#### 1,800", "18"),
        ("no number at all", "18"),
        ("cut off inside \\boxed{1", "18"),  # unbalanced box: falls back to the last number, 1
    ],
)
def test_wrong_or_missing_answers_score_zero(completion, answer):
    assert math_reward(completion, answer) == 0.0


def test_strict_variant_needs_a_marked_answer():
    assert math_answer_strict_reward(["q"], ["9 times 2 gives 18"], ["18"]) == [0.0]
    assert math_answer_strict_reward(["q"], ["The answer is 18"], ["18"]) == [1.0]


def test_extraction_and_parsing_pieces():
    assert extract_final_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_final_answer("x\n#### 42\n") == "42"
    assert extract_final_answer("nothing here", fallback_last_number=False) is None
    assert parse_number("$1,234.50") == Fraction(2469, 2)
    assert parse_number("\\frac{6}{8}") == Fraction(3, 4)
    assert parse_number("1, 2") == 1  # a list, not a thousands separator
    assert parse_number("no digits") is None


def test_conversational_completions_are_read_as_text():
    completion = [{"role": "assistant", "content": "The answer is 18"}]
    assert math_answer_reward(["q"], [completion], ["18"]) == [1.0]


def test_reference_without_a_number_is_a_counted_failure():
    rewards = WeightedRewards(["math_answer"])
    total, _, failures = rewards(["q", "q"], ["#### 1", "#### 2"], answer=["1", "no number"])
    assert total == [1.0, None]
    assert len(failures) == 1 and "holds no number" in failures[0].reason


def test_format_rewards():
    completions = [
        "<think>3+4</think> <answer>7</answer>",
        "<answer>7</answer>",
        "<answer> </answer>",
        "7",
        "<think>x</think><answer>7</answer> trailing",
    ]
    assert format_reward([None] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert think_format_reward([None] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty_counts_tokens_when_given_else_characters():
    assert length_penalty([None, None], ["abc", "a"], completion_ids=[[5, 6], [7, 8, 9, 10]]) == [-2.0, -4.0]
    assert length_penalty([None, None], ["abc", "a"]) == [-3.0, -1.0]


def test_overlong_reward_is_dapo_soft_penalty():
    reward = make_overlong_reward(max_length=10, buffer=4)
    # soft zone starts at 10 − 4 = 6: |y| = 6 → 0; 8 → (6 − 8)/4 = −0.5; 10 → −1; 12 → −1
    completion_ids = [[0] * 6, [0] * 8, [0] * 10, [0] * 12]
    assert reward([None] * 4, ["", "", "", ""], completion_ids=completion_ids) == [0.0, -0.5, -1.0, -1.0]


def test_registered_by_name():
    for name in ("math_answer", "math_answer_strict", "format", "think_format", "length_penalty"):
        assert callable(get_reward_function(name))
    rewards = WeightedRewards(["math_answer", "format"], [1.0, 0.5])
    total, per_function, _ = rewards(["q"], ["<answer>7</answer>"], answer=["7"])
    assert total == [1.5] and per_function["format"] == [1.0]


# ----------------------------------------------------------------------------- real GSM8K references


def gsm8k_dir() -> Path:
    root = os.environ.get("PREFALIGN_DATA_DIR")
    if not root or not (Path(root) / "gsm8k" / "test.jsonl").exists():
        reason = "PREFALIGN_DATA_DIR is not set (or has no gsm8k/): skipping the GSM8K reward checks"
        print(reason)
        pytest.skip(reason)
    return Path(root) / "gsm8k"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def altered(solution: str, gold: str) -> str:
    """The reference with its final number changed by one."""
    body, _, _ = solution.rpartition("####")
    return f"{body}#### {int(gold.replace(',', '')) + 1}"


def test_every_gsm8k_reference_scores_correct_and_altered_ones_wrong():
    folder = gsm8k_dir()
    rows = read_jsonl(folder / "test.jsonl") + read_jsonl(folder / "train.jsonl")
    golds = [row["answer"].rpartition("####")[2].strip() for row in rows]  # e.g. "18", "70,000", "-3"
    solutions = [row["answer"] for row in rows]
    prompts = [row["question"] for row in rows]
    assert math_answer_reward(prompts, solutions, golds) == [1.0] * len(rows)
    wrong = [altered(solution, gold) for solution, gold in zip(solutions, golds, strict=True)]
    assert math_answer_reward(prompts, wrong, golds) == [0.0] * len(rows)
    # The answer column may also be the whole reference solution.
    assert math_answer_reward(prompts[:200], solutions[:200], solutions[:200]) == [1.0] * 200


def test_gsm8k_model_solutions_agree_with_their_correctness_labels():
    folder = gsm8k_dir()
    agree, total = 0, 0
    for row in read_jsonl(folder / "example_model_solutions.jsonl"):
        reference = row["ground_truth"]  # ends in "A: <number>"
        assert math_reward(reference, reference) == 1.0
        for value in row.values():
            if isinstance(value, dict) and "is_correct" in value:
                total += 1
                agree += math_reward(value["solution"], reference) == float(value["is_correct"])
    assert total == 4 * 1319
    assert agree == total


# ---------------------------------------------------------------------------- review fixes (signs, fractions)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-\\frac{1}{2}", Fraction(-1, 2)),  # a minus before \frac belongs to the fraction
        ("-\\dfrac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("-\\frac{-3}{4}", Fraction(3, 4)),
        ("1{,}000", Fraction(1000)),  # LaTeX's thousands separator (MATH answers write it so)
        ("\\$2{,}500.50", Fraction(5001, 2)),
    ],
)
def test_parse_number_signs_and_latex_separators(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
        ("\\boxed{-\\frac{1}{2}}", "0.5", 0.0),  # the sign was dropped: -1/2 scored as 1/2
        # no marker: the last number is the whole fraction 1/2, not its 2
        ("so x = \\frac{1}{2}", "0.5", 1.0),
        ("so x = \\frac{1}{2}", "2", 0.0),
        ("the answer is 2", "\\frac{1}{2}", 0.0),  # a reference \frac{1}{2} is 1/2, not 2
        ("the answer is 0.5", "\\frac{1}{2}", 1.0),
        ("x = -\\frac{3}{4}", "-3/4", 1.0),
        ("\\boxed{1{,}000}", "1000", 1.0),
    ],
)
def test_fractions_keep_sign_and_value(completion, answer, reward):
    assert math_reward(completion, answer) == reward


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("The answer is 0.00001", 1e-05, 1.0),  # str(1e-05) is '1e-05': read as 1e-05, not as 1
        ("The answer is 1", 1e-05, 0.0),
        ("The answer is 100000", 1e5, 1.0),
        ("The answer is 0.1", 0.1, 1.0),  # the float's shortest repr, not its binary value
        ("The answer is 7", 7, 1.0),
    ],
)
def test_numeric_reference_answers(completion, answer, reward):
    assert math_reward(completion, answer) == reward


@pytest.mark.parametrize(
    "completion",
    ["The answer is:\n42", "The final answer is:\n\n42", "So the answer is\n42", "Answer:\n42"],
)
def test_answer_on_the_line_after_the_marker(completion):
    # "The answer is:" then a line break: the colon alone was taken as the answer (no number: reward 0),
    # while "Answer:\n42" already read the 42.
    assert math_reward(completion, "42") == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        # the result of a stated computation, not its first operand
        ("The answer is 3 + 4 = 7", "7"),
        ("The answer is 6 * 7 = 42 apples.", "42"),
        ("So 6 times 7 equals 42.", "42"),
        ("\\boxed{x = 5}", "5"),
        ("Answer: x = -3", "-3"),
        # the last answer stated counts when the model restates or corrects itself
        ("The answer is 5. Wait, let me recheck. Actually the answer should be 6.", "6"),
        ("\\boxed{5}\nHmm, I made a mistake there. The correct answer is 6.", "6"),
        ("The answer is 12.\nCheck: 3 * 4 = 12. So the final answer is 12.", "12"),
        ("<answer>4</answer> no, wait: <answer>5</answer>", "5"),
        ("A: 18\nOn reflection the answer is 20.", "20"),
        ("Answer: 7\nThe answer is correct.", "7"),  # a later marker without a number does not erase one
        # thousands separators, currency and units, fractions and decimals
        ("Final answer: \\boxed{1,234}", "1234"),
        ("The answer is 1 234 567", "1234567"),
        ("Answer: $1,234.50", "1234.5"),
        ("The answer is \u20ac20.", "20"),
        ("The answer is 15 km.", "15"),
        ("I think the answer is 10 dollars, or $10.00", "10"),
        ("The answer is 3/4 of the pizza", "0.75"),
        ("The answer is 0.750", "3/4"),
    ],
)
def test_math_answer_reads_the_answer_as_a_grader_would(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("The answer is 5. Wait, actually the answer should be 6.", "5"),  # corrected away
        ("\\boxed{5}\nNo: the correct answer is 6.", "5"),
        ("The answer is 3 + 4 = 7", "3"),
    ],
)
def test_math_answer_does_not_take_an_answer_the_model_replaced(completion, answer):
    assert math_reward(completion, answer) == 0.0
