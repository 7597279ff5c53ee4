"""Reward functions for math answers, answer formatting and completion length (TRL-style signatures).

Every function takes `prompts, completions, **columns` and returns one float per completion; a completion
is a string, or a list of messages (conversational data) whose contents are joined.

- `math_answer_reward`: 1.0 when the completion's final answer equals the `answer` column as a number,
  else 0.0. The final answer is read as a grader would: of the answers the completion marks (`\\boxed{...}`,
  `####` as in GSM8K references, `<answer>...</answer>` tags, "the answer is" / "answer:" / "the answer should
  be", `A:` at the start of a line) the one stated last (a model that corrects itself means its last word),
  and of a computation its result ("the answer is 3 + 4 = 7" is 7); with no marked answer `math_answer`
  falls back to the last number in the text, `math_answer_strict` does not. Numbers compare exactly as
  fractions after removing currency signs, units, thousands commas, spaces, a trailing period and LaTeX
  wrappers: `70,000` = `$70000.00`, `0.5` = `1/2` = `\\frac{1}{2}`, `-3` = `−3`.
  The `answer` column may be a bare number or a whole reference solution (its final answer is used).
- `format_reward`: 1.0 when the completion holds non-empty `<answer>...</answer>` tags.
- `think_format_reward`: 1.0 when it is `<think>...</think>` followed by `<answer>...</answer>`.
- `length_penalty`: minus the completion's length: tokens when the trainer passes `completion_ids`
  (prefalign's GRPO and rejection sampling do), characters otherwise. Scale it with its weight (e.g. 0.001).
- `make_overlong_reward(max_length, buffer)`: DAPO's soft overlong punishment as a reward function.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch

from prefalign.losses import overlong_penalty

# ----------------------------------------------------------------------------- final-answer extraction

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# A minus written right before \frac belongs to the fraction: `-\frac{1}{2}` is -1/2.
_FRAC = re.compile(r"(-?)\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
# One left-to-right scan for numbers: a \frac is read whole, before its digits could be read on their own.
_NUMERIC = re.compile(f"{_FRAC.pattern}|{_NUMBER.pattern}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# "the answer is", "final answer:", "answer = ", "the answer should actually be": the text after it, to the
# line's end (in group 1 or 2). A lookahead, so that a second "answer is" on the same line is found too.
_ANSWER_IS = re.compile(
    r"\banswer\s*[:=]\s*(?=([^\n]*))"
    r"|\banswer\s+(?:is|was|should\s+be|would\s+be|will\s+be|must\s+be)\b"
    r"(?:\s+(?:actually|really|then|now|therefore|thus|instead|indeed|simply|just)\b)*\s*:?\s*(?=([^\n]*))",
    re.IGNORECASE,
)
_EQUALS_WORDS = re.compile(r"\b(?:equals|is\s+equal\s+to)\b|\\approx|≈", re.IGNORECASE)
_A_COLON = re.compile(r"(?:^|\n)\s*A\s*:\s*([^\n]*)")
_LATEX_NOISE = re.compile(r"\\text\{[^}]*\}|\\mathrm\{[^}]*\}|\\[,!;: ]|\\left|\\right|\\%|\\\$")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched so `\\boxed{\\frac{1}{2}}`
    works."""
    found = _last_boxed_at(text)
    return found[1] if found else None


def _last_boxed_at(text: str) -> tuple[int, str] | None:
    """(position, content) of the last complete box."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return start, text[brace + 1 : index]
    return None  # unbalanced: the completion was cut off inside the box


def _last_match(pattern: re.Pattern, text: str) -> str | None:
    matches = pattern.findall(text)
    return matches[-1] if matches else None


def _marked_answers(text: str) -> list[tuple[int, str]]:
    """Every answer the text marks (boxed, ####, tags, "the answer is", A:), as (position, text)."""
    found = []
    boxed = _last_boxed_at(text)
    if boxed is not None:
        found.append(boxed)
    for pattern in (_HASHES, _ANSWER_TAG, _ANSWER_IS, _A_COLON):
        for match in pattern.finditer(text):
            group = next((index for index in range(1, (pattern.groups or 0) + 1) if match.group(index)), None)
            if group is not None and match.group(group).strip():
                found.append((match.start(group), match.group(group).strip()))
    return found


def _result_of(answer: str) -> str:
    """The result of a stated computation: '3 + 4 = 7' -> '7' (after the last '=', when a number is there)."""
    answer = _EQUALS_WORDS.sub("=", answer)
    if "=" in answer:
        result = answer.rsplit("=", 1)[1]
        if _NUMERIC.search(_normalize(result)):
            return result.strip()
    return answer


def extract_final_answer(text: str, *, fallback_last_number: bool = True) -> str | None:
    """The text of a completion's final answer (not yet parsed as a number), or None if there is none.

    As a grader reads it: of the answers the text marks, the one stated last counts (a model that restates
    or corrects itself means its last word), preferring one that holds a number; of a computation, its result
    ('the answer is 3 + 4 = 7' is 7)."""
    marked = sorted(_marked_answers(text), key=lambda found: found[0], reverse=True)
    for _, answer in marked:
        if _NUMERIC.search(_normalize(answer)):
            return _result_of(answer)
    if marked:
        return marked[0][1]
    if fallback_last_number:
        numbers = [match.group() for match in _NUMERIC.finditer(_normalize(text))]
        return numbers[-1] if numbers else None
    return None


def _normalize(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-")  # typographic minus and en dash
    text = _LATEX_NOISE.sub("", text)
    text = text.replace("$", "").replace("%", "").replace("{,}", ",")  # LaTeX writes 1{,}000
    # Thousands separators only (70,000 but not a list like "1, 2"), then spaces inside numbers (70 000).
    text = _THOUSANDS.sub("", text)
    return re.sub(r"(?<=\d) (?=\d{3}(?!\d))", "", text)


def parse_number(text: str | None) -> Fraction | None:
    """The first number in `text` as an exact fraction: `$1,234.50` -> 2469/2, `-\\frac{3}{4}` -> -3/4."""
    if text is None:
        return None
    match = _NUMERIC.search(_normalize(str(text)))
    if match is None:
        return None
    try:
        if match.group(2) is None:
            return Fraction(match.group())
        sign = -1 if match.group(1) else 1
        return sign * Fraction(match.group(2)) / Fraction(match.group(3))
    except (ValueError, ZeroDivisionError):
        return None


def completion_text(completion: Any) -> str:
    """A completion as text: a string as is, a list of messages as the concatenation of their contents."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return str(completion)


def answers_match(completion: str, expected: Any, *, fallback_last_number: bool = True) -> bool:
    """Does the completion's final answer equal `expected` (a number, or a reference solution) as a number?"""
    wanted = _reference_number(expected)
    if wanted is None:
        raise ValueError(f"the reference answer {str(expected)[:80]!r} holds no number to compare with")
    got = parse_number(extract_final_answer(completion, fallback_last_number=fallback_last_number))
    return got is not None and got == wanted


def _reference_number(expected: Any) -> Fraction | None:
    """The reference answer as a fraction: a Python number exactly as written (`1e-05` is 1/100000, `0.1`
    is 1/10, not its binary value), anything else through the same extraction as a completion."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return Fraction(str(expected))
        except ValueError:  # nan, inf
            return None
    return parse_number(extract_final_answer(str(expected)))


# ----------------------------------------------------------------------------- reward functions


def math_answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_columns,
) -> list[float]:
    """1.0 where the completion's final answer equals `answer` as a number, else 0.0."""
    return [float(answers_match(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def math_answer_strict_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_columns,
) -> list[float]:
    """As math_answer_reward, but the answer must be marked (boxed, ####, tags, "the answer is", A:)."""
    return [
        float(answers_match(completion_text(c), a, fallback_last_number=False))
        for c, a in zip(completions, answer, strict=True)
    ]


_FORMAT = re.compile(r"<answer>\s*\S.*?</answer>", re.DOTALL)
_THINK_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>\s*\S.*?</answer>\s*$", re.DOTALL)


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
    """1.0 where the completion holds a non-empty `<answer>...</answer>`, else 0.0."""
    return [float(bool(_FORMAT.search(completion_text(c)))) for c in completions]


def think_format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
    """1.0 where the completion is exactly `<think>...</think>` then `<answer>...</answer>`, else 0.0."""
    return [float(bool(_THINK_FORMAT.match(completion_text(c)))) for c in completions]


def _lengths(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


def length_penalty(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids=None, **_columns,
) -> list[float]:
    """−|y|: tokens when `completion_ids` is passed (GRPO and sampling pass it), else characters. Weight it
    (e.g. 0.001)."""
    return [-float(length) for length in _lengths(completions, completion_ids)]


def make_overlong_reward(max_length: int, buffer: int):
    """DAPO's soft overlong punishment (Yu et al. 2025) as a reward function: 0 up to max_length − buffer,
    then falling linearly to −1 at max_length, −1 beyond (see losses.overlong_penalty)."""

    def overlong_reward(prompts, completions, completion_ids=None, **_columns) -> list[float]:
        lengths = torch.tensor(_lengths(completions, completion_ids), dtype=torch.float32)
        return overlong_penalty(lengths, max_length, buffer).tolist()

    overlong_reward.__name__ = f"overlong_{max_length}_{buffer}"
    return overlong_reward


MATH_REWARD_FUNCTIONS = {
    "math_answer": math_answer_reward,
    "math_answer_strict": math_answer_strict_reward,
    "format": format_reward,
    "think_format": think_format_reward,
    "length_penalty": length_penalty,
}


def _register() -> None:
    from prefalign.rewards.functions import register_reward_function

    for name, function in MATH_REWARD_FUNCTIONS.items():
        register_reward_function(name, function)


_register()
