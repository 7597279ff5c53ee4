"""`prefalign sample` from the command line: its options in --help, and a config error's exit code."""

from __future__ import annotations

from prefalign.cli import main
from tests.helpers import save_tiny_model, write_jsonl


def test_cli_sample_is_registered(tmp_path, capsys):
    assert main(["sample", "--help"]) == 0
    assert "--sampling.strategy" in capsys.readouterr().out
    model_dir = save_tiny_model(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in ["1+2", "3+4", "5+6"]])
    code = main([
        "sample", "--model.name_or_path", str(model_dir), "--data.path", prompts,
        "--n", "1", "--output_dir", str(tmp_path / "cli"),
    ])
    assert code == 2 and "needs at least 2 samples" in capsys.readouterr().err
