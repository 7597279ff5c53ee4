"""`prefalign grpo` from the command line: a config error exits with 2; a run writes its model and metrics."""

from __future__ import annotations

from prefalign.cli import main
from prefalign.runtime.metrics import read_metrics
from tests.helpers import save_tiny_model


def test_cli_runs_grpo_and_reports_config_errors(tmp_path, capsys):
    assert main(["grpo", "--num_generations", "1"]) == 2
    assert "num_generations must be at least 2" in capsys.readouterr().err
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "cli"
    arguments = [
        "--model.name_or_path", str(model_dir), "--data.max_length", "32", "--max_eval_samples", "8",
        "--max_new_tokens", "4", "--num_generations", "4", "--batch_size", "8", "--max_steps", "1",
        "--output_dir", str(out), "--progress", "false",
    ]  # fmt: skip
    assert main(["grpo", *arguments]) == 0
    # the step, then the final eval
    assert (out / "final" / "config.json").exists() and len(read_metrics(out)) == 2
