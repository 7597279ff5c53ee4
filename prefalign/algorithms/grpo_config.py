"""GRPO's configuration and the checks that run before anything loads (prefalign.algorithms.grpo runs it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from prefalign.algorithms.rl.prompts import DEFAULT_MAX_NEW_TOKENS
from prefalign.config import DataConfig, ModelConfig, TrainConfig, option
from prefalign.errors import ConfigError

logger = logging.getLogger("prefalign")



@dataclass
class GRPOConfig:
    model: ModelConfig = option(help="The policy to train (full or LoRA).", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows; extra columns (answer, ...) go to reward functions by name.",
        factory=lambda: DataConfig(max_length=1024),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder; batch sizes count completions.",
        factory=lambda: TrainConfig(learning_rate=1e-6, batch_size=64, schedule="constant"),
    )
    reward_functions: list[str] = option(
        help="Reward functions by name (exact_match, math_answer, format, length_penalty, "
             "...) or 'module:function'.",
        factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(
        None, "A reward model folder (prefalign reward) whose score is added to the reward functions'.",
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    num_generations: int = option(8, "G: completions sampled per prompt (at least 2).")
    max_new_tokens: int = option(
        0,
        f"Longest completion in tokens (L_max); 0 = {DEFAULT_MAX_NEW_TOKENS}, or less where the "
        "model's context leaves less room after the longest prompt (the value used is logged and "
        "written to config.yaml).",
    )
    temperature: float = option(1.0, "Sampling temperature; log-probs are scored at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling.")
    top_k: int = option(0, "Top-k sampling (0 = off).")
    generation_batch_size: int = option(0, "Sequences decoded together (0 = the whole rollout batch).")
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
    epsilon_low: float = option(0.2, "Lower clip range ε_low.")
    epsilon_high: float = option(0.2, "Upper clip range ε_high (DAPO's clip-higher: 0.28).")
    beta: float = option(0.0, "KL weight β; 0 loads no reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "Per-token KL estimator used in the loss.")
    num_iterations: int = option(1, "μ: optimisation passes over each rollout batch.")
    steps_per_generation: int = option(1, "Optimizer steps each rollout batch is split into.")
    dynamic_sampling: bool = option(
        False, "DAPO: drop groups with all-equal rewards and sample more prompts until the batch is full.",
    )
    max_sampling_rounds: int = option(
        4,
        "Dynamic sampling: most generation rounds per rollout batch; then train on what there is (logged).",
    )
    mask_truncated_completions: bool = option(
        False, "Exclude completions cut at max_new_tokens from the loss.",
    )
    overlong_buffer: int = option(
        0,
        "DAPO soft overlong penalty: L_cache tokens before max_new_tokens where the "
        "reward falls to −1 (0 = off).",
    )
    max_time: float = option(
        0.0, "Stop after this many seconds of training, at a rollout boundary (0 = no limit).",
    )
    eval_k: int = option(0, "Samples per eval prompt for pass@k (0 = greedy accuracy only).")
    log_completions_every: int = option(
        10, "Write a sample of completions to completions.jsonl every N optimizer steps (0 = never).",
    )
    num_completions_to_log: int = option(16, "Completions written each time.")


def check_config(config: GRPOConfig) -> None:
    per_step, group = config.train.batch_size * config.train.grad_accum, config.num_generations
    if group < 2:
        raise ConfigError(
            f"num_generations (G) must be at least 2 for group-relative advantages, got {group}"
        )
    if per_step % group:
        raise ConfigError(
            f"train.batch_size × train.grad_accum = {per_step} completions per optimizer step is not a "
            f"multiple of num_generations = {group}; change one of them (e.g. train.batch_size "
            f"{group * max(1, per_step // group)})"
        )
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0 for GRPO sampling, got {config.temperature}")
    if not (0 <= config.epsilon_low < 1 and config.epsilon_high >= 0):
        raise ConfigError(
            "need 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
            f"{config.epsilon_low}, {config.epsilon_high}"
        )
    for key in ("num_iterations", "steps_per_generation", "max_sampling_rounds"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    if config.max_new_tokens < 0:
        raise ConfigError(
            f"max_new_tokens must be at least 1 (or 0 = fit the model's context), got {config.max_new_tokens}"
        )
    # With max_new_tokens = 0 the upper bound is known only once it is fitted to the context (load_prompts).
    if config.overlong_buffer < 0 or (
        config.max_new_tokens and config.overlong_buffer > config.max_new_tokens
    ):
        raise ConfigError(
            f"overlong_buffer must be in [0, max_new_tokens], got {config.overlong_buffer} (max_new_tokens "
            f"{config.max_new_tokens})"
        )
    if config.beta < 0:
        raise ConfigError(f"beta must be >= 0, got {config.beta}")
    if config.beta > 0 and config.kl_estimator == "k1":
        # k1 = log π − log π_ref has expected gradient zero under on-policy samples: as a loss term it does
        # not pull the policy toward the reference (its value is still a fine KL metric).
        logger.warning(
            "grpo: kl_estimator=k1 as a loss term has zero expected gradient; use k3 (default) or k2 to "
            "regularise toward the reference"
        )
