"""The critic: a causal LM backbone with a scalar value head, read at every completion token.

The critic is a one-label sequence classifier (`AutoModelForSequenceClassification`, the class a prefalign
reward model is saved as): its backbone gives a hidden state per position and its score head maps each to a
value. V_t, the value of the state before completion token y_t, is read at the position just before y_t, as
the policy's logits there score y_t.
"""

from __future__ import annotations

from typing import Any

import torch

from prefalign.errors import ModelError


def value_head(critic) -> torch.nn.Module:
    """The scalar head of a one-label sequence classifier (Llama, Qwen, Mistral, GPT-2: `score`)."""
    head = getattr(critic, "score", None)
    if head is None or getattr(head, "out_features", 1) != 1:
        raise ModelError(
            f"the critic {type(critic).__name__} has no one-output `score` head: use a causal decoder "
            "backbone (Llama, Qwen, Mistral, GPT-2, ...) loaded as a one-label sequence classifier"
        )
    return head


def token_values(critic, batch: dict[str, Any]) -> torch.Tensor:
    """Values of every completion token of a right-padded batch (input_ids, attention_mask, completion_mask,
    as collate_sft makes it), row by row in token order: a flat (completion tokens,) tensor, which
    `Tensor.masked_scatter` lays out like any (batch, T) completion mask."""
    hidden = critic.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    values = value_head(critic)(hidden).squeeze(-1).float()  # (batch, L): the value at every position
    # Position p's state is read to score the token at p + 1: shift by one, as the logits are.
    return values[:, :-1][batch["completion_mask"][:, 1:].bool()]


def laid_out(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A flat per-token tensor (row by row, in token order) placed at the 1s of `mask` (batch, T), 0
    elsewhere; differentiable with respect to `flat`."""
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask.bool(), flat)
