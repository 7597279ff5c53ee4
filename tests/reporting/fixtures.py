"""Tiny real runs for the report tests, made through the CLI (a few seconds in all), and a PNG reader."""

from __future__ import annotations

import struct
from pathlib import Path

from prefalign.cli import main
from tests.helpers import save_tiny_model, saved_classifier


def make_runs(root: Path) -> dict[str, Path]:
    """A GRPO run on a (random) reward model with a gold monitor, which writes its own report at the end,
    and a DPO run with --report false."""
    model = save_tiny_model(root / "model")
    reward_model = saved_classifier(root / "reward-model")
    common = [
        "--model.name_or_path", str(model), "--data.max_length", "32", "--data.max_samples", "64",
        "--max_eval_samples", "8", "--train.batch_size", "8", "--train.max_steps", "6", "--progress", "false",
    ]  # fmt: skip
    grpo = [
        "grpo", *common, "--max_new_tokens", "4", "--num_generations", "4", "--eval_every", "2",
        "--reward_functions", "[]", "--reward_model", str(reward_model), "--monitor_functions", "exact_match",
        "--log_completions_every", "2", "--output_dir", str(root / "grpo"),
    ]  # fmt: skip
    assert main(grpo) == 0
    dpo = ["dpo", *common, "--eval_every", "3", "--output_dir", str(root / "dpo"), "--report", "false"]
    assert main(dpo) == 0
    return {"grpo": root / "grpo", "dpo": root / "dpo"}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file starts as a PNG does."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert header[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    return struct.unpack(">II", header[16:24])
