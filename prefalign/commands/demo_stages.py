"""The demo's stages: each trains from the base model with its pinned recipe, evaluates on held-out prompts
and adds a row to the report. `DemoContext` is what they share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.algorithms.dpo import DPOConfig, loss_types
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.ppo_config import PPOConfig
from prefalign.algorithms.reward_model import RewardConfig
from prefalign.commands import demo_recipes as recipes
from prefalign.commands.dpo import dpo
from prefalign.commands.grpo import grpo
from prefalign.commands.ppo import ppo
from prefalign.commands.reward import reward
from prefalign.config import DataConfig, ModelConfig, apply_overrides
from prefalign.data import tokenize_prompts
from prefalign.evaluation.pairs import roc_auc
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import load_causal_lm
from prefalign.recipes.base_model import BaseConfig, ensure_base_model
from prefalign.recipes.iterative_dpo import IterativeDPOConfig
from prefalign.rewards import WeightedRewards
from prefalign.rewards.scorer import RewardModelScorer
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from prefalign.tasks.arithmetic import exact_match_reward, prompt_dataset


@dataclass
class DemoContext:
    """What stages share: the demo's settings, where to write, the base model, the report so far."""

    seed: int
    num_threads: int
    eval_prompts: int
    run_dir: Path
    base_path: Path | None = None
    base_metrics: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def held_out_prompts(self, tokenizer):
        prompts, _ = tokenize_prompts(
            prompt_dataset("held_out", limit=self.eval_prompts), tokenizer, DataConfig(),
        )
        return prompts

    def evaluate(self, model, tokenizer, *, reference=None) -> dict[str, float]:
        """Held-out greedy accuracy, mean reward, pass@8 (and KL to `reference`) on the task."""
        prompts = self.held_out_prompts(tokenizer)
        rewards = WeightedRewards(["exact_match"])
        return evaluate_policy(
            model, tokenizer, prompts, rewards, reference=reference, seed=self.seed, **recipes.EVALUATION,
        )

    def evaluate_proxy(self, model, tokenizer, reward_dir: str) -> float:
        """The reward model's mean score of the held-out greedy answers (the proxy that PPO optimises)."""
        prompts = self.held_out_prompts(tokenizer)
        rewards = WeightedRewards([f"reward_model:{reward_dir}"])
        settings = {**recipes.EVALUATION, "k": 0}
        return evaluate_policy(model, tokenizer, prompts, rewards, seed=self.seed, **settings)["mean_reward"]

    def recipe(
        self, config_class: type, recipe: dict[str, Any], folder: str, *, num_threads: int | None = None,
    ):
        """The stage's config: the pinned recipe, then what belongs to this run (base model, folder, seed,
        threads)."""
        config = apply_overrides(config_class(), recipe)
        config.model.name_or_path = str(self.base_path)
        config.train.output_dir = str(self.run_dir / folder)
        config.train.seed = self.seed
        config.train.num_threads = self.num_threads if num_threads is None else num_threads
        return config

    def base_model(self, *, trainable: bool = False):
        return load_causal_lm(ModelConfig(name_or_path=str(self.base_path)), trainable=trainable)


def base_stage(context: DemoContext) -> dict[str, Any]:
    context.base_path = ensure_base_model(apply_overrides(BaseConfig(), recipes.BASE_MODEL))
    model, tokenizer = context.base_model()
    metrics = context.evaluate(model, tokenizer)
    context.base_metrics = metrics
    context.lines.append(
        f"| base (SFT) | held-out greedy accuracy {metrics['accuracy']:.3f}, pass@8 {metrics['pass@8']:.3f}, "
        f"mean reward {metrics['mean_reward']:.3f} | model: `{context.base_path}` |"
    )
    return metrics


def sample_auc(
    scorer: RewardModelScorer, policy, tokenizer, *, num_prompts: int, samples: int, seed: int,
) -> dict[str, Any]:
    """AUC of the reward model's score against exact-match correctness on the policy's own samples of
    held-out prompts (temperature 1): the distribution rejection sampling and GRPO will feed it."""
    prompts, _ = tokenize_prompts(prompt_dataset("held_out", limit=num_prompts), tokenizer, DataConfig())
    engine = LocalEngine(policy, tokenizer, batch_size=128)
    params = SamplingParams(n=samples, temperature=1.0, max_new_tokens=8, seed=seed)
    generated = engine.generate([list(ids) for ids in prompts["prompt_ids"]], params)
    flat_prompts = [prompt for prompt, group in zip(prompts["prompt"], generated, strict=True) for _ in group]
    texts = [sample.text for group in generated for sample in group]
    answers = [answer for answer, group in zip(prompts["answer"], generated, strict=True) for _ in group]
    correct = [value == 1.0 for value in exact_match_reward(flat_prompts, texts, answers)]
    scores = scorer.score(flat_prompts, texts, allow_empty=True)
    return {
        "auc": roc_auc(scores, correct), "samples": len(texts),
        "correct_fraction": sum(correct) / len(correct),
    }


def reward_stage(context: DemoContext) -> dict[str, Any]:
    """Train the built-in reward model; report held-out accuracy, AUC on base-model samples and time."""
    started = time.perf_counter()
    result = reward(context.recipe(RewardConfig, recipes.REWARD, "reward"))
    train_seconds = time.perf_counter() - started
    scorer = RewardModelScorer(str(result.model_dir), batch_size=64)
    policy, tokenizer = context.base_model()
    auc = sample_auc(
        scorer, policy, tokenizer, num_prompts=recipes.AUC_PROMPTS, samples=recipes.AUC_SAMPLES,
        seed=context.seed,
    )
    auc_text = "n/a (every sample right or every sample wrong)" if auc["auc"] is None else f"{auc['auc']:.3f}"
    evaluation = result.evaluation
    context.lines.append(
        f"| reward model | held-out pairwise accuracy {evaluation['accuracy']:.3f} (95% CI "
        f"{evaluation['accuracy_ci95_low']:.3f}-{evaluation['accuracy_ci95_high']:.3f}, "
        f"{evaluation['num_pairs']} pairs); AUC {auc_text} against exact match on {auc['samples']} "
        f"base-model samples ({auc['correct_fraction']:.2f} correct) | {result.step} steps, "
        f"{train_seconds:.0f} s to train; model: `{result.model_dir}` |"
    )
    return {"model_dir": str(result.model_dir), "evaluation": evaluation,
            **{f"sample_{k}": v for k, v in auc.items()},
            "steps": result.step, "train_seconds": round(train_seconds, 1)}  # fmt: skip


def dpo_stage(context: DemoContext) -> dict[str, Any]:
    """DPO (+ RPO) on the built-in task's pairs from the base model, judged on held-out prompts."""
    started = time.perf_counter()
    # One thread unless asked: this model's steps are many small ops, and on a busy 2-core machine two OpenMP
    # threads spin against other processes (measured 0.88 s per step against 0.10 s with one).
    config = context.recipe(DPOConfig, recipes.DPO, "dpo", num_threads=context.num_threads or 1)
    threads = torch.get_num_threads()
    try:
        result = dpo(config)
    finally:
        torch.set_num_threads(threads)
    policy, tokenizer = load_causal_lm(
        ModelConfig(name_or_path=str(result.run_dir / "final")), trainable=False,
    )
    base, _ = context.base_model()
    after = context.evaluate(policy, tokenizer, reference=base)
    before = context.base_metrics
    held_out = next(m for m in reversed(result.metrics) if "eval/rewards/accuracies" in m)
    wall = time.perf_counter() - started
    gain = 100 * (after["accuracy"] - before["accuracy"])
    rpo = f" + RPO α={config.rpo_alpha:g}" if config.rpo_alpha else ""
    context.lines.append(
        f"| DPO ({', '.join(loss_types(config))}{rpo}, β={config.beta:g}) | held-out greedy accuracy "
        f"{before['accuracy']:.3f} → {after['accuracy']:.3f} ({gain:+.1f} points), mean reward "
        f"{before['mean_reward']:.3f} → {after['mean_reward']:.3f}, implicit-reward accuracy "
        f"{held_out['eval/rewards/accuracies']:.3f}, KL to base {after['kl']:.3f} nats | {result.step} steps "
        f"× {config.train.batch_size} pairs (correct vs near-miss), {wall:.0f} s with evaluation; model: "
        f"`{result.run_dir / 'final'}` |"
    )
    return {"before": before, "after": after, "implicit_reward_accuracy": held_out["eval/rewards/accuracies"],
            "steps": result.step, "wall_seconds": wall, "model": str(result.run_dir / "final")}  # fmt: skip


def iterative_stage(context: DemoContext) -> dict[str, Any]:
    """Rejection sampling + on-policy DPO rounds from the base model; held-out accuracy per round."""
    started = time.perf_counter()
    model, tokenizer = context.base_model(trainable=True)
    config = context.recipe(IterativeDPOConfig, recipes.ITERATIVE_DPO, "iterative_dpo")
    config.sampling.eval_prompts = context.eval_prompts
    result = dpo(config, model=model, tokenizer=tokenizer)
    reference, _ = context.base_model()
    after = context.evaluate(model, tokenizer, reference=reference)
    rounds = [record for record in result.metrics if "heldout/accuracy" in record]
    per_round = " → ".join(f"{record['heldout/accuracy']:.3f}" for record in rounds)
    pairs = [record["sample/pairs"] for record in result.metrics if "sample/pairs" in record]
    wall = time.perf_counter() - started
    sampling = config.sampling
    context.lines.append(
        f"| rejection sampling + iterative DPO ({config.rounds} rounds, RPO α={config.rpo_alpha:g}, "
        f"β={config.beta:g}, reference: {config.round_reference}) | held-out greedy accuracy per round "
        f"{per_round}; pass@8 {context.base_metrics.get('pass@8', float('nan')):.3f} → "
        f"{after['pass@8']:.3f}, KL to base {after['kl']:.3f} nats | each round: {sampling.n} samples for "
        f"each of {sampling.prompts_per_round} training prompts, best vs worst, {', '.join(map(str, pairs))} "
        f"pairs, {config.train.max_steps} DPO steps × {config.train.batch_size}; {wall:.0f} s; report: "
        f"`{result.run_dir / 'report.md'}` |"
    )
    return {"accuracy_per_round": [record["heldout/accuracy"] for record in rounds], "after": after,
            "pairs_per_round": pairs, "steps": result.step, "wall_seconds": wall,
            "model": str(result.run_dir / "final")}  # fmt: skip


def grpo_stage(context: DemoContext) -> dict[str, Any]:
    """GRPO with the exact-match reward from the base model; held-out accuracy before and after."""
    model, tokenizer = context.base_model(trainable=True)
    config = context.recipe(GRPOConfig, recipes.GRPO, "grpo")
    started = time.perf_counter()
    result = grpo(config, model=model, tokenizer=tokenizer)
    reference, _ = context.base_model()
    after = context.evaluate(model, tokenizer, reference=reference)
    wall = time.perf_counter() - started
    before = context.base_metrics
    prompts = config.train.batch_size // config.num_generations
    context.lines.append(
        f"| GRPO (exact-match reward) | held-out greedy accuracy {before.get('accuracy', float('nan')):.3f} "
        f"→ {after['accuracy']:.3f}, pass@8 {before.get('pass@8', float('nan')):.3f} → "
        f"{after['pass@8']:.3f}, KL to base {after['kl']:.3f} nats | {result.step} steps × {prompts} prompts "
        f"× G={config.num_generations}, lr {config.train.learning_rate:g}, loss {config.loss_type}, β "
        f"{config.beta:g}; {wall:.0f} s |"
    )
    return {
        "after": after, "steps": result.step, "wall_seconds": wall, "model": str(result.run_dir / "final"),
    }


def ppo_stage(context: DemoContext) -> dict[str, Any]:
    """PPO with the reward stage's model as the only reward (the proxy) and exact match as the gold monitor,
    from the base model; held-out greedy accuracy, the proxy's score of held-out greedy answers, KL."""
    reward_dir = context.results["reward"]["model_dir"]
    model, tokenizer = context.base_model(trainable=True)
    config = context.recipe(PPOConfig, recipes.PPO, "ppo")
    config.reward_model = reward_dir
    started = time.perf_counter()
    result = ppo(config, model=model, tokenizer=tokenizer)
    reference, _ = context.base_model()
    after = context.evaluate(model, tokenizer, reference=reference)
    proxy = {
        name: context.evaluate_proxy(policy, tokenizer, reward_dir)
        for name, policy in (("before", reference), ("after", model))
    }
    wall = time.perf_counter() - started
    before = context.base_metrics
    rollouts = [record for record in result.metrics if "monitor/exact_match/mean" in record]
    gold = [record["monitor/exact_match/mean"] for record in rollouts]
    gain = 100 * (after["accuracy"] - before.get("accuracy", float("nan")))
    kl_rule = f"adaptive β to {config.kl_target:g} nats" if config.kl_target else f"β {config.beta:g}"
    context.lines.append(
        f"| PPO (reward model as the reward, exact match as the gold monitor) | held-out greedy accuracy "
        f"{before.get('accuracy', float('nan')):.3f} → {after['accuracy']:.3f} ({gain:+.1f} points), pass@8 "
        f"{before.get('pass@8', float('nan')):.3f} → {after['pass@8']:.3f}, reward-model score of held-out "
        f"greedy answers {proxy['before']:.3f} → {proxy['after']:.3f}, KL to base {after['kl']:.3f} nats | "
        f"{result.step} steps × {config.train.batch_size} completions, {config.num_iterations} PPO epochs, "
        f"lr {config.train.learning_rate:g}, {kl_rule}; monitored exact match of the rollouts "
        f"{gold[0]:.3f} (first) → {max(gold):.3f} (best) → {gold[-1]:.3f} (last); {wall:.0f} s. The "
        "least-bad recipe, not a gain: with this reward model no PPO recipe tried beats noise, and longer "
        "runs raise the proxy while accuracy falls (BENCHMARKS.md, PPO) |"
    )
    return {
        "after": after, "proxy_before": proxy["before"], "proxy_after": proxy["after"],
        "monitor_first": gold[0], "monitor_best": max(gold), "monitor_last": gold[-1], "steps": result.step,
        "wall_seconds": wall, "model": str(result.run_dir / "final"),
    }  # fmt: skip


STAGES: dict[str, Callable[[DemoContext], dict[str, Any]]] = {
    "base": base_stage,
    "reward": reward_stage,
    "dpo": dpo_stage,
    "iterative": iterative_stage,
    "grpo": grpo_stage,
    "ppo": ppo_stage,
}

# Stages that need another's results run it first when it was not asked for (the base always runs).
NEEDS: dict[str, list[str]] = {"ppo": ["reward"]}
