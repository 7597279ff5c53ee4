"""`prefalign demo`: the runner writes the report and results; an unknown stage is a config error."""

from __future__ import annotations

import json

from prefalign.cli import main


def test_demo_base_stage_writes_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--stages", "base", "--eval_prompts", "40", "--output_dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| base (SFT) | held-out greedy accuracy" in report and "Wall time" in report
    results = json.loads((out / "results.json").read_text())
    base = results["base"]
    assert base["num_prompts"] == 40
    # The calibrated base model: some skill, clear headroom, pass@8 above greedy.
    assert 0.05 <= base["accuracy"] <= 0.7 and base["pass@8"] > base["accuracy"]


def test_demo_unknown_stage_is_a_config_error(tmp_path, capsys):
    arguments = ["--stages", "base,dpo_typo", "--eval_prompts", "4", "--output_dir", str(tmp_path)]
    assert main(["demo", *arguments]) == 2
    assert "unknown demo stage 'dpo_typo'" in capsys.readouterr().err
