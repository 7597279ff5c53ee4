"""Evaluate a policy on tokenized prompts: greedy accuracy and mean reward, pass@k, KL to a reference."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from prefalign.data import collate_sft
from prefalign.models.forward import completion_logps
from prefalign.models.loading import model_device
from prefalign.models.reference import Reference
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import as_completion
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from prefalign.runtime import distributed
from prefalign.runtime.setup import to_device


def evaluate_policy(
    model,
    tokenizer,
    prompts,
    rewards: WeightedRewards,
    *,
    k: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 16,
    success_threshold: float = 1.0,
    reference=None,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of `model` on tokenized prompt rows (`prompt_ids`, `prompt`, extra columns).

    accuracy: share of prompts whose greedy completion scores >= success_threshold; pass@k: share with at
    least one of k samples doing so; kl (with a `reference`: a model, or a training run's `Reference`): mean
    over samples of Σ_t (log π − log π_ref) (k1, per sequence), on the k samples, or on one sample per prompt
    when k = 0. Under FSDP every forward runs on the policy's whole weights, gathered once.
    """
    with distributed.full_weights(model) as whole:
        return _evaluate(
            whole, tokenizer, prompts, rewards, k=k, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, success_threshold=success_threshold, reference=reference,
            batch_size=batch_size, seed=seed,
        )  # fmt: skip


def _evaluate(
    model, tokenizer, prompts, rewards, *, k, temperature, top_p, max_new_tokens, success_threshold,
    reference, batch_size, seed,
) -> dict[str, float]:
    engine = distributed.ShardedEngine(LocalEngine(model, tokenizer, batch_size=batch_size))
    prompt_ids = [list(ids) for ids in prompts["prompt_ids"]]
    columns = {name: prompts[name] for name in prompts.column_names if name not in ("prompt", "prompt_ids")}
    raw_prompts = prompts["prompt"]
    greedy = engine.generate(prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    # Completions reach the reward functions as sampling and GRPO give them: an assistant turn for a
    # conversational prompt, with the sampled token ids as `completion_ids`.
    greedy_completions = [
        as_completion(prompt, samples[0].text) for prompt, samples in zip(raw_prompts, greedy, strict=True)
    ]
    greedy_ids = [list(samples[0].token_ids) for samples in greedy]
    greedy_rewards, _, failures = rewards(
        raw_prompts, greedy_completions, completion_ids=greedy_ids, **columns,
    )
    scored = [r for r in greedy_rewards if r is not None]
    metrics = {
        "num_prompts": len(prompt_ids),
        "accuracy": sum(r >= success_threshold for r in scored) / max(len(prompt_ids), 1),
        "mean_reward": sum(scored) / max(len(scored), 1),
        "mean_length": sum(len(s[0].token_ids) for s in greedy) / max(len(greedy), 1),
        "reward_failures": len(failures),
    }
    if k > 0:
        sampled = engine.generate(
            prompt_ids,
            SamplingParams(
                n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
            ),
        )
        flat_completions = [
            as_completion(prompt, sample.text)
            for prompt, samples in zip(raw_prompts, sampled, strict=True)
            for sample in samples
        ]
        flat_ids = [list(sample.token_ids) for samples in sampled for sample in samples]
        repeat = lambda values: [v for v in values for _ in range(k)]  # noqa: E731
        sample_rewards, _, _ = rewards(
            repeat(raw_prompts), flat_completions, completion_ids=flat_ids,
            **{n: repeat(v) for n, v in columns.items()},
        )
        solved = [
            any(r is not None and r >= success_threshold for r in sample_rewards[i * k:(i + 1) * k])
            for i in range(len(prompt_ids))
        ]
        metrics[f"pass@{k}"] = sum(solved) / max(len(solved), 1)
        metrics["sample_mean_reward"] = sum(r for r in sample_rewards if r is not None) / max(
            sum(r is not None for r in sample_rewards), 1,
        )
    if reference is not None:
        if k == 0:  # no pass@k samples to reuse: one sample per prompt for the KL
            params = SamplingParams(
                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
            )
            sampled = engine.generate(prompt_ids, params)
        metrics["kl"] = sequence_kl(
            reference, prompt_ids, sampled, tokenizer.pad_token_id, temperature, batch_size, policy=model,
        )
    return metrics


@torch.no_grad()
def sequence_kl(
    reference, prompt_ids, sampled, pad_token_id: int, temperature: float, batch_size: int, *, policy=None,
) -> float:
    """Mean over samples of Σ_t log π(y_t) − log π_ref(y_t): the k1 estimate of KL(π‖π_ref) per sequence.
    `reference` is a model or a `Reference` (a LoRA policy's adapters are off only for its forward; `policy`
    is the policy's whole-weights stand-in when the reference is the policy itself)."""
    rows = [
        {"prompt_ids": prompt_ids[i], "completion_ids": sample.token_ids, "policy": sum(sample.logprobs)}
        for i, samples in enumerate(sampled)
        for sample in samples
        if sample.token_ids
    ]
    total = 0.0
    network = (
        reference.network(policy) if isinstance(reference, Reference) else contextlib.nullcontext(reference)
    )
    with network as reference_model:
        was_training = reference_model.training
        reference_model.eval()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = to_device(collate_sft(chunk, pad_token_id), model_device(reference_model))
            scored = completion_logps(reference_model, batch, temperature=temperature or 1.0)
            total += sum(row["policy"] for row in chunk) - float(scored.sums.sum())
        reference_model.train(was_training)
    return total / max(len(rows), 1)


def format_table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(
        f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
        for key, value in metrics.items()
    )
