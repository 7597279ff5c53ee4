"""Atomic writes: the target is replaced only when the write completes; an error leaves it as it was and no
temporary file behind."""

from __future__ import annotations

import errno

import pytest

from prefalign.errors import OutputError
from prefalign.files import atomic_file, atomic_folder, writing


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


def test_writing_names_the_path_of_a_full_disk_and_lets_other_errors_through(tmp_path):
    target = tmp_path / "run" / "metrics.jsonl"
    elsewhere = "set train.output_dir to another folder"
    full = r"cannot write '.*metrics\.jsonl': the disk is full.*another folder"
    with pytest.raises(OutputError, match=full):
        with writing(target, elsewhere):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
    with pytest.raises(OutputError, match=r"'.*run': it is not writable"):  # a staging name is not shown
        with writing(tmp_path / "run", elsewhere):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / ".config-1.yaml"))
    with pytest.raises(KeyError):  # an internal error keeps its type and traceback
        with writing(target, elsewhere):
            raise KeyError("a bug")


def test_atomic_writes_get_the_permissions_of_ordinary_new_files(tmp_path):
    """Not the private modes of mkstemp/mkdtemp: a run's config.yaml and final/ stay readable by others."""
    import os

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "config.yaml") as staging:
            staging.write_text("a: 1\n")
        with atomic_folder(tmp_path / "final") as staging:
            (staging / "model.safetensors").write_text("")
    finally:
        os.umask(mask)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
