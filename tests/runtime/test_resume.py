"""Kill -9 and resume through the one training loop: SFT, DPO, the reward model and GRPO each end bit for bit
where the uninterrupted run ends (final weights and every logged loss)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from prefalign.cli import main
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
