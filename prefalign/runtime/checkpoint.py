"""Checkpoints: trainable weights, optimizer, scheduler, RNG and state.json, written to a temporary folder
and renamed into place, so a crash mid-save leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from prefalign.errors import TrainingError
from prefalign.files import atomic_folder, writing
from prefalign.runtime import distributed

CHECKPOINT_PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied weight once, so safetensors never sees shared storage.
    return {name: p.detach().contiguous().clone() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state()}
    return {
        "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
        "numpy": [state["numpy"][0], state["numpy"][1].tolist(), *state["numpy"][2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int = 2,
) -> Path:
    """Write checkpoints/step-NNNNNN under a temporary name, then rename it into place. Every process
    calls it: the weights, optimizer state and source position are the same on every rank under DDP, so
    rank 0 writes them while the others wait."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    if distributed.is_main_process():
        with writing(run_dir / "checkpoints", "set train.output_dir to another folder"):
            _write_checkpoint(run_dir, final, step, model, optimizer, scheduler, state, keep)
    distributed.barrier()
    return final


def _write_checkpoint(
    run_dir: Path, final: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int,
) -> None:
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as staging:
        save_file(trainable_state(model), str(staging / "model.safetensors"))
        cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
        saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        saved["rng"] = {"torch": torch.get_rng_state(), **cuda}
        for name, value in saved.items():
            # Through a Python file: a full disk is then an OSError (torch.save to a path raises a bare
            # RuntimeError).
            with (staging / f"{name}.pt").open("wb") as handle:
                torch.save(value, handle)
        (staging / "state.json").write_text(json.dumps({"step": step, "rng": _rng_state(), **state}))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders from an interrupted save are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.exists():
        return []
    found = [
        p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns its state.json."""
    weights = load_file(str(path / "model.safetensors"))
    parameters = dict(model.named_parameters())
    missing = [name for name in weights if name not in parameters]
    if missing:
        raise TrainingError(f"checkpoint {path} does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(state["rng"])
    return state
