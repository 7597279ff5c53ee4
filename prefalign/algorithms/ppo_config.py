"""PPO's configuration and the checks that run before anything loads (prefalign.algorithms.ppo runs it).
Knobs that GRPO has too keep GRPO's names (num_iterations, steps_per_generation, temperature, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.algorithms.rl.prompts import DEFAULT_MAX_NEW_TOKENS
from prefalign.config import DataConfig, ModelConfig, TrainConfig, option
from prefalign.errors import ConfigError


@dataclass
class PPOConfig:
    model: ModelConfig = option(help="The policy to train (full or LoRA).", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows; extra columns (answer, ...) go to reward functions by name.",
        factory=lambda: DataConfig(max_length=1024),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder; batch sizes count completions. lr 3e-6 as TRL's PPOConfig.",
        factory=lambda: TrainConfig(learning_rate=3e-6, batch_size=64, schedule="constant"),
    )
    reward_functions: list[str] = option(
        help="Reward functions by name (exact_match, math_answer, ...) or 'module:function'.",
        factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(
        None,
        "A reward model folder (prefalign reward) whose score is added to the reward functions'.",
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    monitor_functions: list[str] = option(
        help="Gold monitor: reward functions that score the same completions without being optimised, logged "
        "as monitor/<name>/mean (reward hacking shows as the proxy rising while the gold falls).",
        factory=list,
    )
    critic_model: str | None = option(
        None,
        "Folder to initialise the critic from; None = the reward model when it is a causal decoder sharing "
        "the policy's tokenizer, else the policy (a fresh value head).",
    )
    critic_learning_rate: float | None = option(
        None, "The critic's learning rate; None = train.learning_rate."
    )
    max_new_tokens: int = option(
        0,
        f"Longest completion; 0 = {DEFAULT_MAX_NEW_TOKENS}, or what the model's context leaves after the "
        "longest prompt.",
    )
    temperature: float = option(1.0, "Sampling temperature; log-probs are scored at the same temperature.")
    top_p: float = option(1.0, "Nucleus sampling.")
    top_k: int = option(0, "Top-k sampling (0 = off).")
    generation_batch_size: int = option(0, "Sequences decoded together (0 = the whole rollout batch).")
    share_prompt: bool = option(
        True,
        "Training forward: run each prompt once with its KV cache (off with gradient checkpointing).",
    )
    num_iterations: int = option(4, "PPO epochs over each rollout batch (TRL's num_ppo_epochs).")
    steps_per_generation: int = option(1, "Optimizer steps (minibatches) each rollout batch is split into.")
    beta: float = option(
        0.05, "KL penalty β in the per-token reward −β·(log π_old − log π_ref) (TRL's kl_coef)."
    )
    kl_target: float | None = option(
        None,
        "Adaptive KL controller's target, in nats per sequence (Ziegler et al.: 6); None = fixed β.",
    )
    kl_horizon_factor: float = option(
        0.1, "K_β of the adaptive controller: β ← β(1 + K_β·clip(KL/target − 1, ±0.2))."
    )
    gamma: float = option(1.0, "GAE discount γ.")
    lam: float = option(0.95, "GAE λ.")
    epsilon: float = option(0.2, "Policy clip range ε.")
    value_clip: float = option(0.2, "Value clip range ε_v.")
    vf_coef: float = option(0.1, "Weight of the value loss (0.1 in the N+ implementation details).")
    whiten_rewards: bool = option(False, "Whiten the per-token rewards over the batch, keeping their mean.")
    missing_eos_penalty: float | None = option(
        -1.0,
        "Score given to a completion that ends without EOS (cut at max_new_tokens), replacing the reward, as "
        "in the N+ implementation details; None = keep its reward.",
    )
    max_time: float = option(
        0.0, "Stop after this many seconds of training, at a rollout boundary (0 = no limit)."
    )
    eval_k: int = option(0, "Samples per eval prompt for pass@k (0 = greedy accuracy only).")
    log_completions_every: int = option(
        10, "Write sampled completions to completions.jsonl every N steps (0 = never)."
    )
    num_completions_to_log: int = option(16, "Completions written each time.")


def check_config(config: PPOConfig) -> None:
    for key in ("num_iterations", "steps_per_generation"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    if not config.temperature > 0:
        raise ConfigError(f"temperature must be > 0 for PPO sampling, got {config.temperature}")
    if config.max_new_tokens < 0:
        raise ConfigError(
            f"max_new_tokens must be >= 0 (0 = fit the model's context), got {config.max_new_tokens}"
        )
    for key in ("beta", "vf_coef", "epsilon", "value_clip", "kl_horizon_factor"):
        if not getattr(config, key) >= 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(config, key)}")
    if not (0 <= config.gamma <= 1 and 0 <= config.lam <= 1):
        raise ConfigError(f"gamma and lam must be in [0, 1], got {config.gamma} and {config.lam}")
    if config.kl_target is not None and not config.kl_target > 0:
        raise ConfigError(
            f"kl_target must be > 0 nats per sequence (or None for a fixed beta), got {config.kl_target}"
        )
    if config.critic_learning_rate is not None and not config.critic_learning_rate > 0:
        raise ConfigError(f"critic_learning_rate must be > 0, got {config.critic_learning_rate}")
