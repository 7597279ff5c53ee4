"""Forward passes that turn a collated batch into completion log-probs (shared by every algorithm)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefalign.losses import token_logprobs


@dataclass
class CompletionLogps:
    token_logps: torch.Tensor  # (batch, scored_len): log-prob of each scored token, 0 where masked
    mask: torch.Tensor  # (batch, scored_len): 1 on completion tokens
    logits: torch.Tensor | None = None  # (batch, scored_len, vocab) when asked for (entropy)

    @property
    def sums(self) -> torch.Tensor:  # (batch,) log π(y|x): summed over completion tokens
        return self.token_logps.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:  # (batch,) |y|
        return self.mask.sum(-1)


def completion_logps(model, batch: dict[str, torch.Tensor], *, temperature: float = 1.0, keep_logits: bool = False) -> CompletionLogps:
    """Log-probs of the completion tokens of a right-padded batch (input_ids, attention_mask, completion_mask).

    Only positions from the earliest completion start onward go through the output head
    (`logits_to_keep`): prompt positions are never scored, and the head is the widest matmul.
    """
    input_ids = batch["input_ids"]  # (batch, seq_len)
    completion_mask = batch["completion_mask"]
    seq_len = input_ids.shape[1]
    first_completion = int(completion_mask.float().argmax(dim=1).min())
    # The logit at position t scores token t+1, so one position before the first completion token.
    keep = seq_len - max(first_completion - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, :-1]  # (batch, keep - 1, vocab)
    targets = input_ids[:, seq_len - keep + 1:]
    mask = completion_mask[:, seq_len - keep + 1:].to(logits.dtype if logits.is_floating_point() else torch.float32)
    token_logps = token_logprobs(logits, targets, temperature=temperature) * mask
    return CompletionLogps(token_logps=token_logps, mask=mask, logits=logits if keep_logits else None)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch, for tokens_per_second."""
    return int(batch["attention_mask"].sum())
