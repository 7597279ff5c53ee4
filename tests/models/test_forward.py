"""Forward passes to completion log-probs: they agree with the rollout engine's log-probs, the shared-prompt
forward equals the padded one (values and gradients), and mixed precision keeps short attention in float32."""

from __future__ import annotations

import pytest
import torch

from prefalign.data.collate import collate_sft
from prefalign.models.forward import (
    FLOAT32_ATTENTION_MAX_KEYS,
    completion_logps,
    cpu_has_native_bf16,
    grouped_completion_logps,
    mixed_precision,
    use_bf16_autocast,
)
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from tests.helpers import tiny_model, user

G = 4


def rollout_examples(num_prompts=3, seed=0):
    """A policy's sampled completions as training rows: prompts of different lengths, G completions each, cut
    to 3..6 tokens (a prefix keeps its log-probs), so both kinds of padding are exercised."""
    model, tokenizer = tiny_model(1)
    model.eval()
    rendered = tokenizer.apply_chat_template(
        [[user(f"{10 ** a}+5")] for a in range(num_prompts)], add_generation_prompt=True
    )
    rows = [list(ids) for ids in rendered["input_ids"]]
    params = SamplingParams(n=G, max_new_tokens=6, seed=seed, ignore_eos=True)
    groups = LocalEngine(model, tokenizer).generate(rows, params)
    examples = [
        {"prompt_ids": rows[i], "completion_ids": s.token_ids[: 3 + j], "old_logps": s.logprobs[: 3 + j]}
        for i, group in enumerate(groups)
        for j, s in enumerate(group)
    ]
    return model, tokenizer, examples


def per_row(token_logps, mask) -> list[torch.Tensor]:
    """Each row's completion-token values (the two forwards lay their columns out differently)."""
    return [values[row_mask.bool()] for values, row_mask in zip(token_logps, mask, strict=True)]


def test_engine_logprobs_line_up_with_the_training_forward():
    """The engine's log-probs (GRPO's log π_old) equal the training forward's: ρ starts at 1 when μ > 1."""
    model, tokenizer, examples = rollout_examples()
    with torch.no_grad():
        scored = completion_logps(model, collate_sft(examples, tokenizer.pad_token_id))
    rows = per_row(scored.token_logps, scored.mask)
    assert [len(row) for row in rows] == [len(e["completion_ids"]) for e in examples]
    for example, row in zip(examples, rows, strict=True):
        torch.testing.assert_close(row, torch.tensor(example["old_logps"]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(scored.token_logps * (1 - scored.mask)) == 0  # 0 off the completion tokens


def test_shared_prompt_forward_matches_the_full_forward():
    """Each prompt once, its cache shared by its G rows: the same log-probs and the same gradients."""
    model, tokenizer, examples = rollout_examples()
    prompt_ids = [e["prompt_ids"] for e in examples]
    completion_ids = [e["completion_ids"] for e in examples]
    batch = collate_sft(examples, tokenizer.pad_token_id)
    results = []
    for forward in (
        lambda: completion_logps(model, batch),
        lambda: grouped_completion_logps(model, prompt_ids, completion_ids, tokenizer.pad_token_id),
    ):
        model.zero_grad()
        scored = forward()
        rows = per_row(scored.token_logps, scored.mask)
        # Position-dependent weights, so a shifted column would show.
        weighted = sum((row * (1.0 + 0.1 * torch.arange(len(row)))).sum() for row in rows)
        weighted.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append(([row.tolist() for row in rows], gradient))
    (full_values, full_gradient), (shared_values, shared_gradient) = results
    assert [len(row) for row in shared_values] == [len(e["completion_ids"]) for e in examples]
    for full_row, shared_row in zip(full_values, shared_values, strict=True):
        assert shared_row == pytest.approx(full_row, abs=1e-5)
    assert full_gradient.abs().max() > 0
    torch.testing.assert_close(shared_gradient, full_gradient, atol=1e-5, rtol=1e-4)


def test_mixed_precision_keeps_short_attention_in_float32():
    seen = []

    def attention(query, key, value):
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        seen.append(output.dtype)
        return output

    short = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    long = torch.randn(1, 2, FLOAT32_ATTENTION_MAX_KEYS + 1, 16, dtype=torch.bfloat16)
    with mixed_precision(torch.device("cpu"), True):
        output = attention(short, short, short)
        attention(long, long, long)
        by_name = torch.nn.functional.scaled_dot_product_attention(
            query=short, key=short, value=short, attn_mask=torch.zeros(8, 8, dtype=torch.bfloat16)
        )
        assert by_name.dtype == torch.float32
        # autocast is on
        assert torch.nn.functional.linear(short.float(), torch.ones(4, 16)).dtype == torch.bfloat16
    with mixed_precision(torch.device("cpu"), False):
        attention(short.float(), short.float(), short.float())
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    output.sum().backward()  # gradients flow back through the upcast to the bf16 inputs
    assert short.grad is not None and short.grad.dtype == torch.bfloat16
    exact = torch.nn.functional.scaled_dot_product_attention(
        short.float(), short.float(), short.float(), is_causal=True
    )
    torch.testing.assert_close(output, exact)


def test_bf16_autocast_decision():
    cpu = torch.device("cpu")
    assert use_bf16_autocast("no", cpu, 4096) is False
    assert use_bf16_autocast("bf16", cpu, 32) is True
    assert use_bf16_autocast("auto", cpu, 128) is False  # small matmuls: casting costs more than it saves
    assert use_bf16_autocast("auto", cpu, 384) is cpu_has_native_bf16()


def test_completion_lengths_are_exact_under_bf16():
    """A bf16 sum of ones stops counting at 256 (257 -> 256): lengths are summed in float32, so SimPO's and
    length-normalised IPO's divisions see the true token counts."""
    from prefalign.tasks.model import TinyModelConfig, new_model
    from prefalign.tasks.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = new_model(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                      max_position_embeddings=512), tokenizer)  # fmt: skip
    rows = [{"prompt_ids": [5, 6], "completion_ids": [7] * length} for length in (257, 259, 3)]
    batch = collate_sft(rows, tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scored = completion_logps(model, batch)
        prompts, completions = [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows]
        grouped = grouped_completion_logps(model, prompts, completions, tokenizer.pad_token_id)
    for result in (scored, grouped):
        assert result.mask.dtype == torch.bfloat16  # the case that rounded
        assert result.lengths.tolist() == [257.0, 259.0, 3.0]
        assert result.lengths.dtype == torch.float32
