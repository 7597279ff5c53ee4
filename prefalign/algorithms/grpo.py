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
from pathlib import Path
from typing import Any

import torch

from prefalign import losses, runtime
from prefalign.algorithms.grpo_config import DEFAULT_MAX_NEW_TOKENS, GRPOConfig, check_config
from prefalign.algorithms.grpo_rollout import Rollout, collect_rollout
from prefalign.config import save_config
from prefalign.data import collate_sft, tokenize_prompts
from prefalign.data.splits import log_stats, resolve_rows
from prefalign.errors import ConfigError, DataError, TrainingError
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.forward import completion_logps, grouped_completion_logps
from prefalign.models.loading import disable_dropout, is_peft_model, load_causal_lm, model_device
from prefalign.models.reference import reference_mode
from prefalign.models.saving import model_card, save_model
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import build_scorers
from prefalign.rollout.engine import LocalEngine

logger = logging.getLogger("prefalign")


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
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    context = getattr(model.config, "max_position_embeddings", None)
    train, stats = tokenize_prompts(train_rows, tokenizer, config.data)
    data_stats = {"train": log_stats("train", stats)}
    if not config.max_new_tokens:
        config.max_new_tokens = default_max_new_tokens(train, context)
        logger.info(
            "grpo: max_new_tokens = %d (the model's context is %s tokens)", config.max_new_tokens, context,
        )
        save_config(config, run_dir / "config.yaml")
        if config.overlong_buffer > config.max_new_tokens:  # check_config could not bound it before the fit
            raise ConfigError(
                f"overlong_buffer {config.overlong_buffer} is longer than max_new_tokens "
                f"{config.max_new_tokens} (fitted to the model's context of {context} tokens); lower "
                "overlong_buffer or set max_new_tokens"
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
    """DEFAULT_MAX_NEW_TOKENS, or what the context leaves after the longest prompt if that is less
    (and > 0)."""
    room = context - max(map(len, prompts["prompt_ids"]), default=0) if context else DEFAULT_MAX_NEW_TOKENS
    return min(DEFAULT_MAX_NEW_TOKENS, room) if room > 0 else DEFAULT_MAX_NEW_TOKENS


def fit_context(prompts, context: int | None, config: GRPOConfig, name: str):
    """Drop (counted) or reject prompts that leave no room for max_new_tokens in the model's context."""
    new = config.max_new_tokens
    too_long = [i for i, ids in enumerate(prompts["prompt_ids"]) if context and len(ids) + new > context]
    if too_long and (config.data.too_long_prompt == "error" or len(too_long) == len(prompts)):
        first = too_long[0]
        raise DataError(
            f"{name} prompt {first} is {len(prompts[first]['prompt_ids'])} tokens; with max_new_tokens={new} "
            f"it exceeds the model's context of {context} ({len(too_long)} of {len(prompts)} prompts do). "
            "Lower max_new_tokens, set data.max_prompt_length to cut prompts from the left, or set "
            "data.too_long_prompt=drop."
        )
    if too_long:
        logger.warning(
            "%s data: %d prompts dropped: prompt + max_new_tokens > context %d", name, len(too_long), context,
        )
        dropped = set(too_long)
        prompts = prompts.select([i for i in range(len(prompts)) if i not in dropped])
    return prompts, len(too_long)


def collate_rollout(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    batch = collate_sft(examples, pad_token_id)  # input_ids, attention_mask, completion_mask: (B, L)
    batch.update(
        pad_token_id=pad_token_id, prompt_ids=[e["prompt_ids"] for e in examples],
        completion_ids=[e["completion_ids"] for e in examples],
    )
    batch["advantages"] = torch.tensor([e["advantage"] for e in examples], dtype=torch.float32)  # (B,)
    batch["trained"] = torch.tensor([float(e["trained"]) for e in examples])  # (B,)
    batch["old_logps"] = [e["old_logps"] for e in examples]  # per row: one value per completion token
    batch["ref_logps"] = [e.get("ref_logps") for e in examples]
    return batch


def aligned(per_row: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values laid out like `mask` (batch, T): row i's values fill its 1s in order."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[mask.bool()] = torch.tensor(
        [value for row in per_row for value in row], dtype=torch.float32, device=mask.device,
    )
    return out


@torch.no_grad()
def add_reference_logps(
    score_reference, examples, config: GRPOConfig, pad_token_id: int, device: torch.device,
) -> None:
    """log π_ref of every completion token, once per rollout batch (the reference is frozen)."""
    for start in range(0, len(examples), config.train.batch_size):
        chunk = examples[start : start + config.train.batch_size]
        scored = score_reference(runtime.to_device(collate_rollout(chunk, pad_token_id), device))
        for example, values, row_mask in zip(chunk, scored.token_logps, scored.mask, strict=True):
            example["ref_logps"] = values[row_mask.bool()].tolist()


def score_completions(model, batch, config: GRPOConfig, keep_logits: bool = False):
    """Completion log-probs at the sampling temperature: CompletionLogps with (batch, T) token_logps and
    mask."""
    if config.share_prompt and not config.model.gradient_checkpointing:
        return grouped_completion_logps(
            model, batch["prompt_ids"], batch["completion_ids"], batch["pad_token_id"],
            temperature=config.temperature, keep_logits=keep_logits,
        )
    return completion_logps(model, batch, temperature=config.temperature, keep_logits=keep_logits)


def policy_loss(model, batch, totals: dict[str, int], config: GRPOConfig, use_rollout_logps: bool):
    """This micro-batch's share of the optimizer-step loss, its metrics (token means) and trained tokens."""
    scored = score_completions(model, batch, config, keep_logits=True)
    logps = scored.token_logps  # (batch, T)
    mask = scored.mask * batch["trained"].unsqueeze(1)  # (batch, T): trained completion tokens
    old_logps = aligned(batch["old_logps"], scored.mask) if use_rollout_logps else logps.detach()
    kl = (
        losses.kl_estimate(logps, aligned(batch["ref_logps"], scored.mask), config.kl_estimator)
        if config.beta else None
    )
    clip = {"eps_low": config.epsilon_low, "eps_high": config.epsilon_high}
    if config.importance_sampling_level == "sequence":
        loss, metrics = losses.gspo_loss(
            logps, old_logps, batch["advantages"], mask, num_sequences=totals["sequences"], **clip,
        )
        # GSPO has no token aggregation: the KL term is averaged per sequence, as in `grpo`
        if kl is not None:
            loss = loss + config.beta * losses.masked_mean(kl, mask, dim=1).sum() / totals["sequences"]
            metrics["kl"] = losses.masked_mean(kl.detach(), mask).item()
    else:
        loss, metrics = losses.clipped_surrogate(
            logps, old_logps, batch["advantages"], mask, aggregation=config.loss_type,
            max_new_tokens=config.max_new_tokens, num_sequences=totals["sequences"],
            num_tokens=totals["tokens"], kl=kl, beta=config.beta, **clip,
        )  # fmt: skip
    with torch.no_grad():
        metrics["entropy"] = losses.masked_mean(
            losses.token_entropy(scored.logits, temperature=config.temperature), mask,
        ).item()
    return loss, metrics, float(mask.sum())


def optimizer_step(
    model, optimizer, scheduler, examples, config: GRPOConfig, pad_token_id: int, use_rollout_logps: bool,
) -> dict[str, float]:
    """Accumulate over micro-batches of train.batch_size completions, clip, step. Normalisers span the
    step."""
    size = config.train.batch_size
    device = model_device(model)
    batches = [
        runtime.to_device(collate_rollout(examples[i : i + size], pad_token_id), device)
        for i in range(0, len(examples), size)
    ]
    # per row: trained tokens
    trained = [
        torch.tensor([len(ids) for ids in b["completion_ids"]], device=device) * b["trained"] for b in batches
    ]
    totals = {
        "tokens": int(sum(t.sum() for t in trained)),
        "sequences": max(1, int(sum((t > 0).sum() for t in trained))),
    }
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


def optimise_rollout(
    model, optimizer, scheduler, rollout: Rollout, config: GRPOConfig, pad_token_id: int, steps_left: int,
) -> list[dict[str, float]]:
    """μ passes over the rollout batch, each split into steps_per_generation optimizer steps of whole
    groups."""
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
            metrics = optimizer_step(
                model, optimizer, scheduler, rollout.examples[start:stop], config, pad_token_id,
                use_rollout_logps,
            )
            metrics["train_time"] = time.perf_counter() - started
            results.append(metrics)
    return results


def grpo(
    config: GRPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
    save: bool = True,
) -> runtime.TrainResult:
    """Run GRPO as configured; returns the training result (the policy is saved to <run>/final)."""
    check_config(config)
    runtime.set_threads(config.train.num_threads)
    runtime.seed_everything(config.train.seed)
    run_dir = runtime.prepare_run_dir(config, "grpo")
    if model is None:
        model, tokenizer = load_causal_lm(config.model)
    # the engine samples in eval mode: π_old and π must be the same function at μ's first pass
    disable_dropout(model)
    score_reference = reference_scorer(config, model, reference)
    rewards = build_rewards(config)
    prompts, eval_prompts = load_prompts(config, tokenizer, model, dataset, eval_dataset, run_dir)
    prompts_per_step = config.train.batch_size * config.train.grad_accum // config.num_generations
    # An epoch is one pass over the prompts; each prompt's rollout is optimised μ times (as in TRL).
    total_steps = config.train.max_steps or max(
        1, math.ceil(config.train.epochs * len(prompts) / prompts_per_step) * config.num_iterations,
    )
    optimizer = runtime.build_optimizer(model, config.train)
    scheduler = runtime.build_scheduler(optimizer, config.train, total_steps)
    progress = resume_state(config, run_dir, model, optimizer, scheduler)
    engine = LocalEngine(
        model, tokenizer,
        batch_size=config.generation_batch_size
        or prompts_per_step * config.steps_per_generation * config.num_generations,
    )
    stream = runtime.example_stream(len(prompts), config.train.seed, start=progress["position"])

    def evaluate() -> dict[str, float]:
        found = evaluate_policy(
            model, tokenizer, eval_prompts, rewards, k=config.eval_k, temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, seed=config.train.seed,
        )
        return {f"eval/{key}": value for key, value in found.items()}

    metrics_logger = runtime.MetricsLogger(
        run_dir, total_steps, config.train, initial_step=progress["step"], description="grpo",
    )
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    model.train()
    try:
        while progress["step"] < total_steps and not (
            config.max_time and time.perf_counter() - started > config.max_time
        ):
            first_step = progress["step"]
            rollout = collect_rollout(engine, prompts, stream, rewards, config, progress)
            if score_reference is not None:
                add_reference_logps(
                    score_reference, rollout.examples, config, tokenizer.pad_token_id, model_device(model),
                )
            try:
                updates = optimise_rollout(
                    model, optimizer, scheduler, rollout, config, tokenizer.pad_token_id,
                    total_steps - first_step,
                )
            except TrainingError as error:
                raise runtime.stop_error(error, progress["step"], run_dir) from None
            progress["step"] += len(updates)
            _write_completions(run_dir, rollout, config, first_step, progress["step"])
            for step, update in enumerate(updates, start=first_step + 1):
                record = _step_record(rollout, update, len(updates))
                if (
                    eval_prompts is not None and config.train.eval_every
                    and step % config.train.eval_every == 0 and step < total_steps
                ):
                    record.update(evaluate())
                if step % config.train.log_every == 0 or step == total_steps:
                    metrics_logger.log(step, record)
                history.append({"step": step, **record})
                metrics_logger.advance()
            # checkpoints fall on rollout boundaries: no half-used rollout to save
            every = config.train.save_every
            if every and progress["step"] // every > first_step // every and progress["step"] < total_steps:
                runtime.save_checkpoint(
                    run_dir, progress["step"], model, optimizer, scheduler, dict(progress),
                    keep=config.train.keep_checkpoints,
                )
        if progress["step"] < total_steps:
            logger.warning(
                "grpo: max_time of %.0f s reached after %d of %d steps", config.max_time, progress["step"],
                total_steps,
            )
        if eval_prompts is not None:
            history.append({"step": progress["step"], **evaluate()})
            metrics_logger.log(progress["step"], {k: v for k, v in history[-1].items() if k != "step"})
    finally:
        metrics_logger.close()
    result = runtime.TrainResult(
        step=progress["step"], metrics=history, run_dir=run_dir, wall_time=time.perf_counter() - started,
    )
    if save:
        save_model(
            model, tokenizer, run_dir / "final", card=model_card("GRPO policy", _card_lines(config, result)),
            merge_lora=config.model.merge_lora,
        )
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
    timing = {
        "step_time": step_time, "generation_time": generation, "generation_share": generation / step_time,
        "tokens_per_second": tokens / step_time,
    }
    return {**rollout.metrics, **update, **timing}


def _write_completions(
    run_dir: Path, rollout: Rollout, config: GRPOConfig, first_step: int, last_step: int,
) -> None:
    every = config.log_completions_every
    if not every or not any(step % every == 0 for step in range(first_step, last_step)):
        return
    with (run_dir / "completions.jsonl").open("a") as handle:
        for record in rollout.logged:
            handle.write(json.dumps({"step": first_step + 1, **record}, default=str) + "\n")


def _card_lines(config: GRPOConfig, result: runtime.TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "reward" in m), {})
    rewards = (
        config.reward_functions + ([f"reward model {config.reward_model}"] if config.reward_model else [])
    )
    return {
        "method": f"GRPO (loss_type {config.loss_type}, {config.importance_sampling_level}-level ratio, "
                  f"scale_rewards {config.scale_rewards}, beta {config.beta})",
        "base model": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "rewards": ", ".join(rewards),
        "steps": result.step,
        "completions per prompt (G)": config.num_generations,
        "learning rate": config.train.learning_rate,
        "final train reward": f"{last.get('reward', float('nan')):.4f}",
    }
