"""Forward passes that turn a collated batch into completion log-probs (shared by every algorithm)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from prefalign.losses import token_logprobs
from prefalign.models.loading import model_device

# Up to this many keys, attention under CPU bf16 autocast runs faster in float32: torch's bf16 CPU attention
# kernel has a high fixed cost, its backward above all (torch 2.13, AVX512-BF16 CPU, forward + backward: fp32
# 1.9x faster at 64 keys, 1.3-1.6x at 128 with head size 64 or 128; from about 192 keys bf16 catches up,
# and wins on longer sequences).
FLOAT32_ATTENTION_MAX_KEYS = 128


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
        # Summed in at least float32: a bf16 sum of ones stops counting exactly at 256 (257 -> 256).
        return self.mask.sum(-1, dtype=torch.promote_types(self.mask.dtype, torch.float32))


def completion_logps(
    model, batch: dict[str, torch.Tensor], *, temperature: float = 1.0, keep_logits: bool = False,
) -> CompletionLogps:
    """Log-probs of the completion tokens of a right-padded batch (input_ids, attention_mask,
    completion_mask).

    Only positions from the earliest completion start onward go through the output head
    (`logits_to_keep`): prompt positions are never scored, and the head is the widest matmul.
    """
    input_ids = batch["input_ids"]  # (batch, seq_len)
    completion_mask = batch["completion_mask"]
    seq_len = input_ids.shape[1]
    first_completion = int(completion_mask.float().argmax(dim=1).min())
    # The logit at position t scores token t+1, so one position before the first completion token.
    keep = seq_len - max(first_completion - 1, 0)
    logits = model(
        input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep,
    ).logits
    logits = logits[:, :-1]  # (batch, keep - 1, vocab)
    targets = input_ids[:, seq_len - keep + 1:]
    mask = completion_mask[:, seq_len - keep + 1:].to(
        logits.dtype if logits.is_floating_point() else torch.float32
    )
    token_logps = token_logprobs(logits, targets, temperature=temperature) * mask
    return CompletionLogps(token_logps=token_logps, mask=mask, logits=logits if keep_logits else None)


class _ShortAttentionInFloat32(TorchFunctionMode):
    """Runs `scaled_dot_product_attention` in float32 outside autocast when it has at most
    FLOAT32_ATTENTION_MAX_KEYS keys; every other call passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        key = args[1] if len(args) > 1 else kwargs.get("key")  # (batch, heads, keys, head_dim)
        if key is None or key.shape[-2] > FLOAT32_ATTENTION_MAX_KEYS:
            return func(*args, **kwargs)

        def upcast(value):  # query, key, value and a float (additive) mask; a boolean mask stays as it is
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch.autocast(key.device.type, enabled=False):
            return func(
                *[upcast(value) for value in args], **{name: upcast(value) for name, value in kwargs.items()},
            )


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux): bf16 matmuls run natively, several times faster than
    fp32; elsewhere bf16 is emulated and far slower, so the answer is no when the flags cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


MIN_AUTOCAST_WIDTH = 256  # below this, casting costs more than bf16 matmuls save on a CPU (measured)


def use_bf16_autocast(choice: str, device: torch.device, hidden_size: int | None = None) -> bool:
    """auto: on CUDA with bf16; on a CPU with native bf16 for models at least MIN_AUTOCAST_WIDTH wide (on an
    AVX512-BF16 EPYC a width-384 encoder step ran 2.3x faster in bf16, a width-128 Llama step 1.2x slower).
    hidden_size None = no width rule (DPO passes none, as it always has).
    `choice` is a command's mixed_precision option: auto, bf16, or no / off."""
    if choice in ("no", "off"):
        return False
    if choice == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    wide_enough = hidden_size is None or hidden_size >= MIN_AUTOCAST_WIDTH
    return device.type == "cpu" and wide_enough and cpu_has_native_bf16()


@contextlib.contextmanager
def mixed_precision(device: torch.device, bf16: bool, *, float32_attention: bool = True):
    """bf16 autocast of a forward pass when `bf16` (weights stay in their dtype); on CPU, short attention
    (at most FLOAT32_ATTENTION_MAX_KEYS keys) stays in float32, which is faster there and more exact.
    Pass float32_attention=False under gradient checkpointing: its recomputation in the backward pass runs
    outside this context, and must see the same dtypes as the forward."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if bf16 and float32_attention and device.type == "cpu":
            with _ShortAttentionInFloat32():
                yield
        else:
            yield


def activation_checkpointing(model) -> bool:
    """Whether gradient checkpointing is on in any layer (transformers marks such layers)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens in a batch, for tokens_per_second."""
    return int(batch["attention_mask"].sum())


def grouped_completion_logps(
    model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, *,
    temperature: float = 1.0, keep_logits: bool = False
) -> CompletionLogps:
    """`completion_logps` for rows that share prompts (GRPO's G samples, DPO's chosen/rejected): each distinct
    prompt goes through the model once, and its KV cache (with its autograd graph) is repeated for its rows.

    Same values and gradients as one forward over every prompt + completion, with the prompt tokens computed
    once per distinct prompt instead of once per row. Needs the model's KV cache, so not with gradient
    checkpointing (transformers turns the cache off there); use completion_logps then.
    Returns token_logps / mask of shape (rows, longest completion): row i's tokens in columns [0, |y_i|).
    """
    from transformers import DynamicCache

    from prefalign.data import pad_sequences
    from prefalign.rollout.kv_cache import cache_keyword

    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(ids), len(distinct)) for ids in prompt_ids]  # row -> its prompt
    device = model_device(model)
    prompts = [list(ids) for ids in distinct]
    # Left-padded prompts end at the same column, so the cache lines up with the completions that follow.
    prompt_input = pad_sequences(prompts, pad_token_id, padding_side="left").to(device)  # (prompts, P)
    prompt_mask = pad_sequences([[1] * len(ids) for ids in prompts], 0, padding_side="left").to(device)
    cache = DynamicCache(config=model.config)
    cache_argument = {cache_keyword(model): cache}
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # positions count real tokens only
    # (prompts, vocab)
    last_logits = model(
        input_ids=prompt_input, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
        logits_to_keep=1, **cache_argument,
    ).logits[:, -1]
    rows = torch.tensor(owner, device=device)
    cache.batch_select_indices(rows)  # (rows, ...): indexing keeps the graph back to the shared prompt pass
    completions = pad_sequences([list(ids) for ids in completion_ids], pad_token_id).to(device)  # (rows, C)
    completion_mask = pad_sequences([[1] * len(ids) for ids in completion_ids], 0).to(device)
    completion_positions = (
        prompt_mask.sum(dim=1)[rows].unsqueeze(1) + torch.arange(completions.shape[1], device=device)
    )
    attention_mask = torch.cat([prompt_mask[rows], completion_mask], dim=1)  # (rows, P + C)
    logits = model(
        input_ids=completions, attention_mask=attention_mask, position_ids=completion_positions,
        use_cache=True, **cache_argument,
    ).logits
    # The prompt's last logit scores the first completion token; completion logit t scores token t + 1.
    scoring = torch.cat([last_logits[rows].unsqueeze(1), logits[:, :-1]], dim=1)  # (rows, C, vocab)
    mask = completion_mask.to(scoring.dtype)
    token_logps = token_logprobs(scoring, completions, temperature=temperature) * mask
    return CompletionLogps(token_logps=token_logps, mask=mask, logits=scoring if keep_logits else None)
