"""Kill -9 and resume through the one training loop: SFT, DPO, the reward model and GRPO each end bit for bit
where the uninterrupted run ends (final weights and every logged loss). A resume says where it starts, logs
each step once, cleans up after an interrupted save, and leaves a finished run alone; a full disk is named."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from prefalign import SFTConfig, TrainConfig, sft
from prefalign.cli import main, parse_overrides
from prefalign.config import load_config
from prefalign.files import staging_prefix
from prefalign.runtime import checkpoint
from prefalign.runtime.checkpoint import list_checkpoints
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import preference_dataset, prompt_dataset, sft_dataset
from tests.helpers import save_tiny_model

# Runs the CLI in a child that SIGKILLs itself right after writing the step-2 checkpoint: no cleanup, no
# finally blocks, as when a job is killed by the scheduler.
KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from prefalign.runtime import loop
real = loop.save_checkpoint
def save_then_die(run_dir, step, *args, **kwargs):
    path = real(run_dir, step, *args, **kwargs)
    if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
loop.save_checkpoint = save_then_die
from prefalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_rows(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def command_line(command: str, tmp_path: Path) -> list[str]:
    model = str(save_tiny_model(tmp_path / "model"))
    common = ["--model.name_or_path", model, "--train.max_steps", "4", "--train.save_every", "2",
              "--train.num_threads", "1", "--train.progress", "false", "--train.log_every", "1"]  # fmt: skip
    if command == "sft":
        data = write_rows(tmp_path / "sft.jsonl", sft_dataset("train", limit=32))
        return [command, *common, "--data.path", data, "--train.batch_size", "4", "--data.max_length", "32"]
    if command in ("dpo", "reward"):
        data = write_rows(tmp_path / "pairs.jsonl", preference_dataset("train", limit=32))
        return [command, *common, "--data.path", data, "--train.batch_size", "4", "--data.max_length", "32"]
    data = write_rows(tmp_path / "prompts.jsonl", prompt_dataset("train", limit=32))
    if command == "ppo":  # two PPO epochs per rollout, so a checkpoint falls every 2 steps; β adapts (saved)
        return [command, *common, "--data.path", data, "--train.batch_size", "4", "--num_iterations", "2",
                "--max_new_tokens", "4", "--data.max_length", "32", "--kl_target", "0.5"]  # fmt: skip
    return [command, *common, "--data.path", data, "--train.batch_size", "8", "--num_generations", "4",
            "--max_new_tokens", "4", "--data.max_length", "32", "--beta", "0.05"]  # fmt: skip


def losses_by_step(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


@pytest.mark.parametrize("command", ["sft", "dpo", "reward", "grpo", "ppo"])
def test_kill_9_then_resume_ends_where_the_whole_run_ends(tmp_path, command):
    arguments = command_line(command, tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*arguments, "--train.output_dir", str(whole)]) == 0

    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_CHECKPOINT, *arguments, "--train.output_dir", str(cut)],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    assert not (cut / "final").exists() and (cut / "checkpoints" / "step-000002" / "state.json").exists()

    assert main([*arguments, "--train.output_dir", str(cut), "--train.resume", "true"]) == 0
    expected = load_file(str(whole / "final" / "model.safetensors"))
    resumed = load_file(str(cut / "final" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert resumed[name].equal(tensor), name
    assert losses_by_step(cut) == losses_by_step(whole)
    assert sorted(losses_by_step(cut)) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- what a resume says and keeps


def sft_config(model_dir: Path, run_dir: Path, **train) -> SFTConfig:
    config = SFTConfig()
    config.model.name_or_path, config.data.max_length = str(model_dir), 32
    config.train = TrainConfig(
        output_dir=str(run_dir), max_steps=4, save_every=2, batch_size=4, learning_rate=1e-3, progress=False,
        num_threads=1, **train,
    )  # fmt: skip
    return config


def test_resume_says_where_it_starts_and_logs_each_step_once(tmp_path, caplog):
    model_dir, run = save_tiny_model(tmp_path / "model"), tmp_path / "run"
    rows = sft_dataset("train", limit=16)
    whole = sft(sft_config(model_dir, run), dataset=rows, save=False)  # checkpoint at step 2, metrics 1-4
    # A kill -9 during a checkpoint save leaves its staging folder behind.
    leftover = run / "checkpoints" / f"{staging_prefix('step-000003')}k2j3"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half written")
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        resumed = sft(sft_config(model_dir, run, resume=True), dataset=rows, save=False)
    assert "resumed from checkpoint step 2" in caplog.text
    assert not leftover.exists()
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    records = read_metrics(run)
    assert [record["step"] for record in records] == [1, 2, 3, 4]  # steps 3 and 4 once, from the resumed run
    assert [record["loss"] for record in records] == [m["loss"] for m in whole.metrics]


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, caplog):
    arguments = [*command_line("sft", tmp_path), "--train.output_dir", str(tmp_path / "run")]
    assert main(arguments) == 0
    weights, metrics = tmp_path / "run" / "final" / "model.safetensors", tmp_path / "run" / "metrics.jsonl"
    stamp, logged = weights.stat().st_mtime_ns, metrics.read_text()
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        assert main([*arguments, "--train.resume", "true"]) == 0
    assert "is already finished (step 4" in caplog.text and "nothing to resume" in caplog.text
    assert weights.stat().st_mtime_ns == stamp and metrics.read_text() == logged
    # The Python function returns the finished run's result without training.
    _, overrides, _ = parse_overrides([*arguments[1:], "--train.resume", "true"])
    result = sft(load_config(SFTConfig, overrides=overrides, from_string=True))
    assert result.step == 4 and [m["step"] for m in result.metrics] == [1, 2, 3, 4] and result.wall_time == 0
    assert weights.stat().st_mtime_ns == stamp


def test_a_full_disk_is_an_error_naming_the_folder_not_a_traceback(tmp_path, monkeypatch, capsys):
    def full_disk(value, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", getattr(handle, "name", None))

    # torch.save writes the checkpoint's objects (torch.distributed.checkpoint's, and the scheduler and RNG)
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run = tmp_path / "run"
    assert main([*command_line("sft", tmp_path), "--train.output_dir", str(run)]) == 2
    error = capsys.readouterr().err
    assert f"cannot write {str(run / 'checkpoints')!r}: the disk is full" in error, error
    assert "train.output_dir" in error and "Traceback" not in error
    assert list_checkpoints(run) == []  # nothing half-written is left as a checkpoint
