"""`prefalign dpo`: a run from the command line on a JSON Lines file, its options (rounds included) in
--help, and the example config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefalign.algorithms.dpo import DPOConfig
from prefalign.cli import main
from prefalign.config import load_config
from tests.helpers import save_tiny_model, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_cli_runs_dpo_on_a_jsonl_file(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(6)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code = main([
        "dpo", "--model.name_or_path", str(model_dir), "--data.path", data,
        "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "2",
        "--loss_type", "sigmoid,ipo", "--loss_weights", "1,0.1",
        "--progress", "false", "--mixed_precision", "off", "--rpo_alpha", "0",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # Combined loss at step 1: log 2 + 0.1·(0 − 1/(2·0.1))² = 0.693147 + 2.5 = 3.193147
    assert record["loss"] == pytest.approx(3.193147, abs=1e-3)
    assert record["loss/ipo"] == pytest.approx(25.0, abs=1e-2)
    assert main(["dpo", "--help"]) == 0
    assert "--rpo_alpha" in capsys.readouterr().out


def test_cli_dpo_lists_the_round_options(capsys):
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--rounds" in text and "--round_reference" in text and "--sampling.strategy" in text


def test_example_yaml_loads():
    config = load_config(DPOConfig, EXAMPLES / "dpo.yaml")
    assert config.loss_type and config.beta > 0
