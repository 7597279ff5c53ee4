"""GRPO (Shao et al. 2024): G samples per prompt, each scored, advantages relative to the group, no critic.

One rollout batch: draw prompts, sample G completions of each with the rollout engine, score them with
reward functions and/or a reward model, turn rewards into group advantages (grpo_rollout). Then
`num_iterations` (μ) passes over the batch, split into `steps_per_generation` optimizer steps (the RL core,
prefalign.algorithms.rl, and the one training loop). With μ = 1 and one step per rollout batch π_old = π
detached, so ρ = 1 in value (not in gradient); otherwise π_old is a no-grad forward of the policy before the
first update. Variants by name: loss_type grpo / dapo / dr_grpo (token aggregation),
importance_sampling_level sequence (GSPO), scale_rewards group / batch / none (Dr. GRPO), clip-higher
(epsilon_high), KL to the reference (beta, k1/k2/k3; beta = 0 loads no reference unless evaluations need one
for their eval/kl), DAPO's dynamic sampling, truncated-completion masking and soft overlong penalty.

Batch sizes count completions, as in TRL: train.batch_size completions per forward/backward, and
train.batch_size × train.grad_accum per optimizer step, a multiple of num_generations.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from prefalign import losses
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.grpo_rollout import collect_rollout
from prefalign.algorithms.rl.experience import CompletionScorer, aligned, step_totals
from prefalign.algorithms.rl.prompts import load_prompts
from prefalign.algorithms.rl.rollout import build_monitors
from prefalign.algorithms.rl.source import ExperienceSource, completions_writer
from prefalign.config import to_dict, validate
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import disable_dropout, model_device
from prefalign.models.reference import Reference
from prefalign.models.saving import model_card, save_model
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import build_scorers
from prefalign.rollout.engine import LocalEngine
from prefalign.runtime import distributed
from prefalign.runtime.loop import LossOutput, TrainResult, finished_run, train
from prefalign.runtime.setup import copy_dtype, start_run

logger = logging.getLogger("prefalign")


def build_rewards(config: GRPOConfig) -> WeightedRewards:
    return build_scorers(
        config.reward_functions, config.reward_weights, reward_model=config.reward_model,
        reward_model_weight=config.reward_model_weight, device=config.model.device, needed_by="GRPO",
    )  # fmt: skip


def make_loss(config: GRPOConfig, score: CompletionScorer):
    """loss_fn for the training loop: this micro-batch's share of the step's loss (already normalised over the
    step, so the loop runs it with units_of=None) and its share of each token-mean metric."""

    def loss_fn(model, batch: dict[str, Any]) -> LossOutput:
        scored = score(model, batch, keep_logits=True)
        logps = scored.token_logps  # (batch, T)
        mask = scored.mask * batch["trained"].unsqueeze(1)  # (batch, T): trained completion tokens
        multi_step = batch["old_logps"][0] is not None
        old_logps = aligned(batch["old_logps"], scored.mask) if multi_step else logps.detach()
        ref_logps = aligned(batch["ref_logps"], scored.mask) if config.beta else None
        kl = losses.kl_estimate(logps, ref_logps, config.kl_estimator) if config.beta else None
        loss, metrics = policy_loss(logps, old_logps, mask, kl, batch, config)
        with torch.no_grad():
            metrics["entropy"] = losses.masked_mean(
                losses.token_entropy(scored.logits, temperature=config.temperature), mask
            ).item()
        tokens = float(mask.sum())
        weight = tokens / max(batch["step_tokens"], 1)  # micro-batch token means -> the step's token mean
        shares = {key: value * weight for key, value in metrics.items()}
        maxima = {}
        if not multi_step:  # π = π_old here: the sampler's numbers against the training forward's
            with torch.no_grad():
                difference = (
                    logps.detach() - aligned(batch["sampler_logps"], scored.mask)
                ).abs() * scored.mask
            shares["rollout/logprob_diff_mean"] = float(difference.sum()) / max(
                batch["step_completion_tokens"], 1
            )
            maxima["rollout/logprob_diff_max"] = float(difference.max())
        tokens_seen = int(batch["attention_mask"].sum())
        return LossOutput(loss_sum=loss, metrics=shares, tokens=tokens_seen, maxima=maxima)

    return loss_fn


def policy_loss(logps, old_logps, mask, kl, batch, config: GRPOConfig):
    """The clipped surrogate (token-level ratio; grpo/dapo/dr_grpo aggregation) or GSPO's sequence one."""
    clip = {"eps_low": config.epsilon_low, "eps_high": config.epsilon_high}
    sequences, tokens = batch["step_sequences"], batch["step_tokens"]
    if config.importance_sampling_level == "sequence":
        loss, metrics = losses.gspo_loss(
            logps, old_logps, batch["advantages"], mask, num_sequences=sequences, **clip
        )
        if (
            kl is not None
        ):  # GSPO has no token aggregation: the KL term is averaged per sequence, as in `grpo`
            loss = loss + config.beta * losses.masked_mean(kl, mask, dim=1).sum() / sequences
            metrics["kl"] = losses.masked_mean(kl.detach(), mask).item()
        return loss, metrics
    return losses.clipped_surrogate(
        logps, old_logps, batch["advantages"], mask, aggregation=config.loss_type,
        max_new_tokens=config.max_new_tokens, num_sequences=sequences, num_tokens=tokens, kl=kl,
        beta=config.beta, **clip,
    )  # fmt: skip


def grpo(
    config: GRPOConfig,
    *,
    dataset=None,
    eval_dataset=None,
    model=None,
    tokenizer=None,
    reference=None,
    save: bool = True,
) -> TrainResult:
    """Run GRPO as configured; returns the training result (the policy is saved to <run>/final). Resuming a
    finished run returns its result without training (prefalign.runtime.loop.finished_run)."""
    validate(config)
    if config.beta > 0 and config.kl_estimator == "k1":
        # k1 = log π − log π_ref has expected gradient zero under on-policy samples: as a loss term it does
        # not pull the policy toward the reference (its value is still a fine KL metric).
        logger.warning(
            "grpo: kl_estimator=k1 as a loss term has zero expected gradient; use k3 (default) or k2 to "
            "regularise toward the reference"
        )
    if (finished := finished_run(config, "grpo")) is not None:
        return finished
    run_dir, model, tokenizer = start_run(config, "grpo", model, tokenizer)
    # The engine samples in eval mode: π_old and π must be the same function at μ's first pass.
    disable_dropout(model)
    rewards = build_rewards(config)
    prompts, eval_prompts = load_prompts(
        config, tokenizer, model, dataset, eval_dataset, run_dir, command="grpo"
    )
    # π_ref for the KL term, and for the KL to the starting policy that each evaluation logs (eval/kl) even
    # at beta = 0; with neither, no reference is loaded at all.
    frozen = None
    if config.beta or eval_prompts is not None:
        frozen = Reference(model, reference, dtype=copy_dtype(config, model_device(model)))
    prompts_per_step = config.train.batch_size * config.train.grad_accum // config.num_generations
    # An epoch is one pass over the prompts; each prompt's rollout is optimised μ times (as in TRL).
    total_steps = config.train.max_steps or max(
        1, math.ceil(config.train.epochs * len(prompts) / prompts_per_step) * config.num_iterations
    )
    rollout_size = prompts_per_step * config.steps_per_generation * config.num_generations
    engine = distributed.ShardedEngine(
        LocalEngine(model, tokenizer, batch_size=config.generation_batch_size or rollout_size)
    )
    score = CompletionScorer(
        config.temperature, config.share_prompt and not config.model.gradient_checkpointing
    )
    source = ExperienceSource(
        collect_rollout(engine, prompts, rewards, config, build_monitors(config.monitor_functions)),
        num_prompts=len(prompts), seed=config.train.seed, policy=model, score=score,
        reference=frozen if config.beta else None, num_iterations=config.num_iterations,
        steps_per_generation=config.steps_per_generation, micro_batch_size=config.train.batch_size,
        pad_token_id=tokenizer.pad_token_id, device=model_device(model),
    )  # fmt: skip

    def evaluate(model) -> dict[str, float]:
        return evaluate_policy(
            model, tokenizer, eval_prompts, rewards, k=config.eval_k, temperature=config.temperature,
            max_new_tokens=config.max_new_tokens, seed=config.train.seed, reference=frozen,
        )  # fmt: skip

    result = train(
        model=model, source=source, loss_fn=make_loss(config, score), units_of=None, config=config.train,
        run_dir=run_dir, total_steps=total_steps, evaluate=evaluate if eval_prompts is not None else None,
        description="grpo", prepare_step=step_totals, max_seconds=config.max_time,
        after_phase=completions_writer(run_dir, config.log_completions_every), parallel=config.distributed,
    )  # fmt: skip
    if save:
        card = model_card("GRPO policy", card_lines(config, result))
        distributed.on_main_process_whole(
            save_model, model, tokenizer, run_dir / "final", card=card, merge_lora=config.model.merge_lora,
        )
    return result


def card_lines(config: GRPOConfig, result: TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "reward" in m), {})
    reward_model = [f"reward model {config.reward_model}"] if config.reward_model else []
    return {
        "method": f"GRPO (loss_type {config.loss_type}, {config.importance_sampling_level}-level ratio, "
        f"scale_rewards {config.scale_rewards}, beta {config.beta})",
        "base model": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "rewards": ", ".join(to_dict(config)["reward_functions"] + reward_model),  # callables by name
        "steps": result.step,
        "completions per prompt (G)": config.num_generations,
        "learning rate": config.train.learning_rate,
        "final train reward": f"{last.get('reward', float('nan')):.4f}",
    }
