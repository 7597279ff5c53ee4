"""Experience: one dict per sampled completion, and the tensors a loss reads from a micro-batch of them.

An experience row holds `prompt_ids`, `completion_ids`, `sampler_logps` (the rollout engine's per-token
log-probs), `advantage` (a scalar; PPO adds per-token `advantages`, `returns` and `values`), `reward`,
`trained` (False: the completion stays out of the loss, e.g. truncated or unscored) and, once computed,
`ref_logps` and `old_logps` (one value per completion token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prefalign.data import collate_sft
from prefalign.models.forward import CompletionLogps, completion_logps, grouped_completion_logps
from prefalign.runtime import distributed
from prefalign.runtime.setup import to_device

# Per-completion-token lists an experience row may carry (PPO adds the critic's values, GAE's advantages and
# returns); a missing one collates to None.
PER_TOKEN = ("sampler_logps", "old_logps", "ref_logps", "old_values", "token_advantages", "returns")


def collate_experience(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """A micro-batch: input_ids, attention_mask, completion_mask (B, L) and per-row values."""
    batch = collate_sft(rows, pad_token_id)
    batch.update(
        pad_token_id=pad_token_id, prompt_ids=[row["prompt_ids"] for row in rows],
        completion_ids=[row["completion_ids"] for row in rows],
    )  # fmt: skip
    # (B,): GRPO's one advantage per completion (PPO's are per token, in token_advantages)
    batch["advantages"] = torch.tensor([row.get("advantage", 0.0) for row in rows], dtype=torch.float32)
    batch["trained"] = torch.tensor([float(row["trained"]) for row in rows])  # (B,)
    for name in PER_TOKEN:
        batch[name] = [row.get(name) for row in rows]  # per row: one value per completion token, or None
    return batch


def aligned(per_row: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values laid out like `mask` (batch, T): row i's values fill its 1s in order."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    values = [value for row in per_row for value in row]
    out[mask.bool()] = torch.tensor(values, dtype=torch.float32, device=mask.device)
    return out


@dataclass(frozen=True)
class CompletionScorer:
    """How completions go through a model: at the sampling temperature, each prompt once with its KV cache
    shared by its completions (`share_prompt`, off under gradient checkpointing) or as padded rows."""

    temperature: float = 1.0
    share_prompt: bool = True

    def __call__(self, model, batch: dict[str, Any], keep_logits: bool = False) -> CompletionLogps:
        if self.share_prompt:
            return grouped_completion_logps(
                model, batch["prompt_ids"], batch["completion_ids"], batch["pad_token_id"],
                temperature=self.temperature, keep_logits=keep_logits,
            )  # fmt: skip
        return completion_logps(model, batch, temperature=self.temperature, keep_logits=keep_logits)


@torch.no_grad()
def add_token_logps(
    rows: list[dict[str, Any]],
    name: str,
    score: Callable[[dict[str, Any]], CompletionLogps],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> None:
    """rows[i][name] = the per-token log-probs `score` gives row i's completion (no gradient), in batches."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        scored = score(to_device(collate_experience(chunk, pad_token_id), device))
        for row, values, row_mask in zip(chunk, scored.token_logps, scored.mask, strict=True):
            row[name] = values[row_mask.bool()].tolist()


def logprob_difference(rows: list[dict[str, Any]], name: str = "old_logps") -> dict[str, float]:
    """Largest and mean |sampler − training forward| per-token log-prob over the rows' completion tokens:
    how far the engine's numbers (bf16, another kernel, later vLLM) are from the training model's at the same
    weights."""
    differences = [
        abs(sampled - trained)
        for row in rows if row.get(name) is not None
        for sampled, trained in zip(row["sampler_logps"], row[name], strict=True)
    ]  # fmt: skip
    # Over every process's rows: a sum and a count, and a maximum.
    total, count = distributed.sum_tensor_across(
        torch.tensor([sum(differences), len(differences)], dtype=torch.float64)
    ).tolist()
    largest = distributed.max_tensor_across(
        torch.tensor([max(differences, default=0.0)], dtype=torch.float64)
    )
    if not count:
        return {}
    return {"rollout/logprob_diff_max": float(largest), "rollout/logprob_diff_mean": total / count}


def step_totals(micro_batches: list[dict[str, Any]]) -> None:
    """The step's normalisers over every process, before the first backward: trained completion tokens, all
    completion tokens and trained completions (a loss divides by the one its aggregation needs), stored in
    every micro-batch as step_tokens, step_completion_tokens and step_sequences."""
    trained = [
        torch.tensor([len(ids) for ids in b["completion_ids"]]) * b["trained"].cpu() for b in micro_batches
    ]
    tokens = distributed.sum_across(float(sum(int(t.sum()) for t in trained)))
    sequences = distributed.sum_across(float(sum(int((t > 0).sum()) for t in trained)))
    completion_tokens = distributed.sum_across(
        float(sum(sum(map(len, b["completion_ids"])) for b in micro_batches))
    )
    for batch in micro_batches:
        batch["step_tokens"], batch["step_sequences"] = int(tokens), max(1, int(sequences))
        batch["step_completion_tokens"] = int(completion_tokens)
