"""Evaluate a policy on a prompt set: greedy accuracy and mean reward, pass@k, KL to a reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.config import DataConfig, ModelConfig, option
from prefalign.data import collate_sft, tokenize_prompts
from prefalign.generation import LocalEngine, SamplingParams
from prefalign.models import load_causal_lm, model_device, resolve_model_path
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import as_completion
from prefalign.train.common import resolve_rows
from prefalign.train.forward import completion_logps
from prefalign.train.runtime import seed_everything, set_threads, to_device


@dataclass
class EvalConfig:
    model: ModelConfig = option(help="The policy to evaluate.", factory=ModelConfig)
    data: DataConfig = option(help="Prompt-only rows (extra columns go to reward functions); builtin = held-out task prompts.", factory=lambda: DataConfig(max_length=256))
    reward_functions: list[str] = option(help="Reward functions by name or 'module:function'.", factory=lambda: ["exact_match"])
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    success_threshold: float = option(1.0, "A completion counts as correct when its reward is at least this.")
    k: int = option(8, "Samples per prompt for pass@k (0 = skip sampling).")
    temperature: float = option(1.0, "Sampling temperature for pass@k and the KL estimate.")
    top_p: float = option(1.0, "Nucleus sampling for pass@k.")
    max_new_tokens: int = option(16, "Longest completion.")
    reference: str | None = option(None, "Reference model folder; when given, report KL(policy || reference) on the samples.")
    num_prompts: int | None = option(None, "Evaluate at most this many prompts.")
    batch_size: int = option(128, "Sequences generated together.")
    seed: int = option(0, "Sampling seed.")
    output_dir: str = option("runs/eval", "Where eval.json is written.")
    num_threads: int = option(0, "torch CPU threads (0 = default).")


def _builtin_prompts(split: str):
    from prefalign.tasks.arithmetic import prompt_dataset

    return prompt_dataset("held_out" if split == "train" else split)


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
    least one of k samples doing so; kl: mean over samples of Σ_t (log π − log π_ref) (k1, per sequence).
    """
    engine = LocalEngine(model, tokenizer, batch_size=batch_size)
    prompt_ids = [list(ids) for ids in prompts["prompt_ids"]]
    columns = {name: prompts[name] for name in prompts.column_names if name not in ("prompt", "prompt_ids")}
    raw_prompts = prompts["prompt"]
    greedy = engine.generate(prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    # Completions reach the reward functions as sampling and GRPO give them: an assistant turn for a
    # conversational prompt, with the sampled token ids as `completion_ids`.
    greedy_completions = [as_completion(prompt, samples[0].text) for prompt, samples in zip(raw_prompts, greedy, strict=True)]
    greedy_ids = [list(samples[0].token_ids) for samples in greedy]
    greedy_rewards, _, failures = rewards(raw_prompts, greedy_completions, completion_ids=greedy_ids, **columns)
    scored = [r for r in greedy_rewards if r is not None]
    metrics = {
        "num_prompts": len(prompt_ids),
        "accuracy": sum(r >= success_threshold for r in scored) / max(len(prompt_ids), 1),
        "mean_reward": sum(scored) / max(len(scored), 1),
        "mean_length": sum(len(s[0].token_ids) for s in greedy) / max(len(greedy), 1),
        "reward_failures": len(failures),
    }
    if k > 0:
        sampled = engine.generate(prompt_ids, SamplingParams(n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed))
        flat_completions = [as_completion(prompt, sample.text) for prompt, samples in zip(raw_prompts, sampled, strict=True) for sample in samples]
        flat_ids = [list(sample.token_ids) for samples in sampled for sample in samples]
        repeat = lambda values: [v for v in values for _ in range(k)]  # noqa: E731
        sample_rewards, _, _ = rewards(repeat(raw_prompts), flat_completions, completion_ids=flat_ids, **{n: repeat(v) for n, v in columns.items()})
        solved = [
            any(r is not None and r >= success_threshold for r in sample_rewards[i * k:(i + 1) * k])
            for i in range(len(prompt_ids))
        ]
        metrics[f"pass@{k}"] = sum(solved) / max(len(solved), 1)
        metrics["sample_mean_reward"] = sum(r for r in sample_rewards if r is not None) / max(sum(r is not None for r in sample_rewards), 1)
        if reference is not None:
            metrics["kl"] = sequence_kl(reference, prompt_ids, sampled, tokenizer.pad_token_id, temperature, batch_size)
    return metrics


@torch.no_grad()
def sequence_kl(reference, prompt_ids, sampled, pad_token_id: int, temperature: float, batch_size: int) -> float:
    """Mean over samples of Σ_t log π(y_t) − log π_ref(y_t): the k1 estimate of KL(π‖π_ref) per sequence."""
    rows = [
        {"prompt_ids": prompt_ids[i], "completion_ids": sample.token_ids, "policy": sum(sample.logprobs)}
        for i, samples in enumerate(sampled)
        for sample in samples
        if sample.token_ids
    ]
    total = 0.0
    was_training = reference.training
    reference.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = to_device(collate_sft(chunk, pad_token_id), model_device(reference))
        scored = completion_logps(reference, batch, temperature=temperature or 1.0)
        total += sum(row["policy"] for row in chunk) - float(scored.sums.sum())
    reference.train(was_training)
    return total / max(len(rows), 1)


def evaluate(config: EvalConfig, *, dataset=None, model=None, tokenizer=None, reference=None) -> dict[str, float]:
    """`prefalign eval`: print a table, write eval.json to the output folder, return the metrics."""
    set_threads(config.num_threads)
    seed_everything(config.seed)
    if model is None:
        model, tokenizer = load_causal_lm(config.model, trainable=False)
    if reference is None and config.reference:
        reference, _ = load_causal_lm(ModelConfig(name_or_path=resolve_model_path(config.reference), device=config.model.device, dtype=config.model.dtype), trainable=False)
    rows, _ = resolve_rows(config.data, builtin=_builtin_prompts, dataset=dataset)
    if config.num_prompts:
        rows = rows.select(range(min(len(rows), config.num_prompts)))
    prompts, _ = tokenize_prompts(rows, tokenizer, config.data)
    metrics = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(config.reward_functions, list(config.reward_weights)),
        k=config.k, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
        success_threshold=config.success_threshold, reference=reference, batch_size=config.batch_size, seed=config.seed,
    )
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"model": config.model.name_or_path, **metrics}, indent=2))
    print(format_table(metrics))
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}" for key, value in metrics.items())
