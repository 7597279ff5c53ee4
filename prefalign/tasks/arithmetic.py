"""The built-in task: two-digit addition with a verifiable answer.

A prompt is one user turn, `23+45`; the answer is `68`. Small enough that a 1M-parameter model learns
part of it in a couple of minutes on a CPU and leaves headroom for alignment. Problems are split once,
by a fixed permutation, into held-out and training sets that never overlap.

Preference pairs use near-miss wrong answers (off by one in a digit, a dropped carry, swapped digits) as
the rejected side: same format and length as the right answer, so a method cannot win on a shortcut.
"""

from __future__ import annotations

import random
import re

import datasets

NUM_HELD_OUT = 500
_INTEGER = re.compile(r"-?\d+")


def _all_problems() -> list[tuple[int, int]]:
    problems = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(problems)  # fixed forever: the held-out set must never move
    return problems


def problems(split: str) -> list[tuple[int, int]]:
    """`held_out` (500 problems) or `train` (the other 9,500)."""
    every = _all_problems()
    if split == "held_out":
        return every[:NUM_HELD_OUT]
    if split == "train":
        return every[NUM_HELD_OUT:]
    raise ValueError(f"unknown split {split!r}: use 'train' or 'held_out'")


def prompt_messages(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}"}]


def extract_answer(text: str) -> int | None:
    """The first integer in a completion, whatever surrounds it (spaces, `=`, a trailing period)."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def _completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: the assistant turn(s)
        return "".join(message.get("content", "") for message in completion)
    return completion


def exact_match_reward(prompts, completions, answer, **_unused_columns) -> list[float]:
    """1.0 where the completion's first integer equals the answer, else 0.0 (TRL-style signature)."""
    return [
        float(extract_answer(_completion_text(completion)) == int(expected))
        for completion, expected in zip(completions, answer, strict=True)
    ]


def near_misses(a: int, b: int) -> list[int]:
    """Plausible wrong answers: a digit off by one, a dropped or doubled carry, swapped digits."""
    right = a + b
    candidates = {right + 1, right - 1, right + 10, right - 10}
    if (a % 10) + (b % 10) >= 10:
        candidates.add(right - 10)  # forgot the carry
    else:
        candidates.add(right + 10)  # invented a carry
    text = str(right)
    if len(text) >= 2 and text[-1] != text[-2]:
        candidates.add(int(text[:-2] + text[-1] + text[-2]))
    return sorted(c for c in candidates if c >= 0 and c != right)


def prompt_dataset(split: str, limit: int | None = None) -> datasets.Dataset:
    """Prompt-only rows: `prompt` (messages) and `answer` (string) for reward functions."""
    rows = problems(split)[:limit]
    return datasets.Dataset.from_list(
        [{"prompt": prompt_messages(a, b), "answer": str(a + b)} for a, b in rows]
    )


def sft_dataset(split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Demonstrations: prompt and the correct assistant turn."""
    rows = problems(split)[:limit]
    return datasets.Dataset.from_list(
        [
            {"prompt": prompt_messages(a, b), "completion": [{"role": "assistant", "content": str(a + b)}]}
            for a, b in rows
        ]
    )


def preference_dataset(
    split: str = "train", limit: int | None = None, seed: int = 0, *, every_near_miss: bool = False,
) -> datasets.Dataset:
    """Pairs: the correct answer is chosen, a near-miss wrong answer is rejected (one drawn with `seed` per
    problem, or with every_near_miss one pair per near miss)."""
    rng = random.Random(seed)
    rows = []
    for a, b in problems(split)[:limit]:
        for wrong in near_misses(a, b) if every_near_miss else [rng.choice(near_misses(a, b))]:
            rows.append(
                {
                    "prompt": prompt_messages(a, b),
                    "chosen": [{"role": "assistant", "content": str(a + b)}],
                    "rejected": [{"role": "assistant", "content": str(wrong)}],
                    "answer": str(a + b),
                }
            )
    return datasets.Dataset.from_list(rows)
