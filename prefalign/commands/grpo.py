"""`prefalign grpo`: GRPO and its variants on prompt-only rows (the built-in task's prompts by default)."""

from __future__ import annotations

from prefalign.algorithms import grpo as algorithm
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.commands.builtin import resolve_builtin
from prefalign.config import validate
from prefalign.runtime.loop import TrainResult


def grpo(
    config: GRPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, reference=None,
    save: bool = True,
) -> TrainResult:
    """Check the config, resolve `builtin`, then train (prefalign.algorithms.grpo.grpo, whose keyword
    arguments these are)."""
    validate(config)
    dataset, eval_dataset = resolve_builtin(
        config, "prompts", dataset=dataset, eval_dataset=eval_dataset, model=model,
    )
    return algorithm.grpo(
        config, dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer,
        reference=reference, save=save,
    )
