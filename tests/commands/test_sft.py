"""`prefalign sft`: a run from the command line writes its resolved config and a final model."""

from __future__ import annotations

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.cli import main
from tests.helpers import save_tiny_model


def test_sft_run_writes_resolved_config_and_final_model(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    run = tmp_path / "run"
    argv = [
        "sft", "--model.name_or_path", str(model_dir), "--train.output_dir", str(run),
        "--train.max_steps", "2", "--train.batch_size", "4", "--train.learning_rate", "1e-3",
        "--progress", "false", "--data.max_samples", "16",
    ]
    assert main(argv) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["model"]["name_or_path"] == str(model_dir)
    assert AutoModelForCausalLM.from_pretrained(run / "final") is not None
    assert AutoTokenizer.from_pretrained(run / "final").chat_template
    assert "supervised fine-tuning" in (run / "final" / "README.md").read_text()
    # A second run into the same folder is refused rather than clobbering the finished run.
    assert main(argv) == 2
