"""The demo report's figures and statements: FLOPs counted from the stages' folders by the stated rule,
figures drawn, and every statement's direction following the numbers (swap them and the sentence turns)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from prefalign.models.loading import ModelConfig, load_causal_lm
from prefalign.reporting import demo
from prefalign.reporting.compute import (
    TRAIN,
    Compute,
    method_compute,
    non_embedding_parameters,
    trained_tokens,
)
from prefalign.reporting.demo import demo_section, method_results, statements, wilson_interval
from tests.reporting.fixtures import png_size


def results_for(real_runs, *, dpo: float, grpo: float) -> dict:
    held_out = {"num_prompts": 200, "pass@8": 0.6}
    return {
        "base": {"accuracy": 0.3, **held_out},
        "dpo": {"after": {"accuracy": dpo, "kl": 0.5, **held_out}, "model": str(real_runs["dpo"] / "final")},
        "grpo": {
            "after": {"accuracy": grpo, "kl": 1.5, **held_out}, "model": str(real_runs["grpo"] / "final"),
        },
    }


@pytest.fixture
def fixed_compute(monkeypatch):
    """DPO 1e12 FLOPs, GRPO 1e13: the statements' tests set the numbers themselves."""
    flops = {"dpo": 1e12, "grpo": 1e13, "iterative": 2e12, "ppo": 3e13}
    monkeypatch.setattr(demo, "method_compute", lambda method, _results: Compute({"policy": flops[method]}))


def test_non_embedding_parameters_are_counted_from_the_file_headers(real_runs):
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(real_runs["dpo"] / "final")), trainable=False)
    expected = sum(
        parameter.numel() for name, parameter in model.named_parameters()
        if "embed" not in name and "lm_head" not in name
    )  # fmt: skip
    assert non_embedding_parameters(real_runs["dpo"] / "final") == expected > 0


def test_trained_tokens_scale_logged_steps_up_to_every_step(tmp_path):
    records = [
        {"step": 2, "tokens_per_second": 50.0, "step_time": 2.0},  # 100 tokens
        {"step": 4, "tokens_per_second": 300.0, "step_time": 1.0}, {"step": 4, "eval/loss": 1.0},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert trained_tokens(tmp_path) == (pytest.approx(400 * 4 / 2), 4)  # 2 of 4 steps logged


def test_dpo_compute_is_six_n_per_trained_token_plus_the_reference_forward(real_runs):
    compute = method_compute("dpo", results_for(real_runs, dpo=0.5, grpo=0.6))
    tokens, _ = trained_tokens(real_runs["dpo"])
    parameters = non_embedding_parameters(real_runs["dpo"] / "final")
    assert compute.parts == pytest.approx(
        {"policy forward+backward": TRAIN * parameters * tokens, "reference forward": 2 * parameters * tokens}
    )
    grpo = method_compute("grpo", results_for(real_runs, dpo=0.5, grpo=0.6))
    # one pass over each rollout (num_iterations 1): generation and reward-model scoring are one forward each
    assert set(grpo.parts) == {"generation", "policy forward+backward", "reward model scoring"}
    assert grpo.parts["generation"] == pytest.approx(grpo.parts["policy forward+backward"] / 3)


def said(real_runs, **accuracies) -> str:
    results = results_for(real_runs, **accuracies)
    return "\n".join(statements(results, method_results(results)))


def test_statements_follow_the_numbers(real_runs, fixed_compute):
    text = said(real_runs, dpo=0.45, grpo=0.62)
    assert "GRPO (0.620) > DPO (0.450) > base (SFT) (0.300)" in text
    assert "DPO used 10.0× less training compute than GRPO (1e+12 vs 1e+13 FLOPs)" in text
    assert "17.0 points lower accuracy" in text and "a little worse than RL' holds here" in text
    assert "claim that RL is best at this reasoning task holds here" in text
    # per 10¹² FLOPs: DPO (45 - 30) / 1 = +15 points, GRPO (62 - 30) / 10 = +3.2
    assert "per 10¹² training FLOPs: DPO +15, GRPO +3.2; DPO is the most efficient" in text
    text = said(real_runs, dpo=0.62, grpo=0.45)
    assert "DPO (0.620) > GRPO (0.450)" in text and "17.0 points higher accuracy" in text
    assert "does not hold here" in text and "not an RL method" in text
    assert "GRPO moved furthest from the base (KL 1.50 nats per sequence), but DPO is more accurate" in text
    assert "overlap: not a clear difference" in said(real_runs, dpo=0.50, grpo=0.52)


def test_ppo_proxy_statement_says_when_the_reward_model_was_gamed(real_runs, fixed_compute):
    results = results_for(real_runs, dpo=0.5, grpo=0.6)
    results["ppo"] = {"after": {"accuracy": 0.2, "kl": 3.0, "num_prompts": 200}, "proxy_before": 0.1,
                      "proxy_after": 2.0, "monitor_best": 0.4, "monitor_last": 0.15}  # fmt: skip
    text = "\n".join(statements(results, method_results(results)))
    assert "the proxy rose while the gold fell: PPO gamed the reward model" in text
    assert "peaked at 0.400 and ended at 0.150" in text
    honest = copy.deepcopy(results)
    honest["ppo"]["after"]["accuracy"] = 0.5
    assert "proxy and gold rose together" in "\n".join(statements(honest, method_results(honest)))


def test_demo_section_draws_its_figures_and_each_stages_curves(real_runs, tmp_path):
    copies = {name: shutil.copytree(folder, tmp_path / name) for name, folder in real_runs.items()}
    text = demo_section(results_for(copies, dpo=0.5, grpo=0.6), tmp_path)
    for name in ("accuracy-by-method.png", "accuracy-vs-compute.png"):
        assert f"]({name})" in text
        width, height = png_size(tmp_path / name)
        assert width >= 600 and height >= 350
    assert "## Training curves of each stage" in text and "### GRPO" in text and "### DPO" in text
    assert (copies["dpo"] / "report" / "training-preferences.png").is_file()  # the stages' own reports
    assert demo_section({}, tmp_path) == ""


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.0025 + 0.000096) / 1.0384 = 0.0961
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.5 - 0.0961, abs=1e-4) and high == pytest.approx(0.5 + 0.0961, abs=1e-4)


def test_the_demo_report_has_its_figures(tmp_path):
    """`prefalign demo` (base stage only) ends its report with the accuracy figure."""
    from prefalign.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--stages", "base", "--eval_prompts", "40", "--output_dir", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## What the numbers show" in report and "](accuracy-by-method.png)" in report
    assert png_size(out / "accuracy-by-method.png")[0] >= 600
