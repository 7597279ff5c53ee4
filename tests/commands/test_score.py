"""`prefalign score`: a reward column (or one per side of a pair) written beside the input rows."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main
from prefalign.rewards import RewardModelScorer
from tests.helpers import saved_classifier, write_jsonl


def test_score_command_writes_a_reward_column(tmp_path):
    folder = saved_classifier(tmp_path / "rm")

    def score(rows, name):
        data, output = write_jsonl(tmp_path / f"{name}.jsonl", rows), tmp_path / f"{name}-scored.jsonl"
        arguments = ["--model", str(folder), "--data", data, "--output", str(output), "--device", "cpu"]
        assert main(["score", *arguments]) == 0
        return [json.loads(line) for line in output.read_text().splitlines()]

    rows = [
        {"prompt": "1+1=", "completion": "2", "answer": "2"},
        {"prompt": "3+4=", "completion": "8", "answer": "7"},
    ]
    written = score(rows, "samples")
    expected = RewardModelScorer(str(folder), device="cpu").score(["1+1=", "3+4="], ["2", "8"])
    assert [row["answer"] for row in written] == ["2", "7"]
    assert [row["reward"] for row in written] == pytest.approx(expected)

    [scored] = score([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], "pairs")
    assert scored["reward_chosen"] == pytest.approx(expected[0])
    assert scored["reward_rejected"] != pytest.approx(scored["reward_chosen"])


def test_score_refuses_to_write_over_its_input_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = saved_classifier(tmp_path / "rm")
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    before = (tmp_path / "a.jsonl").read_text()

    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the output was checked")

    monkeypatch.setattr("prefalign.data.load_rows", loaded)
    monkeypatch.setattr("prefalign.commands.score.RewardModelScorer", loaded)
    for output in ("./a.jsonl", str(tmp_path / "a.jsonl")):  # the same file, however it is written
        assert main(["score", "--model", str(folder), "--data", "a.jsonl", "--output", output]) == 2
        error = capsys.readouterr().err
        assert "is the input file 'a.jsonl'" in error and "choose another --output (e.g. '" in error
        assert "a-scored.jsonl'" in error
    assert (tmp_path / "a.jsonl").read_text() == before
