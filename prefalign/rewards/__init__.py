"""Reward functions and scorers.

A reward function has the signature TRL users already have:
`fn(prompts, completions, **columns) -> list[float | None]`, dataset columns (such as `answer`) passed by
name; None means "not applicable to this sample". Functions are looked up by name here, or given as an
import path `package.module:function`.
"""

# registers math_answer, format, length_penalty, ...
from prefalign.rewards import math as _math_rewards  # noqa: F401
from prefalign.rewards.functions import (
    REWARD_FUNCTIONS,
    GroupScores,
    RewardFailure,
    RewardFunction,
    WeightedRewards,
    describe_failures,
    get_reward_function,
    register_reward_function,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "GroupScores",
    "RewardFailure",
    "RewardFunction",
    "WeightedRewards",
    "describe_failures",
    "get_reward_function",
    "register_reward_function",
    "RewardModelScorer",
]


def __getattr__(name: str):
    # The reward-model scorer pulls in transformers: imported on first use, not with the registry.
    if name == "RewardModelScorer":
        from prefalign.rewards.scorer import RewardModelScorer

        return RewardModelScorer
    raise AttributeError(f"module 'prefalign.rewards' has no attribute {name!r}")
