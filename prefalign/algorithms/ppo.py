"""PPO for language models (Ouyang et al. 2022; Huang et al. 2024, the N+ implementation details) on the
RL core.

One rollout batch: one completion per prompt from the rollout engine, scored by reward functions and/or a
reward model (a completion without EOS gets `missing_eos_penalty` instead); π_old and π_ref per token (the
source's training forward and the frozen reference), the critic's values V_t read at the position before
y_t. Per-token rewards r_t = −β·(log π_old − log π_ref) with the score added at the last token (optionally
whitened without moving their mean), GAE (γ, λ) gives advantages and returns, and advantages are whitened
over the whole batch. Then `num_iterations` PPO epochs over `steps_per_generation` minibatches: the clipped
policy loss plus vf_coef × the clipped value loss, both token means over the optimizer step. β is fixed, or
adapted after each rollout towards `kl_target` nats per sequence (saved with checkpoints).

Policy and critic train as one module (`ActorCritic`: one optimizer with the critic's own learning rate,
one gradient clip, one checkpoint); final/ holds the policy as a Hugging Face folder, the critic in
final/critic.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from prefalign import losses
from prefalign.algorithms.ppo_config import PPOConfig
from prefalign.algorithms.rl.experience import CompletionScorer, aligned, collate_experience, step_totals
from prefalign.algorithms.rl.prompts import load_prompts
from prefalign.algorithms.rl.rollout import (
    build_monitors,
    completion_metrics,
    function_means,
    monitor_metrics,
    reward_metrics,
    sample_and_score,
)
from prefalign.algorithms.rl.source import ExperienceSource, Progress, RolloutBatch, completions_writer
from prefalign.config import ModelConfig, to_dict, validate
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import disable_dropout, is_peft_model, load_sequence_classifier, model_device
from prefalign.models.reference import Reference, check_same_tokenizer
from prefalign.models.saving import model_card, save_model
from prefalign.models.value_head import laid_out, token_values, value_head
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import build_scorers
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import FINISH_EOS, SamplingParams
from prefalign.runtime import distributed
from prefalign.runtime.loop import LossOutput, TrainResult, finished_run, train
from prefalign.runtime.setup import start_run, to_device

logger = logging.getLogger("prefalign")


class ActorCritic(torch.nn.Module):
    """Policy and critic as one module for the training loop (parameters named policy.* and critic.*)."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic


def build_critic(config: PPOConfig, policy, tokenizer):
    """The critic and where it came from: config.critic_model, the reward model when it is a causal decoder
    sharing the policy's tokenizer, else the policy's own weights with a fresh value head."""
    source = config.critic_model or (config.reward_model if reward_model_fits(config, tokenizer) else None)
    if source:
        critic, _ = load_sequence_classifier(
            ModelConfig(name_or_path=source, device=str(model_device(policy)), dtype=config.model.dtype,
                        trust_remote_code=config.model.trust_remote_code),
        )  # fmt: skip
        value_head(critic)  # a decoder with a one-output score head, or a clear error
        return critic, f"initialised from {source}"
    weights = copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) else policy
    critic_config = copy.deepcopy(weights.config)
    critic_config.num_labels, critic_config.pad_token_id = 1, tokenizer.pad_token_id
    critic = AutoModelForSequenceClassification.from_config(critic_config)
    critic.base_model.load_state_dict(weights.base_model.state_dict())
    return critic.to(
        device=model_device(policy), dtype=next(policy.parameters()).dtype
    ), "initialised from the policy"


def reward_model_fits(config: PPOConfig, tokenizer) -> bool:
    """Whether the reward model can seed the critic: a causal decoder with the policy's tokenizer."""
    if not config.reward_model:
        return False
    from transformers import AutoConfig, AutoTokenizer

    reward_config = AutoConfig.from_pretrained(config.reward_model)
    if (
        getattr(reward_config, "is_encoder_decoder", False)
        or "ForSequenceClassification" not in "".join(getattr(reward_config, "architectures", None) or [])
        or getattr(reward_config, "model_type", "")
        in ("bert", "roberta", "distilbert", "deberta", "deberta-v2")
    ):
        return False
    try:
        check_same_tokenizer(
            tokenizer, AutoTokenizer.from_pretrained(config.reward_model), config.reward_model
        )
    except Exception:  # noqa: BLE001 - a different tokenizer means: seed the critic from the policy instead
        return False
    return True


def collect_rollout(
    engine, prompts, rewards: WeightedRewards, monitors: WeightedRewards | None, config: PPOConfig
):
    """collect(progress, next_prompt) for the ExperienceSource: one completion per prompt, scored."""

    def collect(progress: Progress, next_prompt) -> RolloutBatch:
        size = config.train.batch_size * config.train.grad_accum * config.steps_per_generation
        row_ids = [next_prompt() for _ in range(size)]
        seed = config.train.seed * 1_000_003 + progress.generation_calls
        progress.generation_calls += 1
        params = SamplingParams(
            n=1, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            max_new_tokens=config.max_new_tokens, seed=seed,
        )  # fmt: skip
        scored = sample_and_score(engine, [prompts[i] for i in row_ids], row_ids, rewards, params)
        samples = [group[0] for group in scored.samples]
        batch = RolloutBatch(rows=[], group_size=1)
        batch.metrics = {**reward_metrics(scored.scores), **completion_metrics(samples)}
        batch.metrics.update(function_means(scored.per_function))
        batch.metrics["rewards/failed_samples"] = len(scored.failures)
        batch.metrics.update(monitor_metrics(monitors, [scored]))
        for row, sample, score in zip(scored.rows, samples, scored.scores[:, 0].tolist(), strict=True):
            ended = sample.finish_reason == FINISH_EOS
            score = completion_score(score, ended, config.missing_eos_penalty)
            unscored = math.isnan(score)
            batch.rows.append({
                "prompt_ids": row["prompt_ids"], "completion_ids": sample.token_ids,
                "sampler_logps": sample.logprobs, "score": 0.0 if unscored else score,
                "trained": not unscored and bool(sample.token_ids), "eos": ended,
            })  # fmt: skip
            if len(batch.logged) < config.num_completions_to_log:
                batch.logged.append({
                    "prompt": row["prompt"], "completion": sample.text, "score": score,
                    "finish_reason": sample.finish_reason, "tokens": len(sample.token_ids),
                })  # fmt: skip
        batch.metrics["rewards/unscored_samples"] = int(torch.isnan(scored.scores).sum())
        return batch

    return collect


def completion_score(score: float, ended: bool, missing_eos_penalty: float | None) -> float:
    """The score a completion's last token gets: its reward, or the penalty when it ended without EOS (cut at
    max_new_tokens) and a penalty is set (the N+ details' "EOS trick"; -1 by default here)."""
    return missing_eos_penalty if not ended and missing_eos_penalty is not None else score


def token_rewards(
    old_logps: list[float], ref_logps: list[float], score: float, beta: float
) -> tuple[list[float], float]:
    """Per-token rewards r_t = −β·(log π_old(y_t) − log π_ref(y_t)) at every token, plus the score at the last
    one; and the sequence's KL, Σ_t (log π_old − log π_ref) (k1, in nats)."""
    kl = [old - ref for old, ref in zip(old_logps, ref_logps, strict=True)]
    rewards = [-beta * value for value in kl]
    if rewards:
        rewards[-1] += score
    return rewards, sum(kl)


def make_prepare(config: PPOConfig, module: ActorCritic, state: dict[str, Any], pad_token_id: int):
    """prepare(rows) for the ExperienceSource: old values, per-token rewards, GAE, whitened advantages, β."""

    @torch.no_grad()
    def prepare(rows: list[dict[str, Any]]) -> dict[str, float]:
        device = model_device(module.critic)
        for start in range(0, len(rows), config.train.batch_size):
            chunk = rows[start : start + config.train.batch_size]
            flat = token_values(
                module.critic, to_device(collate_experience(chunk, pad_token_id), device)
            ).tolist()
            for row in chunk:
                row["old_values"], flat = (
                    flat[: len(row["completion_ids"])],
                    flat[len(row["completion_ids"]) :],
                )
        beta = state["beta"]
        kls, non_score = [], []
        for row in rows:
            row["rewards"], kl = token_rewards(row["old_logps"], row["ref_logps"], row["score"], beta)
            kls.append(kl)
            non_score.append(-beta * kl)
        if config.whiten_rewards:
            whiten_across(rows, "rewards", shift_mean=False)
        for row in rows:
            rewards, values = torch.tensor([row["rewards"]]), torch.tensor([row["old_values"]])
            advantages, returns = losses.gae(
                rewards, values, torch.ones_like(rewards), gamma=config.gamma, lam=config.lam
            )
            row["token_advantages"], row["returns"] = advantages[0].tolist(), returns[0].tolist()
        whiten_across(rows, "token_advantages", shift_mean=True)
        scores = [row["score"] for row in rows]
        # Sums over every process's rows (each trains on a share of the rollout batch), then means: the
        # metrics and the controller's KL are the whole batch's, the same on every rank.
        totals = distributed.sum_tensor_across(torch.tensor([
            sum(kls), sum(non_score), sum(scores),
            # TRL's: the sampled sequences' summed −log π_old, a Monte-Carlo estimate of the policy's entropy
            -sum(sum(row["old_logps"]) for row in rows),
            float(sum(row["eos"] for row in rows)), float(len(rows)),
        ], dtype=torch.float64)).tolist()  # fmt: skip
        kl_sum, non_score_sum, score_sum, entropy_sum, eos, count = totals
        mean_kl = kl_sum / count
        metrics = {
            "objective/kl": mean_kl, "objective/non_score_reward": non_score_sum / count,
            "objective/scores": score_sum / count, "objective/entropy": entropy_sum / count,
            "objective/rlhf_reward": (score_sum + non_score_sum) / count, "val/num_eos_tokens": eos,
            "beta": beta,
        }  # fmt: skip
        if config.kl_target is not None:  # Ziegler et al.'s controller, on the rollout's per-sequence KL
            state["beta"] = losses.adaptive_kl_update(
                beta, mean_kl, config.kl_target, config.kl_horizon_factor
            )
        return metrics

    return prepare


def whiten_across(rows: list[dict[str, Any]], name: str, *, shift_mean: bool) -> None:
    """Whiten a per-token field over every trained token of the batch on every process (sample variance);
    shift_mean=False keeps the mean (whitened rewards)."""
    values = torch.tensor([v for row in rows if row["trained"] for v in row[name]], dtype=torch.float64)
    sums = distributed.sum_tensor_across(
        torch.stack([values.sum(), (values**2).sum(), torch.tensor(float(len(values)))])
    )
    total, squares, count = sums.tolist()
    if count < 2:
        return
    mean = total / count
    variance = (squares - count * mean**2) / (count - 1)
    scale = 1.0 / math.sqrt(max(variance, 0.0) + 1e-8)
    for row in rows:
        row[name] = [(v - mean) * scale + (0.0 if shift_mean else mean) for v in row[name]]


def make_loss(config: PPOConfig, score: CompletionScorer):
    """loss_fn for the training loop: clipped policy loss + vf_coef · clipped value loss, token means over the
    optimizer step (already normalised, so the loop runs it with units_of=None), and metric shares."""

    def loss_fn(module: ActorCritic, batch: dict[str, Any]) -> LossOutput:
        scored = score(module.policy, batch, keep_logits=True)
        logps, layout = scored.token_logps, scored.mask  # (batch, T)
        mask = layout * batch["trained"].unsqueeze(1)
        old_logps = aligned(batch["old_logps"], layout)
        advantages = aligned(batch["token_advantages"], layout)
        policy_loss, policy_metrics = losses.clipped_surrogate(
            logps, old_logps, advantages, mask, eps_low=config.epsilon, eps_high=config.epsilon,
            aggregation="dapo", num_tokens=batch["step_tokens"],
        )  # fmt: skip
        values = laid_out(token_values(module.critic, batch), layout)
        value_loss, value_metrics = losses.value_loss(
            values, aligned(batch["old_values"], layout), aligned(batch["returns"], layout), mask,
            clip_range=config.value_clip,
        )  # fmt: skip
        tokens = float(mask.sum())
        share = tokens / max(batch["step_tokens"], 1)
        value_loss = value_loss * share  # the micro-batch's token mean -> its part of the step's token mean
        with torch.no_grad():
            log_ratio = (logps - old_logps) * mask
            entropy = losses.masked_mean(
                losses.token_entropy(scored.logits, temperature=config.temperature), mask
            )
            metrics = {
                "loss/policy_avg": policy_loss.item() / share if share else 0.0,
                "loss/value_avg": value_loss.item() / share if share else 0.0,
                "policy/approxkl_avg": 0.5 * float((log_ratio**2).sum()) / max(tokens, 1),
                "policy/clipfrac_avg": policy_metrics["clip_ratio/region_mean"],
                "val/clipfrac_avg": value_metrics["value/clipfrac"],
                "policy/entropy_avg": entropy.item(),
                "val/ratio": float((log_ratio.exp() * mask).sum()) / max(tokens, 1),
            }  # fmt: skip
        shares = {key: value * share for key, value in metrics.items()}
        return LossOutput(loss_sum=policy_loss + config.vf_coef * value_loss, metrics=shares,
                          tokens=int(batch["attention_mask"].sum()))  # fmt: skip

    return loss_fn


def ppo(config: PPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
        save: bool = True) -> TrainResult:  # fmt: skip
    """Run PPO as configured; returns the training result (policy in <run>/final, critic in final/critic)."""
    validate(config)
    if (finished := finished_run(config, "ppo")) is not None:
        return finished
    run_dir, model, tokenizer = start_run(config, "ppo", model, tokenizer)
    frozen = Reference(model, reference)  # π_ref: a frozen copy, LoRA adapters off, or the given model
    critic, origin = build_critic(config, model, tokenizer)
    logger.info("ppo: critic %s", origin)
    for network in (model, critic):
        disable_dropout(network)  # every log-prob and value is compared across passes
    module = ActorCritic(model, critic)
    rewards = build_scorers(
        config.reward_functions, config.reward_weights, reward_model=config.reward_model,
        reward_model_weight=config.reward_model_weight, device=config.model.device, needed_by="PPO",
    )  # fmt: skip
    monitors = build_monitors(config.monitor_functions)
    prompts, eval_prompts = load_prompts(
        config, tokenizer, model, dataset, eval_dataset, run_dir, command="ppo"
    )
    per_step = config.train.batch_size * config.train.grad_accum
    total_steps = config.train.max_steps or max(
        1, math.ceil(config.train.epochs * len(prompts) / per_step) * config.num_iterations
    )
    engine = distributed.ShardedEngine(LocalEngine(
        model, tokenizer, batch_size=config.generation_batch_size or per_step * config.steps_per_generation
    ))
    score = CompletionScorer(
        config.temperature, config.share_prompt and not config.model.gradient_checkpointing
    )
    state = {"beta": config.beta}
    source = ExperienceSource(
        collect_rollout(engine, prompts, rewards, monitors, config), num_prompts=len(prompts),
        seed=config.train.seed, policy=model, score=score, reference=frozen,
        num_iterations=config.num_iterations,
        steps_per_generation=config.steps_per_generation, micro_batch_size=config.train.batch_size,
        pad_token_id=tokenizer.pad_token_id, device=model_device(model),
        prepare=make_prepare(config, module, state, tokenizer.pad_token_id), always_old_logps=True,
        extra_state=state,
    )  # fmt: skip

    def evaluate(_module) -> dict[str, float]:
        return evaluate_policy(model, tokenizer, eval_prompts, rewards, k=config.eval_k,
                               temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                               seed=config.train.seed, reference=frozen)  # fmt: skip

    result = train(
        model=module, source=source, loss_fn=make_loss(config, score), units_of=None, config=config.train,
        run_dir=run_dir, total_steps=total_steps, evaluate=evaluate if eval_prompts is not None else None,
        description="ppo", prepare_step=step_totals, max_seconds=config.max_time,
        after_phase=completions_writer(run_dir, config.log_completions_every),
        learning_rates={"critic.": config.critic_learning_rate} if config.critic_learning_rate else None,
    )  # fmt: skip
    if save:
        card = model_card("PPO policy", card_lines(config, result, origin))
        distributed.on_main_process(
            save_policy_and_critic, model, critic, tokenizer, run_dir / "final", card,
            model_card("PPO critic", {"critic": origin}), config.model.merge_lora,
        )
    return result


def save_policy_and_critic(
    model, critic, tokenizer, folder, card: str, critic_card: str, merge: bool,
) -> None:
    """final/: the policy as an HF folder, the critic in final/critic."""
    save_model(model, tokenizer, folder, card=card, merge_lora=merge)
    save_model(critic, tokenizer, folder / "critic", card=critic_card)


def card_lines(config: PPOConfig, result: TrainResult, critic_origin: str) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "objective/scores" in m), {})
    reward_model = [f"reward model {config.reward_model}"] if config.reward_model else []
    return {
        "method": f"PPO (GAE γ {config.gamma}, λ {config.lam}; clip {config.epsilon}; "
        f"vf_coef {config.vf_coef}; "
        f"β {config.beta}{f', adaptive to {config.kl_target} nats' if config.kl_target else ''})",
        "base model": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "rewards": ", ".join(to_dict(config)["reward_functions"] + reward_model),  # callables by name
        "critic": critic_origin,
        "steps": result.step,
        "learning rate": config.train.learning_rate,
        "final train score": f"{last.get('objective/scores', float('nan')):.4f}",
    }
