"""The demo's stages: each run's config is its recipe plus the run's own values, and each stage adds its line
to the report (on a tiny budget; the iterative-DPO stage on the built-in base model is slow)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml

from prefalign.algorithms.dpo import DPOConfig
from prefalign.commands import demo, demo_recipes, demo_stages
from prefalign.recipes.base_model import ensure_base_model
from tests.helpers import save_tiny_model, saved_classifier


def flat(mapping, prefix=""):
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "columns":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def small(recipe, **train):
    return {**recipe, "train": {**recipe["train"], "progress": False, **train}}


def tiny_context(tmp_path):
    """A context whose base model is a tiny random one."""
    base_path = save_tiny_model(tmp_path / "base")
    return demo_stages.DemoContext(
        seed=0, num_threads=1, eval_prompts=8, run_dir=tmp_path, base_path=base_path
    )


def test_recipe_config_is_the_recipe_with_the_runs_own_values(tmp_path):
    context = demo_stages.DemoContext(
        seed=3, num_threads=2, eval_prompts=8, run_dir=tmp_path, base_path=tmp_path / "base"
    )
    config = context.recipe(DPOConfig, demo_recipes.DPO, "dpo", num_threads=1)
    found = flat(dataclasses.asdict(config))
    own = {
        "model.name_or_path": str(tmp_path / "base"), "train.output_dir": str(tmp_path / "dpo"),
        "train.seed": 3, "train.num_threads": 1,
    }
    assert {key: found[key] for key in own} == own
    recipe = flat(demo_recipes.DPO)
    assert {k: v for k, v in found.items() if k not in own} == {
        k: v for k, v in recipe.items() if k not in own
    }


def test_grpo_stage_adds_its_report_line(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_recipes, "GRPO", small(demo_recipes.GRPO, max_steps=2, batch_size=16))
    context = tiny_context(tmp_path)
    context.base_metrics = {"accuracy": 0.0, "pass@8": 0.0}
    found = demo_stages.grpo_stage(context)
    assert found["steps"] == 2
    assert context.lines[-1].startswith("| GRPO (exact-match reward) | held-out greedy accuracy 0.000 → ")
    assert "2 steps × 2 prompts × G=8" in context.lines[-1]
    assert (tmp_path / "grpo" / "final" / "model.safetensors").exists()


def test_ppo_stage_uses_the_reward_stages_model_and_adds_its_report_line(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_recipes, "PPO", small(demo_recipes.PPO, max_steps=2, batch_size=8))
    context = tiny_context(tmp_path)
    context.base_metrics = {"accuracy": 0.0, "pass@8": 0.0}
    reward_dir = tmp_path / "reward-model"
    saved_classifier(reward_dir)  # a random score head with the char tokenizer
    context.results["reward"] = {"model_dir": str(reward_dir)}
    found = demo_stages.ppo_stage(context)
    assert found["steps"] == 2
    [line] = context.lines
    assert line.startswith("| PPO (reward model as the reward, exact match as the gold monitor) | held-out "
                           "greedy accuracy 0.000 → ")  # fmt: skip
    assert line.count(" | ") == 2 and "KL to base" in line and "2 steps × 8 completions" in line
    assert "not a gain" in line  # the line says what the recipe is (the measurements are in BENCHMARKS.md)
    config = yaml.safe_load((tmp_path / "ppo" / "config.yaml").read_text())
    assert config["reward_model"] == str(reward_dir) and config["monitor_functions"] == ["exact_match"]
    proxy = f"reward-model score of held-out greedy answers {found['proxy_before']:.3f} → "
    assert proxy in line and math.isfinite(found["proxy_after"]) and 0.0 <= found["monitor_best"] <= 1.0
    assert (tmp_path / "ppo" / "final" / "critic" / "config.json").exists()


def test_a_stage_runs_after_the_stages_it_needs():
    assert demo.with_needs(["ppo"]) == ["base", "reward", "ppo"]
    assert demo.with_needs(["reward", "grpo", "ppo"]) == ["base", "reward", "grpo", "ppo"]
    assert demo.with_needs(["base", "dpo"]) == ["base", "dpo"]


def test_reward_stage_adds_one_report_row(tmp_path, monkeypatch):
    recipe = small(demo_recipes.REWARD, max_steps=2)
    recipe["data"] = {**recipe["data"], "max_samples": 32, "max_eval_samples": 16}
    monkeypatch.setattr(demo_recipes, "REWARD", {**recipe, "normalization_pairs": 8})
    monkeypatch.setattr(demo_recipes, "AUC_PROMPTS", 8)
    context = tiny_context(tmp_path)
    result = demo_stages.reward_stage(context)
    [line] = context.lines
    assert line.startswith("| reward model | held-out pairwise accuracy ")
    assert line.count(" | ") == 2 and "AUC" in line
    assert result["evaluation"]["num_pairs"] == 16 and result["steps"] == 2 and result["sample_samples"] == 32
    assert (tmp_path / "reward" / "final" / "prefalign_reward.json").exists()


@pytest.mark.slow
def test_demo_stage_reports_accuracy_per_round(tmp_path, monkeypatch):
    """On the built-in base model (built once into the cache, 1-2 minutes, if missing), with a tiny budget."""
    recipe = {**demo_recipes.ITERATIVE_DPO, "train": {**demo_recipes.ITERATIVE_DPO["train"], "max_steps": 2}}
    recipe["sampling"] = {**recipe["sampling"], "prompts_per_round": 64}
    monkeypatch.setattr(demo_recipes, "ITERATIVE_DPO", recipe)
    context = demo_stages.DemoContext(seed=0, num_threads=1, eval_prompts=40, run_dir=tmp_path)
    context.base_path = ensure_base_model()
    result = demo_stages.iterative_stage(context)
    assert len(result["accuracy_per_round"]) == 3  # round 0 (the base) and two rounds
    assert all(0.0 <= value <= 1.0 for value in result["accuracy_per_round"])
    assert result["steps"] == 4 and len(result["pairs_per_round"]) == 2
    assert context.lines[-1].startswith("| rejection sampling + iterative DPO") and " → " in context.lines[-1]
