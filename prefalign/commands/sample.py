"""`prefalign sample`: rejection sampling from the policy (the built-in task's training prompts by
default)."""

from __future__ import annotations

from prefalign.algorithms import rejection_sampling as algorithm
from prefalign.algorithms.rejection_sampling import SampleOutput
from prefalign.algorithms.rejection_sampling_config import SampleConfig
from prefalign.commands.builtin import resolve_builtin
from prefalign.config import validate


def sample(config: SampleConfig, *, dataset=None, model=None, tokenizer=None) -> SampleOutput:
    """Check the config, resolve `builtin`, then sample (prefalign.algorithms.rejection_sampling.sample)."""
    validate(config)
    dataset, _ = resolve_builtin(config, "prompts", dataset=dataset, model=model)
    return algorithm.sample(config, dataset=dataset, model=model, tokenizer=tokenizer)
