"""The demo's recipes pin every key of their configs, and the example reward config is the built-in recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.ppo_config import PPOConfig
from prefalign.algorithms.reward_model import RewardConfig
from prefalign.commands import demo_recipes
from prefalign.config import apply_overrides, load_config
from prefalign.recipes.base_model import BaseConfig
from prefalign.recipes.iterative_dpo import IterativeDPOConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def flat_keys(mapping, prefix=""):
    """Dotted keys of a nested recipe; `columns` is a mapping-valued key of its own."""
    keys = set()
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "columns":
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def config_keys(config, prefix=""):
    """Dotted keys of every leaf field of a config (nested config sections are walked, not leaves)."""
    keys = set()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            keys |= config_keys(value, f"{prefix}{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


@pytest.mark.parametrize(
    ("config_class", "recipe"),
    [
        (BaseConfig, demo_recipes.BASE_MODEL),
        (RewardConfig, demo_recipes.REWARD),
        (DPOConfig, demo_recipes.DPO),
        (IterativeDPOConfig, demo_recipes.ITERATIVE_DPO),
        (GRPOConfig, demo_recipes.GRPO),
        (PPOConfig, demo_recipes.PPO),
    ],
)
def test_recipes_pin_every_key_of_their_config(config_class, recipe):
    """A new config field must be added to the demo's recipe (with the value the demo ran with), or the
    trainers' defaults could move the demo's numbers."""
    assert flat_keys(recipe) == config_keys(config_class())


def test_example_config_is_the_builtin_recipe():
    loaded = load_config(RewardConfig, EXAMPLES / "reward.yaml")
    recipe = apply_overrides(RewardConfig(), demo_recipes.REWARD)
    found = (loaded.model.name_or_path, loaded.data.path, loaded.data.max_length)
    assert found == ("builtin", ["builtin"], recipe.data.max_length)
    for key in ("learning_rate", "batch_size", "max_steps", "warmup_ratio", "schedule"):
        assert getattr(loaded.train, key) == getattr(recipe.train, key), key
    assert (loaded.rendering, loaded.group_by_length, loaded.mixed_precision) == ("auto", True, "auto")
