"""Token log-probabilities and entropies from logits, plus masked reductions.

The logits at position t score the token at position t (the caller shifts them: logits[:, t−1] of
the model output score token t). Every log-prob is normalised over the FULL vocabulary, never
over the top-k / top-p set a sample was drawn from: that renormalisation is only how the sample
was chosen, not the policy being trained.

Large vocabularies make (batch, seq, vocab) tensors the biggest thing in memory, so both
functions walk the sequence in chunks: at any time only one chunk of temperature-scaled (and,
for half precision, float32) logits exists besides the caller's logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.errors import ConfigError


def _check_chunking(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.")


def _scaled_chunk(logits: Tensor, start: int, stop: int, temperature: float) -> Tensor:
    """One slice of the logits over the sequence, in at least float32, divided by the temperature."""
    chunk = logits[:, start:stop]
    # bf16 / fp16 logsumexp loses digits that matter for ratios like exp(logp − old_logp).
    chunk = chunk.to(torch.promote_types(chunk.dtype, torch.float32))
    return chunk if temperature == 1.0 else chunk / temperature


def token_logprobs(
    logits: Tensor, target_ids: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """log π(y_t) = z[y_t]/T − logsumexp(z/T) over the full vocabulary, per token.

    logits: (batch, seq, vocab), already aligned so logits[:, t] scores target_ids[:, t].
    target_ids: (batch, seq) integer ids; every id must be a valid vocabulary index, so put any
    valid id (for example the pad id) at padding positions and mask the result afterwards.
    temperature: the sampling temperature T when scoring samples drawn at temperature T.
    Returns (batch, seq) in float32 (float64 for float64 logits); differentiable.
    """
    _check_chunking(temperature, chunk_size)
    if logits.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_ids {tuple(target_ids.shape)} do not line up: "
            "expected logits (batch, seq, vocab) and target_ids (batch, seq)."
        )
    pieces = []
    for start in range(0, logits.shape[1], chunk_size):
        stop = start + chunk_size
        chunk = _scaled_chunk(logits, start, stop, temperature)  # (batch, chunk, vocab)
        targets = target_ids[:, start:stop].unsqueeze(-1)  # (batch, chunk, 1)
        picked = chunk.gather(-1, targets).squeeze(-1)  # (batch, chunk)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    if not pieces:  # empty sequence
        return logits.new_zeros(target_ids.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(pieces, dim=1)  # (batch, seq)


def token_entropy(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy H_t = −Σ_v p_v log p_v of softmax(z/T) per token, chunked over the sequence.

    logits: (batch, seq, vocab). Returns (batch, seq). Differentiable; callers that only log it
    can wrap the call in torch.no_grad() to keep no graph.
    """
    _check_chunking(temperature, chunk_size)
    pieces = []
    for start in range(0, logits.shape[1], chunk_size):
        chunk = _scaled_chunk(logits, start, start + chunk_size, temperature)  # (batch, chunk, vocab)
        log_probs = torch.log_softmax(chunk, dim=-1)
        pieces.append(-(log_probs.exp() * log_probs).sum(dim=-1))  # (batch, chunk)
    if not pieces:
        return logits.new_zeros(logits.shape[:2], dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(pieces, dim=1)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ values·mask (over `dim`, or over everything when dim is None).

    Positions where mask == 0 contribute exactly 0 even if they hold inf or NaN (padding
    positions often hold garbage), and pass no gradient.
    """
    mask = mask.to(values.dtype)
    kept = values.masked_fill(mask == 0, 0.0) * mask
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ values·mask / Σ mask (over `dim`, or over everything). An empty mask gives 0, not NaN."""
    total = masked_sum(values, mask, dim)
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    # An all-padding row has sum 0; dividing by a tiny positive count keeps it at 0.
    return total / count.clamp(min=torch.finfo(values.dtype).tiny)
