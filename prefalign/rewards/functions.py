"""The registry of reward functions and their weighted combination."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefalign.errors import ConfigError
from prefalign.tasks.arithmetic import exact_match_reward

RewardFunction = Callable[..., list]

REWARD_FUNCTIONS: dict[str, RewardFunction] = {"exact_match": exact_match_reward}


def register_reward_function(name: str, function: RewardFunction) -> None:
    REWARD_FUNCTIONS[name] = function


def get_reward_function(name: str) -> RewardFunction:
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"reward function {name!r} could not be imported: {error}") from error
    raise ConfigError(
        f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCTIONS)} or an import path 'module:function'"
    )


@dataclass
class RewardFailure:
    """A sample whose reward could not be computed: it is dropped and counted, never scored 0."""

    function: str
    prompt_index: int
    reason: str


@dataclass
class WeightedRewards:
    """Several reward functions combined with weights; None results are left out of the sum (as in TRL)."""

    names: list[str]
    weights: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("at least one reward function is needed (reward_functions)")
        if not self.weights:
            self.weights = [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise ConfigError(f"reward_weights has {len(self.weights)} values for {len(self.names)} reward functions")
        self.functions = [get_reward_function(name) for name in self.names]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Sequence[Any]):
        """-> (total: list[float | None], per_function: dict[name, list[float | None]], failures).

        total is None where every function returned None or any function failed for that sample.
        """
        per_function: dict[str, list[float | None]] = {}
        failures: list[RewardFailure] = []
        for name, function in zip(self.names, self.functions, strict=True):
            per_function[name] = self._call_one(name, function, prompts, completions, columns, failures)
        failed = {failure.prompt_index for failure in failures}
        total: list[float | None] = []
        for index in range(len(completions)):
            parts = [(w, per_function[n][index]) for n, w in zip(self.names, self.weights, strict=True)]
            present = [(w, v) for w, v in parts if v is not None]
            total.append(None if index in failed or not present else sum(w * v for w, v in present))
        return total, per_function, failures

    @staticmethod
    def _call_one(name, function, prompts, completions, columns, failures) -> list[float | None]:
        try:
            values = list(function(prompts=list(prompts), completions=list(completions), **columns))
        except Exception:  # noqa: BLE001 - a user's function failing is reported, not fatal
            # Call it once per sample to find which ones fail; the others keep their rewards.
            values = [_call_single(name, function, prompts, completions, columns, i, failures) for i in range(len(completions))]
        if len(values) != len(completions):
            raise ConfigError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
        cleaned: list[float | None] = []
        for index, value in enumerate(values):
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(float(value))):
                failures.append(RewardFailure(name, index, f"returned {value!r}"))
                cleaned.append(None)
            else:
                cleaned.append(None if value is None else float(value))
        return cleaned


def _call_single(name, function, prompts, completions, columns, index, failures):
    try:
        single = {key: [value[index]] for key, value in columns.items()}
        return function(prompts=[prompts[index]], completions=[completions[index]], **single)[0]
    except Exception as error:  # noqa: BLE001
        failures.append(RewardFailure(name, index, f"raised {type(error).__name__}: {error}"))
        return None
