"""prefalign: the preference-alignment stage of LLM post-training in one package.

The public API (what the README uses; these names stay where they are when modules move):

    from prefalign import dpo, DPOConfig, IterativeDPOConfig, grpo, GRPOConfig, sft, SFTConfig
    from prefalign import reward, RewardConfig, sample, SampleConfig, evaluate, EvalConfig

Each function is the command of the same name: `builtin` model paths and `data.path: builtin` are resolved
there, and `dpo` runs iterative DPO when given an IterativeDPOConfig with rounds > 1. Names are imported on
first use, so `import prefalign` stays light (no torch until a command is called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from prefalign.errors import ConfigError, DataError, ModelError, OutputError, PrefalignError, TrainingError
from prefalign.version import __version__

# name -> module that defines it (the commands layer, or the lower layer for types and helpers)
_PUBLIC = {
    "sft": "prefalign.commands.sft", "SFTConfig": "prefalign.algorithms.sft",
    "dpo": "prefalign.commands.dpo", "DPOConfig": "prefalign.algorithms.dpo",
    "IterativeDPOConfig": "prefalign.recipes.iterative_dpo",
    "grpo": "prefalign.commands.grpo", "GRPOConfig": "prefalign.algorithms.grpo_config",
    "ppo": "prefalign.commands.ppo", "PPOConfig": "prefalign.algorithms.ppo_config",
    "reward": "prefalign.commands.reward", "RewardConfig": "prefalign.algorithms.reward_model",
    "eval_reward": "prefalign.commands.reward", "EvalRewardConfig": "prefalign.commands.reward",
    "sample": "prefalign.commands.sample", "SampleConfig": "prefalign.algorithms.rejection_sampling_config",
    "evaluate": "prefalign.commands.eval", "EvalConfig": "prefalign.commands.eval",
    "score": "prefalign.commands.score", "ScoreConfig": "prefalign.commands.score",
    "demo": "prefalign.commands.demo", "DemoConfig": "prefalign.commands.demo",
    "base": "prefalign.commands.base", "BaseConfig": "prefalign.recipes.base_model",
    "ensure_base_model": "prefalign.recipes.base_model",
    "RewardModelScorer": "prefalign.rewards.scorer",
    "WeightedRewards": "prefalign.rewards.functions",
    "register_reward_function": "prefalign.rewards.functions", "load_config": "prefalign.config",
    "ModelConfig": "prefalign.config", "DataConfig": "prefalign.config", "TrainConfig": "prefalign.config",
}

__all__ = [
    "ConfigError", "DataError", "ModelError", "OutputError", "PrefalignError", "TrainingError", "__version__",
    "sft",
    "SFTConfig",
    "dpo",
    "DPOConfig",
    "IterativeDPOConfig",
    "grpo",
    "ppo",
    "PPOConfig",
    "GRPOConfig",
    "reward",
    "RewardConfig",
    "eval_reward",
    "EvalRewardConfig",
    "sample",
    "SampleConfig",
    "evaluate",
    "EvalConfig",
    "score",
    "ScoreConfig",
    "demo",
    "DemoConfig",
    "base",
    "BaseConfig",
    "ensure_base_model",
    "RewardModelScorer",
    "WeightedRewards",
    "register_reward_function",
    "load_config",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for editors and type checkers; at run time the table above is used
    from prefalign.algorithms.dpo import DPOConfig
    from prefalign.algorithms.grpo_config import GRPOConfig
    from prefalign.algorithms.ppo_config import PPOConfig
    from prefalign.algorithms.rejection_sampling_config import SampleConfig
    from prefalign.algorithms.reward_model import RewardConfig
    from prefalign.algorithms.sft import SFTConfig
    from prefalign.commands.base import base
    from prefalign.commands.demo import DemoConfig, demo
    from prefalign.commands.dpo import dpo
    from prefalign.commands.eval import EvalConfig, evaluate
    from prefalign.commands.grpo import grpo
    from prefalign.commands.ppo import ppo
    from prefalign.commands.reward import EvalRewardConfig, eval_reward, reward
    from prefalign.commands.sample import sample
    from prefalign.commands.score import ScoreConfig, score
    from prefalign.commands.sft import sft
    from prefalign.config import DataConfig, ModelConfig, TrainConfig, load_config
    from prefalign.recipes.base_model import BaseConfig, ensure_base_model
    from prefalign.recipes.iterative_dpo import IterativeDPOConfig
    from prefalign.rewards.functions import WeightedRewards, register_reward_function
    from prefalign.rewards.scorer import RewardModelScorer
