"""Defaults for real models, not the built-in task: learning rates of TRL and the papers, training length in
epochs unless max_steps is set; the built-in task's recipes live in the demo and examples/."""

from __future__ import annotations

import math

import pytest

from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.ppo_config import PPOConfig
from prefalign.algorithms.reward_model import RewardConfig
from prefalign.algorithms.sft import SFTConfig
from prefalign.cli import COMMANDS, main
from prefalign.commands.dpo import DPOCommandConfig
from prefalign.runtime.loop import total_steps_for

TRAINERS = [SFTConfig, DPOConfig, DPOCommandConfig, RewardConfig, GRPOConfig, PPOConfig]


@pytest.mark.parametrize("config_class", TRAINERS, ids=lambda cls: cls.__name__)
def test_training_length_is_epochs_unless_max_steps_is_set(config_class):
    train = config_class().train
    assert train.max_steps == 0 and train.epochs == 1.0  # DPO's was max_steps=250, overriding epochs
    assert total_steps_for(800, train) == math.ceil(800 / (train.batch_size * train.grad_accum))


def help_of(command, capsys) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_dpo_defaults_are_trls_for_full_fine_tuning(capsys):
    train = DPOConfig().train
    assert train.learning_rate == 1e-6 and train.batch_size == 8  # was 1e-4 and 32: the toy task's
    text = help_of("dpo", capsys)
    assert "TRL's DPOConfig" in text and "Zephyr" in text
    assert "--train.learning_rate (float, > 0, default 1e-06)" in text


@pytest.mark.parametrize("command", ["sft", "dpo", "reward", "grpo", "ppo"])
def test_each_learning_rate_says_where_it_comes_from(command, capsys):
    _, config_class = COMMANDS[command].load()
    assert config_class().train.learning_rate <= 2e-5
    train_line = next(line for line in help_of(command, capsys).splitlines() if line.startswith("  train: "))
    assert any(source in train_line for source in ("TRL", "InstructGPT", "DeepSeekMath"))
