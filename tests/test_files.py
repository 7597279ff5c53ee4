"""Atomic writes: the target is replaced only when the write completes; an error leaves it as it was and no
temporary file behind."""

from __future__ import annotations

import pytest

from prefalign.files import atomic_file, atomic_folder


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "rows.jsonl"
    target.write_text("old\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(target) as staging:
            staging.write_text("half a")
            raise OSError("disk full")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    with atomic_file(target) as staging:
        assert staging.parent == tmp_path and staging.suffix == ".jsonl" and staging != target
        staging.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_atomic_folder_replaces_only_on_success(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "model.safetensors").write_text("torn")
            raise RuntimeError
    assert (target / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    with atomic_folder(target) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # replaced whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
