"""PPO's configuration and the checks that run before anything loads (prefalign.algorithms.ppo runs it).
Knobs that GRPO has too keep GRPO's names (num_iterations, steps_per_generation, temperature, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.algorithms.rl.prompts import DEFAULT_MAX_NEW_TOKENS
from prefalign.algorithms.rl.rollout import check_monitors, monitor_functions_option
from prefalign.config import DataConfig, DistributedConfig, ModelConfig, TrainConfig, distributed_option
from prefalign.errors import ConfigError
from prefalign.options import check_model_location, option
from prefalign.rewards.functions import check_rewards


@dataclass
class PPOConfig:
    model: ModelConfig = option(help="The policy to train (full or LoRA).", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows; extra columns (answer, ...) go to reward functions by name.",
        factory=lambda: DataConfig(max_length=1024),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder; batch sizes count completions. lr 3e-6 as TRL's PPOConfig; one "
             "epoch over the prompts unless max_steps is set.",
        factory=lambda: TrainConfig(learning_rate=3e-6, batch_size=64, schedule="constant"),
    )
    distributed: DistributedConfig = distributed_option()
    reward_functions: list[str] = option(
        help="Reward functions by name (exact_match, math_answer, ...) or 'module:function'.",
        factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(
        None,
        "A reward model folder (prefalign reward) whose score is added to the reward functions'.",
        check=check_model_location,
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score.")
    monitor_functions: list[str] = monitor_functions_option()
    critic_model: str | None = option(
        None,
        "Folder to initialise the critic from; None = the reward model when it is a causal decoder sharing "
        "the policy's tokenizer, else the policy (a fresh value head).",
        check=check_model_location,
    )
    critic_learning_rate: float | None = option(
        None, "The critic's learning rate; None = train.learning_rate.", above=0
    )
    max_new_tokens: int = option(
        0,
        f"Longest completion; 0 = {DEFAULT_MAX_NEW_TOKENS}, or what the model's context leaves after the "
        "longest prompt.",
        low=1,
        zero="fit the model's context",
    )
    temperature: float = option(
        1.0, "Sampling temperature; log-probs are scored at the same temperature.", above=0
    )
    top_p: float = option(1.0, "Nucleus sampling.", above=0, high=1)
    top_k: int = option(0, "Top-k sampling (0 = off).", low=0)
    generation_batch_size: int = option(0, "Sequences decoded together (0 = the whole rollout batch).", low=0)
    share_prompt: bool = option(
        True,
        "Training forward: run each prompt once with its KV cache (off with gradient checkpointing).",
    )
    num_iterations: int = option(4, "PPO epochs over each rollout batch (TRL's num_ppo_epochs).", low=1)
    steps_per_generation: int = option(
        1, "Optimizer steps (minibatches) each rollout batch is split into.", low=1
    )
    beta: float = option(
        0.05, "KL penalty β in the per-token reward −β·(log π_old − log π_ref) (TRL's kl_coef).", low=0
    )
    kl_target: float | None = option(
        None,
        "Adaptive KL controller's target, in nats per sequence (Ziegler et al.: 6); None = fixed β.",
        above=0,
    )
    kl_horizon_factor: float = option(
        0.1, "K_β of the adaptive controller: β ← β(1 + K_β·clip(KL/target − 1, ±0.2)).", low=0, high=1
    )
    gamma: float = option(1.0, "GAE discount γ.", low=0, high=1)
    lam: float = option(0.95, "GAE λ.", low=0, high=1)
    epsilon: float = option(0.2, "Policy clip range ε.", above=0, below=1)
    value_clip: float = option(0.2, "Value clip range ε_v.", above=0)
    vf_coef: float = option(0.1, "Weight of the value loss (0.1 in the N+ implementation details).", low=0)
    whiten_rewards: bool = option(False, "Whiten the per-token rewards over the batch, keeping their mean.")
    missing_eos_penalty: float | None = option(
        -1.0,
        "Score given to a completion that ends without EOS (cut at max_new_tokens), replacing the reward, as "
        "in the N+ implementation details; None = keep its reward.",
        high=0,
    )
    max_time: float = option(
        0.0, "Stop after this many seconds of training, at a rollout boundary (0 = no limit).", low=0
    )
    eval_k: int = option(0, "Samples per eval prompt for pass@k (0 = greedy accuracy only).", low=0)
    log_completions_every: int = option(
        10, "Write sampled completions to completions.jsonl every N steps (0 = never).", low=0
    )
    num_completions_to_log: int = option(16, "Completions written each time.", low=0)

    def check(self, prefix: str = "") -> None:
        """The rules between fields (each field's own range is declared with it)."""
        if self.distributed.strategy == "fsdp":
            raise ConfigError(
                "PPO does not run under distributed.strategy fsdp yet (its policy and critic train as one "
                "module, which prefalign shards only for causal LMs so far): use --distributed.strategy ddp"
            )
        check_rewards(self.reward_functions, self.reward_weights, self.reward_model, "PPO")
        check_monitors(self.monitor_functions, prefix)
