"""Run reports from real run folders: every expected figure is a readable PNG linked from report.md, several
runs are overlaid, and a killed run still reports what it has and says what is missing."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from prefalign.errors import ConfigError
from prefalign.reporting import load_run, write_report
from prefalign.reporting.figures import TRAINING_FIGURES, ema, matching, smoothing_span
from prefalign.reporting.overoptimisation import Trajectory, trajectory, verdict
from prefalign.reporting.runs import Run, algorithm_of, series, unique_names
from tests.reporting.fixtures import png_size

RL_FIGURES = {
    "training-optimisation.png", "training-rl-reward.png", "training-rl-policy.png", "evaluation.png",
    "overoptimisation.png",
}  # fmt: skip
DPO_FIGURES = {"training-optimisation.png", "training-preferences.png", "evaluation.png"}


def linked_images(report_md: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md))


def assert_figures(folder, expected: set[str]) -> str:
    text = (folder / "report.md").read_text()
    assert linked_images(text) == expected
    for name in expected:
        width, height = png_size(folder / name)
        assert 400 <= width <= 3000 and 300 <= height <= 3000, (name, width, height)
        assert (folder / name).stat().st_size > 10_000, name  # drawn panels, not an empty canvas
    return text


def test_a_training_command_writes_its_report_with_every_figure(real_runs):
    """`prefalign grpo` ends with <run>/report/: the RL curves, the evaluations and the over-optimisation view
    (reward model + gold monitor)."""
    text = assert_figures(real_runs["grpo"] / "report", RL_FIGURES)
    assert "**grpo**: GRPO" in text and "6 of 6 steps, finished" in text
    assert "## Sampled completions" in text and "| prompt | completion |" in text
    assert "no over-optimisation visible" in text or "over-optimised" in text
    assert not (real_runs["dpo"] / "report").exists()  # --report false


def test_report_of_a_dpo_run(real_runs, tmp_path):
    report = write_report([real_runs["dpo"]], tmp_path / "out")
    text = assert_figures(tmp_path / "out", DPO_FIGURES)
    assert "## What is missing" not in text  # a finished run with its evaluations lacks nothing
    panels = {panel for figure in report.figures for panel in figure.panels}
    assert {"Training loss", "Rewards of chosen and rejected", "Pair accuracy (chosen above rejected)",
            "Held-out loss"} <= panels  # fmt: skip


def test_two_runs_are_overlaid_with_a_legend_by_run_name(real_runs, tmp_path):
    report = write_report([real_runs["grpo"], real_runs["dpo"]], tmp_path / "both")
    by_name = {figure.path.name: figure for figure in report.figures}
    assert set(by_name) == RL_FIGURES | DPO_FIGURES
    for name in ("training-optimisation.png", "evaluation.png"):  # both runs log these
        assert by_name[name].legend == ["grpo (GRPO)", "dpo (DPO)"]
    text = (tmp_path / "both" / "report.md").read_text()
    assert "**grpo**: GRPO" in text and "**dpo**: DPO" in text


def test_a_killed_run_reports_what_it_has_and_says_what_is_missing(real_runs, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(real_runs["dpo"], killed)
    shutil.rmtree(killed / "final")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # torn mid-line
    write_report([killed], tmp_path / "out")
    text = assert_figures(tmp_path / "out", {"training-optimisation.png", "training-preferences.png"})
    missing = text.split("## What is missing")[1].split("##")[0]
    phrases = ("did not finish", "metrics stop at step 2 of 6", "torn by a kill", "no held-out evaluation")
    assert all(phrase in missing for phrase in phrases), missing
    assert "2 of 6 steps, **not finished**" in text


def test_a_run_with_no_metrics_says_there_is_nothing_to_plot(real_runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(real_runs["dpo"] / "config.yaml", empty)
    report = write_report([empty], tmp_path / "out")
    assert report.figures == []
    text = (tmp_path / "out" / "report.md").read_text()
    assert "nothing to plot" in text and "No figure" in text


def test_figures_no_longer_drawn_are_removed(real_runs, tmp_path):
    out = tmp_path / "out"
    write_report([real_runs["grpo"]], out)
    write_report([real_runs["dpo"]], out)
    assert {path.name for path in out.glob("*.png")} == DPO_FIGURES


def test_folders_that_are_not_runs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report([tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a run folder"):
        write_report([tmp_path / "plain"], tmp_path / "out")
    with pytest.raises(ConfigError, match="no run folder given"):
        write_report([], tmp_path / "out")


# ----------------------------------------------------------------------------- pieces, by hand


def test_ema_is_debiased_and_leaves_short_curves_alone():
    assert ema([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    # weight 0.5: (0.5*1) / 0.5 = 1; (0.25*1 + 0.5*3) / 0.75 = 7/3
    assert ema([1.0, 3.0], span=2) == pytest.approx([1.0, 7 / 3])
    assert smoothing_span(59) == 1.0 and ema([1.0, 5.0], span=1.0) == [1.0, 5.0]
    assert smoothing_span(2500) == pytest.approx(62.5)


def test_series_skips_what_is_not_a_finite_number_and_keeps_the_last_value_of_a_step():
    records = [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": True},
        {"step": 4, "loss": "x"}, {"step": 5, "loss": 0.5}, {"step": 5, "loss": 0.25}, {"loss": 9.0},
    ]  # fmt: skip
    assert series(records, "loss") == ([1, 5], [1.0, 0.25])


def test_algorithm_from_config_keys_or_metric_names():
    assert algorithm_of({"vf_coef": 0.1, "num_generations": 0}, set()) == "ppo"
    assert algorithm_of({"num_generations": 8}, set()) == "grpo"
    assert algorithm_of({"rounds": 2, "loss_type": ["sigmoid"]}, set()) == "iterative_dpo"
    assert algorithm_of({"rounds": 1, "loss_type": ["sigmoid"]}, set()) == "dpo"
    assert algorithm_of({"center_rewards_coefficient": None}, set()) == "reward"
    assert algorithm_of({"train": {}}, {"loss"}) == "sft"
    assert algorithm_of({}, {"loss", "reward_std"}) == "grpo" and algorithm_of({}, set()) == "unknown"


def test_panel_patterns_and_unique_names(tmp_path):
    keys = {"rewards/b/mean", "rewards/a/mean", "rewards/failed_samples", "monitor/x/mean"}
    assert matching(("rewards/*/mean",), keys) == ["rewards/a/mean", "rewards/b/mean"]
    assert unique_names([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert set(TRAINING_FIGURES) == {"optimisation", "preferences", "rl-reward", "rl-policy"}


def rl_run(tmp_path, gold: list[float], proxy: list[float]) -> Run:
    records = [
        {"step": step, "rewards/reward_model/mean": proxy_value, "monitor/exact_match/mean": gold_value,
         "objective/kl": step / 10}
        for step, (gold_value, proxy_value) in enumerate(zip(gold, proxy, strict=True), start=1)
    ]
    return Run(tmp_path, "run", "ppo", {"reward_model": "rm"}, records)


def test_the_over_optimisation_verdict_follows_the_numbers(tmp_path):
    hacked = trajectory(rl_run(tmp_path, gold=[0.1, 0.3, 0.5, 0.3, 0.1], proxy=[0.0, 1.0, 2.0, 3.0, 4.0]))
    assert isinstance(hacked, Trajectory)
    assert hacked.sqrt_kl == pytest.approx([(0.1 * step) ** 0.5 for step in range(1, 6)])
    text = verdict(hacked)
    assert "over-optimised" in text and "peaks at √KL 0.55 (step 3)" in text and "falls by 0.4" in text
    honest = verdict(trajectory(rl_run(tmp_path, gold=[0.1, 0.2, 0.3], proxy=[0.0, 0.5, 1.0])))
    assert "no over-optimisation" in honest and "gold reward (exact_match) rose by 0.2" in honest
    assert "(together)" in honest
    # without a reward model there is no proxy to game: no view
    plain = rl_run(tmp_path, gold=[0.1, 0.2], proxy=[0.0, 0.5])
    plain.config = {}
    for record in plain.records:
        record["reward"] = record.pop("rewards/reward_model/mean")
    assert trajectory(plain) is None


def test_held_out_kl_is_the_distance_when_there_are_evaluations(tmp_path):
    run = rl_run(tmp_path, gold=[0.1] * 4, proxy=[0.0, 0.1, 0.2, 0.3])
    run.records += [{"step": 2, "eval/kl": 2.0}, {"step": 4, "eval/kl": 4.0}, {"step": 3, "eval/kl": 3.0}]
    path = trajectory(run)
    assert path.sqrt_kl == pytest.approx([1.0, 2.0**0.5, 3.0**0.5, 2.0])  # step 1 between KL 0 (start) and 2
    assert path.kl_source.startswith("held-out")


def test_load_run_of_iterative_dpo_numbers_its_rounds_on(tmp_path):
    folder = tmp_path / "iterative"
    for index in (1, 2):
        (folder / f"round-{index}").mkdir(parents=True)
        rows = [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3)]
        (folder / f"round-{index}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text("rounds: 2\nloss_type: [sigmoid]\ntrain: {max_steps: 3}\n")
    top = [
        {"round": 0, "step": 0, "heldout/accuracy": 0.3, "eval/loss": 9.0},
        {"round": 1, "step": 3, "heldout/accuracy": 0.4}, {"round": 2, "step": 6, "heldout/accuracy": 0.5},
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in top))
    run = load_run(folder)
    assert run.algorithm == "iterative_dpo" and run.planned_steps == 6 and run.round_starts == [0, 3]
    assert run.series("loss")[0] == [1, 2, 3, 4, 5, 6]
    assert run.series("heldout/accuracy") == ([0, 3, 6], [0.3, 0.4, 0.5])
    assert run.series("eval/loss") == ([], [])  # the rounds' own evaluations are the ones plotted


def test_steps_that_share_a_rollout_count_once(tmp_path):
    """PPO's epochs over one rollout log its proxy and gold again at each optimizer step: one point each."""
    run = rl_run(tmp_path, gold=[0.1, 0.1, 0.3, 0.3, 0.2], proxy=[1.0, 1.0, 2.0, 2.0, 3.0])
    assert trajectory(run).steps == [1, 3, 5]


def test_a_lone_final_evaluation_is_listed_not_drawn(real_runs, tmp_path):
    """train.eval_every = 0 leaves one evaluation: an empty-looking figure of single points helps no one."""
    run = tmp_path / "once"
    shutil.copytree(real_runs["dpo"], run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = max(i for i, record in enumerate(records) if "eval/loss" in record)
    kept = [{k: v for k, v in r.items() if not k.startswith("eval/")} if i != last_eval else r
            for i, r in enumerate(records)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in kept))
    report = write_report([run], tmp_path / "out")
    assert "evaluation.png" not in {figure.path.name for figure in report.figures}
    text = (tmp_path / "out" / "report.md").read_text()
    assert "One evaluation per run" in text and "Held-out (step 6): loss" in text
