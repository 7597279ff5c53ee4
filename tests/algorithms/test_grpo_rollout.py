"""GRPO's rollout batch: a sample without a score keeps its group (advantage 0, out of the loss, counted);
the group's statistics come from its scored samples only."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign import GRPOConfig, grpo
from prefalign.algorithms.grpo_rollout import advantages_of
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.rewards import register_reward_function
from prefalign.tasks.arithmetic import prompt_dataset
from tests.helpers import save_tiny_model

G = 4


def test_unscored_samples_are_left_out_of_their_groups_statistics():
    nan = math.nan
    scores = torch.tensor([[nan, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [nan, nan, 0.5, nan]])
    advantages = advantages_of(scores, GRPOConfig(num_generations=G))
    # Group 0 by hand from its scored rewards (1, 0, 1): mean 2/3, sample std sqrt(1/3), δ = 1e-4.
    std = math.sqrt(1 / 3) + 1e-4
    expected_first = [0.0, (1 - 2 / 3) / std, (0 - 2 / 3) / std, (1 - 2 / 3) / std]
    assert advantages[0].tolist() == pytest.approx(expected_first, abs=1e-6)
    # A group without unscored samples is computed as before: (0, 1, 1, 0), std sqrt(1/3).
    assert advantages[1].tolist() == pytest.approx([-0.5 / std, 0.5 / std, 0.5 / std, -0.5 / std], abs=1e-6)
    assert advantages[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # one scored sample: nothing to compare it with


def first_of_each_group_unscored(prompts, completions, **_columns):
    """None for the first sample of every group (completions come group by group), the length otherwise."""
    return [None if index % G == 0 else float(len(str(c))) for index, c in enumerate(completions)]


register_reward_function("test_first_unscored", first_of_each_group_unscored)


def test_a_group_with_an_unscored_sample_trains_on_the_rest(tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "model"))
    config = GRPOConfig(
        model=ModelConfig(name_or_path=model_dir, device="cpu"), data=DataConfig(max_length=32),
        train=TrainConfig(output_dir=str(tmp_path / "run"), learning_rate=1e-2, batch_size=8, max_steps=2,
                          progress=False),
        reward_functions=["test_first_unscored"], num_generations=G, max_new_tokens=4,
    )  # fmt: skip
    result = grpo(config, dataset=prompt_dataset("train", limit=16))
    for record in (m for m in result.metrics if "loss" in m):
        assert record["rewards/unscored_samples"] == 2  # two groups per step, one unscored sample each
        assert record["rewards/dropped_groups"] == 0 and record["groups_trained"] == 2
        assert math.isfinite(record["loss"])
