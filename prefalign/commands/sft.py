"""`prefalign sft`: supervised fine-tuning on prompt/completion rows (the built-in task's demonstrations by
default)."""

from __future__ import annotations

from prefalign.algorithms import sft as algorithm
from prefalign.algorithms.sft import SFTConfig
from prefalign.commands.builtin import resolve_builtin
from prefalign.config import validate
from prefalign.runtime.loop import TrainResult


def sft(
    config: SFTConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, save: bool = True,
) -> TrainResult:
    """Check the config, resolve `builtin`, then train (prefalign.algorithms.sft.sft, whose keyword arguments
    these are)."""
    validate(config)
    dataset, eval_dataset = resolve_builtin(
        config, "sft", dataset=dataset, eval_dataset=eval_dataset, model=model,
    )
    return algorithm.sft(
        config, dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, save=save,
    )
