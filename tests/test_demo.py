"""`prefalign demo`: the runner, the report, each stage on a tiny budget, and recipes that pin every key."""

from __future__ import annotations

import json

import pytest

from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.reward_model import RewardConfig
from prefalign.cli import main
from prefalign.commands import demo_recipes, demo_stages
from prefalign.config import _leaf_keys, to_dict
from prefalign.recipes.base_model import BaseConfig
from prefalign.recipes.iterative_dpo import IterativeDPOConfig
from tests.helpers import save_tiny_model


def _flat(mapping, prefix=""):
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "columns":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    ("config_class", "recipe"),
    [
        (BaseConfig, demo_recipes.BASE_MODEL),
        (RewardConfig, demo_recipes.REWARD),
        (DPOConfig, demo_recipes.DPO),
        (IterativeDPOConfig, demo_recipes.ITERATIVE_DPO),
        (GRPOConfig, demo_recipes.GRPO),
    ],
)
def test_recipes_pin_every_key_of_their_config(config_class, recipe):
    """A new config field must be added to the demo's recipe (with the value the demo ran with), or the
    trainers' defaults could move the demo's numbers."""
    assert set(_flat(recipe)) == set(_leaf_keys(config_class))


def test_recipe_config_is_the_recipe_with_the_runs_own_values(tmp_path):
    context = demo_stages.DemoContext(seed=3, num_threads=2, eval_prompts=8, run_dir=tmp_path, base_path=tmp_path / "base")
    config = context.recipe(DPOConfig, demo_recipes.DPO, "dpo", num_threads=1)
    found = _flat(to_dict(config))
    own = {"model.name_or_path": str(tmp_path / "base"), "train.output_dir": str(tmp_path / "dpo"), "train.seed": 3, "train.num_threads": 1}
    assert {key: found[key] for key in own} == own
    assert {k: v for k, v in found.items() if k not in own} == {k: v for k, v in _flat(demo_recipes.DPO).items() if k not in own}


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
    assert main(["demo", "--stages", "base,dpo_typo", "--eval_prompts", "4", "--output_dir", str(tmp_path)]) == 2
    assert "unknown demo stage 'dpo_typo'" in capsys.readouterr().err


def _small(recipe, **train):
    return {**recipe, "train": {**recipe["train"], "progress": False, **train}}


def test_grpo_stage_adds_its_report_line(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_recipes, "GRPO", _small(demo_recipes.GRPO, max_steps=2, batch_size=16))
    context = demo_stages.DemoContext(seed=0, num_threads=1, eval_prompts=8, run_dir=tmp_path, base_path=save_tiny_model(tmp_path / "base"))
    context.base_metrics = {"accuracy": 0.0, "pass@8": 0.0}
    found = demo_stages.grpo_stage(context)
    assert found["steps"] == 2 and context.lines[-1].startswith("| GRPO (exact-match reward) | held-out greedy accuracy 0.000 → ")
    assert "2 steps × 2 prompts × G=8" in context.lines[-1]
    assert (tmp_path / "grpo" / "final" / "model.safetensors").exists()


def test_reward_stage_adds_one_report_row(tmp_path, monkeypatch):
    recipe = _small(demo_recipes.REWARD, max_steps=2)
    recipe["data"] = {**recipe["data"], "max_samples": 32, "max_eval_samples": 16}
    monkeypatch.setattr(demo_recipes, "REWARD", {**recipe, "normalization_pairs": 8})
    monkeypatch.setattr(demo_recipes, "AUC_PROMPTS", 8)
    context = demo_stages.DemoContext(seed=0, num_threads=1, eval_prompts=8, run_dir=tmp_path, base_path=save_tiny_model(tmp_path / "base"))
    result = demo_stages.reward_stage(context)
    [line] = context.lines
    assert line.startswith("| reward model | held-out pairwise accuracy ") and line.count(" | ") == 2 and "AUC" in line
    assert result["evaluation"]["num_pairs"] == 16 and result["steps"] == 2 and result["sample_samples"] == 32
    assert (tmp_path / "reward" / "final" / "prefalign_reward.json").exists()
