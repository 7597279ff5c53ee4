"""`prefalign report RUN [RUN ...]`: bare arguments are the run folders; and the report a training command
writes at its end (main process only, into <run>/report/, never over iterative DPO's report.md)."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main, parse_overrides
from prefalign.commands import report as report_command
from prefalign.errors import ConfigError, PrefalignError
from tests.reporting.fixtures import make_runs


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


def test_bare_arguments_fill_the_commands_positional_field():
    assert parse_overrides(["a", "--output", "o", "b", "--title=t"], "runs") == (
        None, {"output": "o", "title": "t", "runs": ["a", "b"]}, False,
    )  # fmt: skip
    assert parse_overrides(["--runs", "a,b"], "runs") == (None, {"runs": "a,b"}, False)
    with pytest.raises(PrefalignError, match="as arguments or with --runs, not both"):
        parse_overrides(["a", "--runs", "b"], "runs")
    with pytest.raises(PrefalignError, match="unexpected argument 'a'"):
        parse_overrides(["a"])  # other commands take options only


def test_cli_report_of_two_runs(real_runs, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["report", str(real_runs["grpo"]), str(real_runs["dpo"]), "--output", str(out)]) == 0
    assert f"report: {out / 'report.md'} (" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "**grpo**" in text and "**dpo**" in text
    assert main(["report", "--runs", f"{real_runs['dpo']}", "--output", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "evaluation.png").is_file()


def test_cli_report_mistakes_exit_with_2(tmp_path, capsys):
    assert main(["report"]) == 2
    assert "no run folder given" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_option_is_taken_out_of_the_overrides():
    overrides = {"report": "false", "train.max_steps": "2"}
    assert report_command.report_option(overrides) is False and overrides == {"train.max_steps": "2"}
    assert report_command.report_option({}) is True
    with pytest.raises(ConfigError, match="true or false"):
        report_command.report_option({"report": "maybe"})


def test_default_output():
    assert str(report_command.default_output(["runs/a"])) == "runs/a/report"
    assert str(report_command.default_output(["runs/a", "runs/b"])) == "runs/report"


def test_run_report_keeps_iterative_dpos_report_and_only_the_main_process_writes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# Iterative DPO: 2 rounds\n")
    (run / "config.yaml").write_text("train: {max_steps: 2}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2)))
    monkeypatch.setattr(report_command, "is_main_process", lambda: False)
    assert report_command.write_run_report(run) is None and not (run / "report").exists()
    monkeypatch.setattr(report_command, "is_main_process", lambda: True)
    assert report_command.write_run_report(run) == run / "report" / "report.md"
    assert (run / "report.md").read_text() == "# Iterative DPO: 2 rounds\n"
    assert (run / "report" / "training-optimisation.png").is_file()


def test_a_report_that_fails_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_command, "write_report", broken)
    assert report_command.write_run_report(tmp_path) is None
    assert "disk full" in caplog.text and f"prefalign report {tmp_path}" in caplog.text
