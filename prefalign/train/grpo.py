"""GRPO (Shao et al. 2024): G samples per prompt, each scored, advantages relative to the group, no critic.

One rollout batch: draw prompts, sample G completions of each with the rollout engine (its full-vocabulary
log-probs are log π_old), score them with reward functions and/or a reward model, turn rewards into group
advantages. Then `num_iterations` (μ) passes over the batch, split into `steps_per_generation` optimizer
steps. With μ = 1 and one step per rollout batch π_old = π detached, so ρ = 1 in value (not in gradient)
and the stored log-probs are not needed. Variants by name: loss_type grpo / dapo / dr_grpo (token
aggregation), importance_sampling_level sequence (GSPO), scale_rewards group / batch / none (Dr. GRPO),
clip-higher (epsilon_high), KL to the reference (beta, k1/k2/k3; beta = 0 loads no reference), DAPO's
dynamic sampling, truncated-completion masking and soft overlong penalty.

Batch sizes count completions, as in TRL: train.batch_size completions per forward/backward, and
train.batch_size × train.grad_accum per optimizer step, a multiple of num_generations.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from prefalign import losses
from prefalign.config import DataConfig, ModelConfig, TrainConfig, option, save_config
from prefalign.data import collate_sft, tokenize_prompts
from prefalign.errors import ConfigError, DataError, TrainingError
from prefalign.eval import evaluate_policy
from prefalign.generation import FINISH_LENGTH, LocalEngine, SamplingParams
from prefalign.models import (
    disable_dropout,
    is_peft_model,
    load_causal_lm,
    model_card,
    model_device,
    reference_mode,
    save_model,
)
from prefalign.rewards import WeightedRewards, describe_failures
from prefalign.rewards.functions import as_completion, build_scorers
from prefalign.train import runtime
from prefalign.train.common import log_stats, resolve_rows
from prefalign.train.forward import completion_logps, grouped_completion_logps

logger = logging.getLogger("prefalign")

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class GRPOConfig:
    model: ModelConfig = option(help="The policy to train (full or LoRA).", factory=ModelConfig)
    data: DataConfig = option(help="Prompt-only rows; extra columns (answer, ...) go to reward functions by name.", factory=lambda: DataConfig(max_length=1024))
    train: TrainConfig = option(help="Optimisation and run folder; batch sizes count completions.", factory=lambda: TrainConfig(learning_rate=1e-6, batch_size=64, schedule="constant"))
    reward_functions: list[str] = option(help="Reward functions by name (exact_match, math_answer, format, length_penalty, ...) or 'module:function'.", factory=lambda: ["exact_match"])
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(None, "A reward model folder (prefalign reward) whose score is added to the reward functions'.")
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    num_generations: int = option(8, "G: completions sampled per prompt (at least 2).")
    max_new_tokens: int = option(0, f"Longest completion in tokens (L_max); 0 = {DEFAULT_MAX_NEW_TOKENS}, or less where the model's context leaves less room after the longest prompt (the value used is logged and written to config.yaml).")
    temperature: float = option(1.0, "Sampling temperature; log-probs are scored at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling.")
    top_k: int = option(0, "Top-k sampling (0 = off).")
    generation_batch_size: int = option(0, "Sequences decoded together (0 = the whole rollout batch).")
    share_prompt: bool = option(True, "Training forward: run each prompt once and share its KV cache with its G completions (same values; off with gradient checkpointing).")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = option("dapo", "Token aggregation: grpo (per-sequence mean), dapo (token mean over the step), dr_grpo (token sum / (sequences × max_new_tokens)).")
    importance_sampling_level: Literal["token", "sequence"] = option("token", "token = GRPO's per-token ratio; sequence = GSPO's length-normalised sequence ratio.")
    scale_rewards: Literal["group", "batch", "none"] = option("group", "Advantage scaling: group std (GRPO, sample std, δ = 1e-4), batch std, or none (Dr. GRPO).")
    epsilon_low: float = option(0.2, "Lower clip range ε_low.")
    epsilon_high: float = option(0.2, "Upper clip range ε_high (DAPO's clip-higher: 0.28).")
    beta: float = option(0.0, "KL weight β; 0 loads no reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "Per-token KL estimator used in the loss.")
    num_iterations: int = option(1, "μ: optimisation passes over each rollout batch.")
    steps_per_generation: int = option(1, "Optimizer steps each rollout batch is split into.")
    dynamic_sampling: bool = option(False, "DAPO: drop groups with all-equal rewards and sample more prompts until the batch is full.")
    max_sampling_rounds: int = option(4, "Dynamic sampling: most generation rounds per rollout batch; then train on what there is (logged).")
    mask_truncated_completions: bool = option(False, "Exclude completions cut at max_new_tokens from the loss.")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty: L_cache tokens before max_new_tokens where the reward falls to −1 (0 = off).")
    max_time: float = option(0.0, "Stop after this many seconds of training, at a rollout boundary (0 = no limit).")
    eval_k: int = option(0, "Samples per eval prompt for pass@k (0 = greedy accuracy only).")
    log_completions_every: int = option(10, "Write a sample of completions to completions.jsonl every N optimizer steps (0 = never).")
    num_completions_to_log: int = option(16, "Completions written each time.")


def _builtin_prompts(split: str):
    from prefalign.tasks.arithmetic import prompt_dataset

    return prompt_dataset(split)


# ----------------------------------------------------------------------------- set-up


def check_config(config: GRPOConfig) -> None:
    per_step, group = config.train.batch_size * config.train.grad_accum, config.num_generations
    if group < 2:
        raise ConfigError(f"num_generations (G) must be at least 2 for group-relative advantages, got {group}")
    if per_step % group:
        raise ConfigError(
            f"train.batch_size × train.grad_accum = {per_step} completions per optimizer step is not a multiple of "
            f"num_generations = {group}; change one of them (e.g. train.batch_size {group * max(1, per_step // group)})"
        )
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0 for GRPO sampling, got {config.temperature}")
    if not (0 <= config.epsilon_low < 1 and config.epsilon_high >= 0):
        raise ConfigError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {config.epsilon_low}, {config.epsilon_high}")
    for key in ("num_iterations", "steps_per_generation", "max_sampling_rounds"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be at least 1 (or 0 = fit the model's context), got {config.max_new_tokens}")
    # With max_new_tokens = 0 the upper bound is known only once it is fitted to the context (load_prompts).
    if config.overlong_buffer < 0 or (config.max_new_tokens and config.overlong_buffer > config.max_new_tokens):
        raise ConfigError(f"overlong_buffer must be in [0, max_new_tokens], got {config.overlong_buffer} (max_new_tokens {config.max_new_tokens})")
    if config.beta < 0:
        raise ConfigError(f"beta must be >= 0, got {config.beta}")
    if config.beta > 0 and config.kl_estimator == "k1":
        # k1 = log π − log π_ref has expected gradient zero under on-policy samples: as a loss term it does not
        # pull the policy toward the reference (its value is still a fine KL metric).
        logger.warning("grpo: kl_estimator=k1 as a loss term has zero expected gradient; use k3 (default) or k2 to regularise toward the reference")


def build_rewards(config: GRPOConfig) -> WeightedRewards:
    return build_scorers(
        config.reward_functions, config.reward_weights, reward_model=config.reward_model,
        reward_model_weight=config.reward_model_weight, device=config.model.device, needed_by="GRPO",
    )


def reference_scorer(config: GRPOConfig, model, reference):
    """batch -> reference log-probs, or None when beta = 0 (no reference is loaded at all)."""
    if not config.beta:
        return None
    if reference is None and is_peft_model(model):

        def adapters_off(batch):  # the LoRA policy's base weights are the reference: no second copy
            with reference_mode(model):
                return score_completions(model, batch, config)

        return adapters_off
    if reference is None:
        # The policy before its first update is the reference: a frozen copy costs no second load.
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda batch: score_completions(reference, batch, config)


def load_prompts(config: GRPOConfig, tokenizer, model, dataset, eval_dataset, run_dir: Path):
    """Tokenized training prompts (a list of rows) and eval prompts (a Dataset or None)."""
    train_rows, eval_rows = resolve_rows(config.data, builtin=_builtin_prompts, dataset=dataset, eval_dataset=eval_dataset)
    context = getattr(model.config, "max_position_embeddings", None)
    train, stats = tokenize_prompts(train_rows, tokenizer, config.data)
    data_stats = {"train": log_stats("train", stats)}
    if not config.max_new_tokens:
        config.max_new_tokens = default_max_new_tokens(train, context)
        logger.info("grpo: max_new_tokens = %d (the model's context is %s tokens)", config.max_new_tokens, context)
        save_config(config, run_dir / "config.yaml")
        if config.overlong_buffer > config.max_new_tokens:  # check_config could not bound it before the fit
            raise ConfigError(
                f"overlong_buffer {config.overlong_buffer} is longer than max_new_tokens {config.max_new_tokens} (fitted to the "
                f"model's context of {context} tokens); lower overlong_buffer or set max_new_tokens"
            )
    train, data_stats["train"]["dropped_context"] = fit_context(train, context, config, "train")
    evaluation = None
    if eval_rows is not None:
        evaluation, eval_stats = tokenize_prompts(eval_rows, tokenizer, config.data)
        data_stats["eval"] = log_stats("eval", eval_stats)
        evaluation, data_stats["eval"]["dropped_context"] = fit_context(evaluation, context, config, "eval")
    (run_dir / "data_stats.json").write_text(json.dumps(data_stats, indent=2))
    return train.to_list(), evaluation


def default_max_new_tokens(prompts, context: int | None) -> int:
    """DEFAULT_MAX_NEW_TOKENS, or what the context leaves after the longest prompt if that is less (and > 0)."""
    room = context - max(map(len, prompts["prompt_ids"]), default=0) if context else DEFAULT_MAX_NEW_TOKENS
    return min(DEFAULT_MAX_NEW_TOKENS, room) if room > 0 else DEFAULT_MAX_NEW_TOKENS


def fit_context(prompts, context: int | None, config: GRPOConfig, name: str):
    """Drop (counted) or reject prompts that leave no room for max_new_tokens in the model's context."""
    new = config.max_new_tokens
    too_long = [i for i, ids in enumerate(prompts["prompt_ids"]) if context and len(ids) + new > context]
    if too_long and (config.data.too_long_prompt == "error" or len(too_long) == len(prompts)):
        first = too_long[0]
        raise DataError(
            f"{name} prompt {first} is {len(prompts[first]['prompt_ids'])} tokens; with max_new_tokens={new} it "
            f"exceeds the model's context of {context} ({len(too_long)} of {len(prompts)} prompts do). Lower "
            "max_new_tokens, set data.max_prompt_length to cut prompts from the left, or set data.too_long_prompt=drop."
        )
    if too_long:
        logger.warning("%s data: %d prompts dropped: prompt + max_new_tokens > context %d", name, len(too_long), context)
        dropped = set(too_long)
        prompts = prompts.select([i for i in range(len(prompts)) if i not in dropped])
    return prompts, len(too_long)


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Scored, kept groups ready for optimisation, and what to log about them."""

    examples: list[dict[str, Any]] = field(default_factory=list)  # one per completion, groups contiguous
    metrics: dict[str, float] = field(default_factory=dict)
    logged: list[dict[str, Any]] = field(default_factory=list)
    generation_time: float = 0.0


def sample_groups(engine, rows, row_ids, rewards: WeightedRewards, config: GRPOConfig, seed: int):
    """Generate G completions per row and score them.

    Returns samples (per row, G each), scores (rows, G) with NaN where a sample has no score (a reward
    failed or every function returned None), per-function scores and the failures.
    """
    group = config.num_generations
    params = SamplingParams(n=group, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, max_new_tokens=config.max_new_tokens, seed=seed)
    samples = engine.generate([row["prompt_ids"] for row in rows], params)
    owners = [row for row in rows for _ in range(group)]
    flat = [sample for samples_of_row in samples for sample in samples_of_row]
    # TRL's convention: conversational prompts get their completion as an assistant message.
    completions = [as_completion(o["prompt"], s.text) for s, o in zip(flat, owners, strict=True)]
    columns = {name: [o[name] for o in owners] for name in rows[0] if name not in ("prompt", "prompt_ids")}
    total, per_function, failures = rewards([o["prompt"] for o in owners], completions, completion_ids=[s.token_ids for s in flat], **columns)
    for failure in failures:  # flat position -> (training row, sample), so the message points at the data
        row, failure.sample_index = divmod(failure.prompt_index, group)
        failure.prompt_index = row_ids[row]
    scores = torch.tensor([math.nan if value is None else value for value in total]).view(len(rows), group)
    if config.overlong_buffer:
        lengths = torch.tensor([len(s.token_ids) for s in flat], dtype=torch.float32).view(len(rows), group)
        scores = scores + losses.overlong_penalty(lengths, config.max_new_tokens, config.overlong_buffer)
    return samples, scores, per_function, failures


def collect_rollout(engine, prompts, stream, rewards, config: GRPOConfig, progress: dict[str, int]) -> Rollout:
    """Sample and score groups until the rollout batch is full (one round without dynamic sampling)."""
    started = time.perf_counter()
    wanted = config.train.batch_size * config.train.grad_accum // config.num_generations * config.steps_per_generation
    kept: list[tuple[dict, list, torch.Tensor]] = []
    all_scores, all_samples, per_function, failures = [], [], {}, []
    rounds = 0
    while rounds < config.max_sampling_rounds and len(kept) < wanted:
        row_ids = [next(stream) for _ in range(wanted)]
        rows = [prompts[i] for i in row_ids]
        # Seeds follow the count of generation calls, so a resumed run samples what the whole run would.
        seed = config.train.seed * 1_000_003 + progress["generation_calls"]
        progress["position"] += wanted
        progress["generation_calls"] += 1
        rounds += 1
        samples, scores, scored, failed = sample_groups(engine, rows, row_ids, rewards, config, seed)
        failures += failed
        for name, values in scored.items():
            per_function.setdefault(name, []).extend(v for v in values if v is not None)
        all_scores.append(scores)
        all_samples += [s for samples_of_row in samples for s in samples_of_row]
        usable = ~torch.isnan(scores).any(dim=1)  # a group with an unscored sample is dropped (counted)
        if config.dynamic_sampling:
            usable &= ~losses.zero_std_groups(torch.nan_to_num(scores), config.num_generations)
        kept += [item for item, use in zip(zip(rows, samples, scores, strict=True), usable.tolist(), strict=True) if use]
        if not config.dynamic_sampling:
            break
    if failures:
        logger.warning("%s", describe_failures(failures))
    if not kept:
        unscored = bool(torch.isnan(torch.cat(all_scores)).any())
        reason = describe_failures(failures) if failures else "a sample with no score (every reward function returned None) in every group" if unscored else "every group had all-equal rewards"
        raise TrainingError(f"no usable group in the rollout batch before optimizer step {progress['step'] + 1} ({rounds} sampling round(s)): {reason}")
    if config.dynamic_sampling and len(kept) < wanted:
        logger.warning("dynamic sampling: %d of %d groups after %d rounds (max_sampling_rounds); training on those", len(kept), wanted, rounds)
    kept = kept[:wanted]
    rollout = Rollout(generation_time=time.perf_counter() - started)
    rollout.metrics = rollout_metrics(torch.cat(all_scores), all_samples, per_function, failures, config)
    if config.dynamic_sampling:
        rollout.metrics.update({"dynamic_sampling/rounds": rounds, "dynamic_sampling/short_batch": float(len(kept) < wanted)})
    rollout.metrics["groups_trained"] = len(kept)
    build_examples(rollout, kept, config)
    return rollout


def rollout_metrics(scores, samples, per_function, failures, config: GRPOConfig) -> dict[str, float]:
    """Reward and completion statistics over every sampled completion (TRL's names)."""
    scored = scores[~torch.isnan(scores).any(dim=1)]  # (scored groups, G)
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    has_scores = scored.numel() > 0
    metrics = {
        "reward": scored.mean().item() if has_scores else math.nan,
        "reward_std": scored.std(dim=1).mean().item() if has_scores else math.nan,  # mean within-group std
        "frac_reward_zero_std": losses.zero_std_groups(scored, config.num_generations).float().mean().item() if has_scores else math.nan,
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(s.finish_reason == FINISH_LENGTH for s in samples) / len(samples),
        "rewards/failed_samples": len(failures),
        "rewards/dropped_groups": int(torch.isnan(scores).any(dim=1).sum()),
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = sum(values) / len(values) if values else math.nan
    return metrics


def build_examples(rollout: Rollout, kept, config: GRPOConfig) -> None:
    """One training example per completion, with its group advantage and log π_old."""
    scores = torch.stack([score for _, _, score in kept])  # (groups, G)
    advantages = losses.group_advantages(scores, config.num_generations, scale=config.scale_rewards)
    for (row, samples, score), group_advantages in zip(kept, advantages, strict=True):
        for sample, reward, advantage in zip(samples, score.tolist(), group_advantages.tolist(), strict=True):
            truncated = sample.finish_reason == FINISH_LENGTH
            rollout.examples.append({
                "prompt_ids": row["prompt_ids"], "completion_ids": sample.token_ids, "old_logps": sample.logprobs,
                "advantage": advantage, "trained": not (truncated and config.mask_truncated_completions),
            })  # fmt: skip
            if len(rollout.logged) < config.num_completions_to_log:
                rollout.logged.append({
                    "prompt": row["prompt"], "completion": sample.text, "reward": reward, "advantage": advantage,
                    "finish_reason": sample.finish_reason, "tokens": len(sample.token_ids),
                })  # fmt: skip


# ----------------------------------------------------------------------------- optimisation


def collate_rollout(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    batch = collate_sft(examples, pad_token_id)  # input_ids, attention_mask, completion_mask: (B, L)
    batch.update(pad_token_id=pad_token_id, prompt_ids=[e["prompt_ids"] for e in examples], completion_ids=[e["completion_ids"] for e in examples])
    batch["advantages"] = torch.tensor([e["advantage"] for e in examples], dtype=torch.float32)  # (B,)
    batch["trained"] = torch.tensor([float(e["trained"]) for e in examples])  # (B,)
    batch["old_logps"] = [e["old_logps"] for e in examples]  # per row: one value per completion token
    batch["ref_logps"] = [e.get("ref_logps") for e in examples]
    return batch


def aligned(per_row: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values laid out like `mask` (batch, T): row i's values fill its 1s in order."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[mask.bool()] = torch.tensor([value for row in per_row for value in row], dtype=torch.float32, device=mask.device)
    return out


@torch.no_grad()
def add_reference_logps(score_reference, examples, config: GRPOConfig, pad_token_id: int, device: torch.device) -> None:
    """log π_ref of every completion token, once per rollout batch (the reference is frozen)."""
    for start in range(0, len(examples), config.train.batch_size):
        chunk = examples[start : start + config.train.batch_size]
        scored = score_reference(runtime.to_device(collate_rollout(chunk, pad_token_id), device))
        for example, values, row_mask in zip(chunk, scored.token_logps, scored.mask, strict=True):
            example["ref_logps"] = values[row_mask.bool()].tolist()


def score_completions(model, batch, config: GRPOConfig, keep_logits: bool = False):
    """Completion log-probs at the sampling temperature: CompletionLogps with (batch, T) token_logps and mask."""
    if config.share_prompt and not config.model.gradient_checkpointing:
        return grouped_completion_logps(model, batch["prompt_ids"], batch["completion_ids"], batch["pad_token_id"], temperature=config.temperature, keep_logits=keep_logits)
    return completion_logps(model, batch, temperature=config.temperature, keep_logits=keep_logits)


def policy_loss(model, batch, totals: dict[str, int], config: GRPOConfig, use_rollout_logps: bool):
    """This micro-batch's share of the optimizer-step loss, its metrics (token means) and trained tokens."""
    scored = score_completions(model, batch, config, keep_logits=True)
    logps = scored.token_logps  # (batch, T)
    mask = scored.mask * batch["trained"].unsqueeze(1)  # (batch, T): trained completion tokens
    old_logps = aligned(batch["old_logps"], scored.mask) if use_rollout_logps else logps.detach()
    kl = losses.kl_estimate(logps, aligned(batch["ref_logps"], scored.mask), config.kl_estimator) if config.beta else None
    clip = {"eps_low": config.epsilon_low, "eps_high": config.epsilon_high}
    if config.importance_sampling_level == "sequence":
        loss, metrics = losses.gspo_loss(logps, old_logps, batch["advantages"], mask, num_sequences=totals["sequences"], **clip)
        if kl is not None:  # GSPO has no token aggregation: the KL term is averaged per sequence, as in `grpo`
            loss = loss + config.beta * losses.masked_mean(kl, mask, dim=1).sum() / totals["sequences"]
            metrics["kl"] = losses.masked_mean(kl.detach(), mask).item()
    else:
        loss, metrics = losses.clipped_surrogate(
            logps, old_logps, batch["advantages"], mask, aggregation=config.loss_type, max_new_tokens=config.max_new_tokens,
            num_sequences=totals["sequences"], num_tokens=totals["tokens"], kl=kl, beta=config.beta, **clip,
        )  # fmt: skip
    with torch.no_grad():
        metrics["entropy"] = losses.masked_mean(losses.token_entropy(scored.logits, temperature=config.temperature), mask).item()
    return loss, metrics, float(mask.sum())


def optimizer_step(model, optimizer, scheduler, examples, config: GRPOConfig, pad_token_id: int, use_rollout_logps: bool) -> dict[str, float]:
    """Accumulate over micro-batches of train.batch_size completions, clip, step. Normalisers span the step."""
    size = config.train.batch_size
    device = model_device(model)
    batches = [runtime.to_device(collate_rollout(examples[i : i + size], pad_token_id), device) for i in range(0, len(examples), size)]
    trained = [torch.tensor([len(ids) for ids in b["completion_ids"]], device=device) * b["trained"] for b in batches]  # per row: trained tokens
    totals = {"tokens": int(sum(t.sum() for t in trained)), "sequences": max(1, int(sum((t > 0).sum() for t in trained)))}
    sums: dict[str, float] = {"loss": 0.0}
    for batch in batches:
        loss, metrics, tokens = policy_loss(model, batch, totals, config, use_rollout_logps)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss is {loss.item()}")
        loss.backward()
        sums["loss"] += loss.item()
        for key, value in metrics.items():  # micro-batch token means -> the step's token mean
            sums[key] = sums.get(key, 0.0) + value * tokens / max(totals["tokens"], 1)
    sums["grad_norm"] = runtime.clip_and_step(model, optimizer, scheduler, config.train.max_grad_norm)
    sums["learning_rate"] = scheduler.get_last_lr()[0]
    sums["tokens"] = float(sum(int(b["attention_mask"].sum()) for b in batches))
    return sums


def optimise_rollout(model, optimizer, scheduler, rollout: Rollout, config: GRPOConfig, pad_token_id: int, steps_left: int) -> list[dict[str, float]]:
    """μ passes over the rollout batch, each split into steps_per_generation optimizer steps of whole groups."""
    group = config.num_generations
    num_groups = len(rollout.examples) // group
    parts = min(config.steps_per_generation, num_groups)
    bounds = [round(i * num_groups / parts) * group for i in range(parts + 1)]
    # Only when the batch feeds more than one step does π drift from the sampler: then ρ needs log π_old.
    use_rollout_logps = config.num_iterations > 1 or parts > 1
    results = []
    for _ in range(config.num_iterations):
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            if len(results) == steps_left:
                return results
            started = time.perf_counter()
            metrics = optimizer_step(model, optimizer, scheduler, rollout.examples[start:stop], config, pad_token_id, use_rollout_logps)
            metrics["train_time"] = time.perf_counter() - started
            results.append(metrics)
    return results


# ----------------------------------------------------------------------------- the loop


def grpo(config: GRPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None, save: bool = True) -> runtime.TrainResult:
    """Run GRPO as configured; returns the training result (the policy is saved to <run>/final)."""
    check_config(config)
    runtime.set_threads(config.train.num_threads)
    runtime.seed_everything(config.train.seed)
    run_dir = runtime.prepare_run_dir(config, "grpo")
    if model is None:
        model, tokenizer = load_causal_lm(config.model)
    disable_dropout(model)  # the engine samples in eval mode: π_old and π must be the same function at μ's first pass
    score_reference = reference_scorer(config, model, reference)
    rewards = build_rewards(config)
    prompts, eval_prompts = load_prompts(config, tokenizer, model, dataset, eval_dataset, run_dir)
    prompts_per_step = config.train.batch_size * config.train.grad_accum // config.num_generations
    # An epoch is one pass over the prompts; each prompt's rollout is optimised μ times (as in TRL).
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(prompts) / prompts_per_step) * config.num_iterations)
    optimizer = runtime.build_optimizer(model, config.train)
    scheduler = runtime.build_scheduler(optimizer, config.train, total_steps)
    progress = resume_state(config, run_dir, model, optimizer, scheduler)
    engine = LocalEngine(model, tokenizer, batch_size=config.generation_batch_size or prompts_per_step * config.steps_per_generation * config.num_generations)
    stream = runtime.example_stream(len(prompts), config.train.seed, start=progress["position"])

    def evaluate() -> dict[str, float]:
        found = evaluate_policy(model, tokenizer, eval_prompts, rewards, k=config.eval_k, temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.train.seed)
        return {f"eval/{key}": value for key, value in found.items()}

    metrics_logger = runtime.MetricsLogger(run_dir, total_steps, config.train, initial_step=progress["step"], description="grpo")
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    model.train()
    try:
        while progress["step"] < total_steps and not (config.max_time and time.perf_counter() - started > config.max_time):
            first_step = progress["step"]
            rollout = collect_rollout(engine, prompts, stream, rewards, config, progress)
            if score_reference is not None:
                add_reference_logps(score_reference, rollout.examples, config, tokenizer.pad_token_id, model_device(model))
            try:
                updates = optimise_rollout(model, optimizer, scheduler, rollout, config, tokenizer.pad_token_id, total_steps - first_step)
            except TrainingError as error:
                raise runtime.stop_error(error, progress["step"], run_dir) from None
            progress["step"] += len(updates)
            _write_completions(run_dir, rollout, config, first_step, progress["step"])
            for step, update in enumerate(updates, start=first_step + 1):
                record = _step_record(rollout, update, len(updates))
                if eval_prompts is not None and config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                    record.update(evaluate())
                if step % config.train.log_every == 0 or step == total_steps:
                    metrics_logger.log(step, record)
                history.append({"step": step, **record})
                metrics_logger.advance()
            every = config.train.save_every  # checkpoints fall on rollout boundaries: no half-used rollout to save
            if every and progress["step"] // every > first_step // every and progress["step"] < total_steps:
                runtime.save_checkpoint(run_dir, progress["step"], model, optimizer, scheduler, dict(progress), keep=config.train.keep_checkpoints)
        if progress["step"] < total_steps:
            logger.warning("grpo: max_time of %.0f s reached after %d of %d steps", config.max_time, progress["step"], total_steps)
        if eval_prompts is not None:
            history.append({"step": progress["step"], **evaluate()})
            metrics_logger.log(progress["step"], {k: v for k, v in history[-1].items() if k != "step"})
    finally:
        metrics_logger.close()
    result = runtime.TrainResult(step=progress["step"], metrics=history, run_dir=run_dir, wall_time=time.perf_counter() - started)
    if save:
        save_model(model, tokenizer, run_dir / "final", card=model_card("GRPO policy", _card_lines(config, result)), merge_lora=config.model.merge_lora)
    return result


def resume_state(config: GRPOConfig, run_dir: Path, model, optimizer, scheduler) -> dict[str, int]:
    """Steps done, prompts consumed and generation calls made: where a run (or its resumption) starts."""
    if not config.train.resume:
        return {"step": 0, "position": 0, "generation_calls": 0}
    checkpoints = runtime.list_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    state = runtime.load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
    return {key: state[key] for key in ("step", "position", "generation_calls")}


def _step_record(rollout: Rollout, update: dict[str, float], updates: int) -> dict[str, float]:
    """One optimizer step's metrics; the rollout's generation time is shared among its steps."""
    generation = rollout.generation_time / updates
    step_time = generation + update.pop("train_time")
    tokens = update.pop("tokens")  # prompt + completion tokens the step trained on
    timing = {"step_time": step_time, "generation_time": generation, "generation_share": generation / step_time, "tokens_per_second": tokens / step_time}
    return {**rollout.metrics, **update, **timing}


def _write_completions(run_dir: Path, rollout: Rollout, config: GRPOConfig, first_step: int, last_step: int) -> None:
    every = config.log_completions_every
    if not every or not any(step % every == 0 for step in range(first_step, last_step)):
        return
    with (run_dir / "completions.jsonl").open("a") as handle:
        for record in rollout.logged:
            handle.write(json.dumps({"step": first_step + 1, **record}, default=str) + "\n")


def _card_lines(config: GRPOConfig, result: runtime.TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "reward" in m), {})
    rewards = config.reward_functions + ([f"reward model {config.reward_model}"] if config.reward_model else [])
    return {
        "method": f"GRPO (loss_type {config.loss_type}, {config.importance_sampling_level}-level ratio, scale_rewards {config.scale_rewards}, beta {config.beta})",
        "base model": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "rewards": ", ".join(rewards),
        "steps": result.step,
        "completions per prompt (G)": config.num_generations,
        "learning rate": config.train.learning_rate,
        "final train reward": f"{last.get('reward', float('nan')):.4f}",
    }


# ----------------------------------------------------------------------------- the demo stage

# Tuned on the built-in base (benchmarks/grpo_task.py): lr 1e-4 is the largest that does not lose accuracy
# early. A fixed step count, not a time budget, so the result does not depend on the machine's load:
# 2,500 steps take about 4 minutes on one thread of this 2-core CPU and reach about +30 points (the curve in
# BENCHMARKS.md, "GRPO").
DEMO = {"steps": 2500, "learning_rate": 1e-4, "prompts": 16, "generations": 8}


def grpo_stage(context) -> dict[str, Any]:
    """`prefalign demo`: GRPO with the exact-match reward from the base model; held-out accuracy before and after."""
    base = ModelConfig(name_or_path=str(context.base_path))
    model, tokenizer = load_causal_lm(base)
    config = GRPOConfig(model=base, data=DataConfig(max_length=64), max_new_tokens=8, num_generations=DEMO["generations"], log_completions_every=50)
    config.train = TrainConfig(
        output_dir=str(context.run_dir / "grpo"), overwrite=True, learning_rate=DEMO["learning_rate"], batch_size=DEMO["prompts"] * DEMO["generations"],
        max_steps=DEMO["steps"], schedule="constant", seed=context.config.seed, num_threads=context.config.num_threads,
    )  # fmt: skip
    started = time.perf_counter()
    result = grpo(config, model=model, tokenizer=tokenizer)
    reference, _ = load_causal_lm(base, trainable=False)
    after = context.evaluate(model, tokenizer, reference=reference)
    wall = time.perf_counter() - started
    before = context.base_metrics
    context.lines.append(
        f"| GRPO (exact-match reward) | held-out greedy accuracy {before.get('accuracy', float('nan')):.3f} → {after['accuracy']:.3f}, "
        f"pass@8 {before.get('pass@8', float('nan')):.3f} → {after['pass@8']:.3f}, KL to base {after['kl']:.3f} nats | {result.step} steps × "
        f"{DEMO['prompts']} prompts × G={DEMO['generations']}, lr {DEMO['learning_rate']:g}, loss {config.loss_type}, β {config.beta:g}; {wall:.0f} s |"
    )
    return {"after": after, "steps": result.step, "wall_seconds": wall, "model": str(result.run_dir / "final")}
