"""`prefalign ppo`: PPO with a learned critic on prompt-only rows (the built-in task's prompts by default)."""

from __future__ import annotations

from prefalign.algorithms import ppo as algorithm
from prefalign.algorithms.ppo_config import PPOConfig
from prefalign.commands.builtin import resolve_builtin
from prefalign.config import validate
from prefalign.runtime.loop import TrainResult


def ppo(config: PPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
        save: bool = True) -> TrainResult:  # fmt: skip
    """Check the config, resolve `builtin`, then train (prefalign.algorithms.ppo.ppo, whose keyword arguments
    these are)."""
    validate(config)
    dataset, eval_dataset = resolve_builtin(
        config, "prompts", dataset=dataset, eval_dataset=eval_dataset, model=model
    )
    return algorithm.ppo(config, dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer,
                         reference=reference, save=save)  # fmt: skip
