"""What a user sees: which data a command uses (a warning first when it is the built-in task), and the summary
every training command ends with."""

from __future__ import annotations

import logging

import pytest

from prefalign.algorithms.sft import SFTConfig
from prefalign.cli import main
from prefalign.commands import builtin
from prefalign.commands.summary import training_summary
from prefalign.runtime.loop import TrainResult
from tests.helpers import save_tiny_model, write_jsonl


def test_the_built_in_task_is_announced_before_anything_else(monkeypatch, caplog):
    def no_base_model():
        raise RuntimeError("stop: building the base model comes after the announcement")

    monkeypatch.setattr(builtin, "ensure_base_model", no_base_model)
    with caplog.at_level(logging.INFO, logger="prefalign"), pytest.raises(RuntimeError, match="stop"):
        builtin.resolve_builtin(SFTConfig(), "sft")
    first = caplog.records[0]
    assert first.levelno == logging.WARNING and "BUILT-IN arithmetic task" in first.getMessage()
    assert "--data.path" in first.getMessage()


def test_a_users_data_is_named(caplog):
    config = SFTConfig()
    config.data.path = ["pairs.jsonl"]
    with caplog.at_level(logging.INFO, logger="prefalign"):
        builtin.announce_data(config.data, "sft")
    assert caplog.records[0].levelno == logging.INFO and "data: pairs.jsonl" in caplog.text


def test_a_training_command_ends_with_a_summary(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny")
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    run = tmp_path / "run"
    code = main([
        "sft", "--model.name_or_path", str(model_dir), "--data.path", data, "--train.output_dir", str(run),
        "--train.max_steps", "2", "--train.batch_size", "4", "--progress", "false", "--eval_fraction", "0.25",
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = "\n".join(out[-5:])
    assert "prefalign sft: done, 2 steps" in summary
    assert f"model:   {run / 'final'}" in summary
    assert "train:   loss " in summary and "eval:    loss " in summary
    assert "s wall" in summary and "tokens/s" in summary


def test_summary_picks_each_algorithms_metrics(tmp_path):
    metrics = [
        {"step": 1, "loss": 0.7, "rewards/accuracies": 0.5, "tokens_per_second": 100.0, "step_time": 1.0},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.75, "tokens_per_second": 300.0, "step_time": 1.0},
        {"step": 2, "eval/loss": 0.65, "eval/rewards/accuracies": 0.6},
    ]
    text = training_summary("dpo", TrainResult(step=2, metrics=metrics, run_dir=tmp_path, wall_time=2.5))
    assert "rewards/accuracies 0.75" in text and "eval:    loss 0.65, rewards/accuracies 0.6" in text
    assert "200 tokens/s" in text and "2.5 s wall" in text and "not saved" in text
