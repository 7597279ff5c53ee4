"""GRPO's configuration: every field's range, and the cross-field rules (`GRPOConfig.check`) that
prefalign.config.validate runs before anything loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prefalign.algorithms.rl.prompts import DEFAULT_MAX_NEW_TOKENS
from prefalign.algorithms.rl.rollout import check_monitors, monitor_functions_option
from prefalign.config import DataConfig, DistributedConfig, ModelConfig, TrainConfig, distributed_option
from prefalign.errors import ConfigError
from prefalign.options import check_model_location, option
from prefalign.rewards.functions import check_rewards


@dataclass
class GRPOConfig:
    model: ModelConfig = option(help="The policy to train (full or LoRA).", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows; extra columns (answer, ...) go to reward functions by name.",
        factory=lambda: DataConfig(max_length=1024),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder; batch sizes count completions. lr 1e-6 as TRL's GRPOConfig and "
             "DeepSeekMath (constant schedule there); one epoch over the prompts unless max_steps is set.",
        factory=lambda: TrainConfig(learning_rate=1e-6, batch_size=64, schedule="constant"),
    )
    distributed: DistributedConfig = distributed_option()
    reward_functions: list[str | Callable] = option(
        help="Reward functions by name (exact_match, math_answer, format, length_penalty, "
             "...) or 'module:function'.",
        factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(
        None, "A reward model folder (prefalign reward) whose score is added to the reward functions'.",
        check=check_model_location,
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    monitor_functions: list[str] = monitor_functions_option()
    num_generations: int = option(8, "G: completions sampled per prompt (at least 2).", low=2)
    max_new_tokens: int = option(
        0,
        f"Longest completion in tokens (L_max); 0 = {DEFAULT_MAX_NEW_TOKENS}, or less where the "
        "model's context leaves less room after the longest prompt (the value used is logged and "
        "written to config.yaml).",
        low=1, zero="fit the model's context",
    )
    temperature: float = option(
        1.0, "Sampling temperature; log-probs are scored at the same temperature.", above=0,
    )
    top_p: float = option(1.0, "Nucleus sampling.", above=0, high=1)
    top_k: int = option(0, "Top-k sampling (0 = off).", low=0)
    generation_batch_size: int = option(
        0, "Sequences decoded together (0 = the whole rollout batch).", low=0,
    )
    share_prompt: bool = option(
        True,
        "Training forward: run each prompt once and share its KV cache with its G completions (same values; "
        "off with gradient checkpointing).",
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = option(
        "dapo",
        "Token aggregation: grpo (per-sequence mean), dapo (token mean over the step), dr_grpo (token sum / "
        "(sequences × max_new_tokens)).",
    )
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token", "token = GRPO's per-token ratio; sequence = GSPO's length-normalised sequence ratio.",
    )
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Advantage scaling: group std (GRPO, sample std, δ = 1e-4), batch std, or none (Dr. GRPO).",
    )
    epsilon_low: float = option(0.2, "Lower clip range ε_low.", low=0, below=1)
    epsilon_high: float = option(0.2, "Upper clip range ε_high (DAPO's clip-higher: 0.28).", low=0)
    beta: float = option(
        0.0, "KL weight β; 0 loads no reference model, unless evaluations need it for eval/kl.", low=0
    )
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "Per-token KL estimator used in the loss.")
    num_iterations: int = option(1, "μ: optimisation passes over each rollout batch.", low=1)
    steps_per_generation: int = option(1, "Optimizer steps each rollout batch is split into.", low=1)
    dynamic_sampling: bool = option(
        False, "DAPO: drop groups with all-equal rewards and sample more prompts until the batch is full.",
    )
    max_sampling_rounds: int = option(
        4,
        "Dynamic sampling: most generation rounds per rollout batch; then train on what there is (logged).",
        low=1,
    )
    mask_truncated_completions: bool = option(
        False, "Exclude completions cut at max_new_tokens from the loss.",
    )
    overlong_buffer: int = option(
        0,
        "DAPO soft overlong penalty: L_cache tokens before max_new_tokens where the "
        "reward falls to −1 (0 = off).",
        low=0,
    )
    max_time: float = option(
        0.0, "Stop after this many seconds of training, at a rollout boundary (0 = no limit).", low=0,
    )
    eval_k: int = option(0, "Samples per eval prompt for pass@k (0 = greedy accuracy only).", low=0)
    log_completions_every: int = option(
        10, "Write a sample of completions to completions.jsonl every N optimizer steps (0 = never).",
        low=0,
    )
    num_completions_to_log: int = option(16, "Completions written each time.", low=0)

    def check(self, prefix: str = "") -> None:
        """The rules between fields (each field's own range is declared with it)."""
        per_step, group = self.train.batch_size * self.train.grad_accum, self.num_generations
        if per_step % group:
            raise ConfigError(
                f"train.batch_size × train.grad_accum = {per_step} completions per optimizer step is not a "
                f"multiple of num_generations = {group}; change one of them (e.g. train.batch_size "
                f"{group * max(1, per_step // group)})"
            )
        # With max_new_tokens = 0 the upper bound is known only once it is fitted to the context
        # (grpo.load_prompts checks it then).
        if self.max_new_tokens and self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(
                f"overlong_buffer must be in [0, max_new_tokens], got {self.overlong_buffer} (max_new_tokens "
                f"{self.max_new_tokens})"
            )
        check_rewards(self.reward_functions, self.reward_weights, self.reward_model, "GRPO")
        check_monitors(self.monitor_functions, prefix)
