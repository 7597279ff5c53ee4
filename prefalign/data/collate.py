"""Batches of token ids as padded torch.long tensors.

`completion_mask` marks the completion tokens in `input_ids` coordinates (1 where the token is part
of the completion). A causal LM's logits at position t predict token t + 1, so a trainer scores
`input_ids[:, 1:]` with `logits[:, :-1]` under `completion_mask[:, 1:]`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prefalign.errors import ModelError

Example = Mapping[str, Any]


def _ids(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths, default=0)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    *,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> torch.Tensor:
    """(batch, longest) long tensor; `padding_side` 'right' or 'left'."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = _padded_length([len(sequence) for sequence in sequences], pad_to_multiple_of)
    batch = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for index, sequence in enumerate(sequences):
        if not len(sequence):
            continue
        values = torch.as_tensor(sequence, dtype=torch.long)
        if padding_side == "right":
            batch[index, : len(sequence)] = values
        else:
            batch[index, length - len(sequence) :] = values
    return batch


def _check_pad(pad_token_id: int | None) -> None:
    if pad_token_id is None:
        raise ModelError(
            "the tokenizer has no pad token; set tokenizer.pad_token (for example to its eos or unk token)."
        )


def _collate_sequences(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows with attention and completion masks, each (rows, length)."""
    sequences = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    completion_flags = [
        [0] * len(prompt) + [1] * len(completion)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
    return {
        "input_ids": pad_sequences(sequences, pad_token_id, pad_to_multiple_of=pad_to_multiple_of),
        "attention_mask": pad_sequences(
            [[1] * len(sequence) for sequence in sequences], 0, pad_to_multiple_of=pad_to_multiple_of
        ),
        "completion_mask": pad_sequences(completion_flags, 0, pad_to_multiple_of=pad_to_multiple_of),
    }


def collate_preference(
    examples: Sequence[Example], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Chosen and rejected of B pairs stacked into one batch, so one forward pass serves both.

    Returns input_ids, attention_mask, completion_mask: (2B, L) long, rows [0, B) chosen and
    [B, 2B) rejected, right-padded to the longest (rounded up to pad_to_multiple_of);
    margin: (B,) float32 when the examples have one.
    """
    _check_pad(pad_token_id)
    prompts = [_ids(example["prompt_ids"]) for example in examples]
    chosen = [_ids(example["chosen_ids"]) for example in examples]
    rejected = [_ids(example["rejected_ids"]) for example in examples]
    batch = _collate_sequences(prompts + prompts, chosen + rejected, pad_token_id, pad_to_multiple_of)
    if examples and all(example.get("margin") is not None for example in examples):
        batch["margin"] = torch.tensor(
            [float(example["margin"]) for example in examples], dtype=torch.float32
        )
    return batch


def collate_sft(
    examples: Sequence[Example], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, completion_mask: (B, L) long, right-padded."""
    _check_pad(pad_token_id)
    prompts = [_ids(example["prompt_ids"]) for example in examples]
    completions = [_ids(example["completion_ids"]) for example in examples]
    return _collate_sequences(prompts, completions, pad_token_id, pad_to_multiple_of)


def collate_prompts(
    examples: Sequence[Example],
    pad_token_id: int,
    padding_side: str = "left",
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Prompts for generation: input_ids, attention_mask (B, L) long, left-padded by default so every
    prompt ends at the last column and generated tokens line up.

    Every other key of the examples (the prompt as given, `answer`, ...) comes back as a list of B
    values under its own name, for reward functions.
    """
    _check_pad(pad_token_id)
    prompts = [_ids(example["prompt_ids"]) for example in examples]
    batch: dict[str, Any] = {
        "input_ids": pad_sequences(
            prompts, pad_token_id, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of
        ),
        "attention_mask": pad_sequences(
            [[1] * len(prompt) for prompt in prompts],
            0,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
        ),
    }
    extra_names = [name for name in (examples[0] if examples else {}) if name != "prompt_ids"]
    for name in extra_names:
        batch[name] = [example.get(name) for example in examples]
    return batch
