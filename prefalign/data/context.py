"""Prompts that must leave room for generation: the one context fitter (GRPO, rejection sampling, PPO)."""

from __future__ import annotations

import logging

import datasets

from prefalign.errors import DataError

logger = logging.getLogger("prefalign")


def fit_to_context(
    prompts: datasets.Dataset,
    context: int | None,
    max_new_tokens: int,
    *,
    too_long: str,
    name: str,
) -> tuple[datasets.Dataset, list[int]]:
    """Keep the tokenized prompts with len(prompt_ids) + max_new_tokens <= context (the model's positions).

    Too-long prompts are dropped and counted (logged) when `too_long` is "drop"; refused with the numbers when
    it is "error" or when none would be left. Returns the kept prompts and each one's position in `prompts`
    (what rows and failure reports name). With no known context every prompt is kept.
    """
    positions = list(range(len(prompts)))
    if not context:
        return prompts, positions
    lengths = [len(ids) for ids in prompts["prompt_ids"]]
    over = [index for index, length in enumerate(lengths) if length + max_new_tokens > context]
    if over and (too_long == "error" or len(over) == len(prompts)):
        raise DataError(
            f"{name} prompt {over[0]} is {lengths[over[0]]} tokens; with max_new_tokens={max_new_tokens} it "
            f"exceeds the model's context of {context} tokens ({len(over)} of {len(prompts)} prompts do). "
            "Lower max_new_tokens, set data.max_prompt_length to cut prompts from the left, or set "
            "data.too_long_prompt=drop."
        )
    if not over:
        return prompts, positions
    logger.warning(
        "%s data: %d prompts dropped: prompt + max_new_tokens > context %d", name, len(over), context
    )
    dropped = set(over)
    keep = [index for index in positions if index not in dropped]
    return prompts.select(keep), keep
