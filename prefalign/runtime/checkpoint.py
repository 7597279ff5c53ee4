"""Checkpoints: trainable weights and optimizer state (torch.distributed.checkpoint), scheduler, RNG and
state.json, written to a temporary folder and renamed into place, so a crash mid-save leaves the previous
checkpoint whole."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.errors import TrainingError
from prefalign.files import atomic_folder, writing
from prefalign.runtime import distributed

CHECKPOINT_PREFIX = "step-"


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
    """Write checkpoints/step-NNNNNN under a temporary name, then rename it into place. Every process calls
    it: the trainable weights and the optimizer state go through torch.distributed.checkpoint (each process
    writes its part: with DDP's replicas, rank 0 all of it), the scheduler, RNG and the source's position
    (the same on every rank) through rank 0, which renames the folder once every part is written."""
    from torch.distributed import checkpoint as dcp

    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    tensors = _tensor_state(model, optimizer)
    if not distributed.is_main_process():
        _unwrapped(dcp.save, tensors, checkpoint_id=distributed.broadcast_object(None))
        distributed.barrier()
        return final
    with writing(run_dir / "checkpoints", "set train.output_dir to another folder"):
        with atomic_folder(final) as staging:
            staging_id = distributed.broadcast_object(str(staging))
            _unwrapped(dcp.save, tensors, checkpoint_id=staging_id)
            _write_rank_zero_files(staging, step, scheduler, state)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _unwrapped(function, *args, **kwargs) -> Any:
    """A torch.distributed.checkpoint call whose OSError (full disk, read-only folder) comes out as itself,
    not wrapped in a CheckpointException, so `writing` can name the folder. With one process it runs
    without a process group, and without DCP's warning that says so on every call."""
    from torch.distributed.checkpoint.api import CheckpointException

    single = distributed.world_size() == 1
    try:
        with warnings.catch_warnings():
            if single:
                warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent")
            return function(*args, no_dist=single, **kwargs)
    except CheckpointException as error:
        # Each rank's failure: the exception, or (exception, stack summary) as DCP wraps it.
        failures = [cause[0] if isinstance(cause, tuple) else cause for cause in error.failures.values()]
        causes = [cause for cause in failures if isinstance(cause, OSError)]
        if causes:
            raise causes[0] from None
        raise


def _tensor_state(model, optimizer) -> dict[str, Any]:
    """Trainable weights and optimizer state by parameter name (LoRA: the adapters only), as
    torch.distributed.checkpoint saves and loads them in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=True),
    )
    return {"model": weights, "optimizer": optimizer_state}


def _write_rank_zero_files(staging: Path, step: int, scheduler, state: dict[str, Any]) -> None:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    saved = {"scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state(), **cuda}}
    for name, value in saved.items():
        # Through a Python file: a full disk is then an OSError (torch.save to a path raises a bare
        # RuntimeError).
        with (staging / f"{name}.pt").open("wb") as handle:
            torch.save(value, handle)
    (staging / "state.json").write_text(json.dumps({"step": step, "rng": _rng_state(), **state}))


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
    """Restore everything `save_checkpoint` wrote (every process reads it; any number of processes may
    resume it); returns its state.json."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if (path / "model.safetensors").exists() and not (path / ".metadata").exists():
        raise TrainingError(
            f"checkpoint {path} was written by an earlier prefalign (weights in model.safetensors; "
            "checkpoints now go through torch.distributed.checkpoint): finish that run with the version that "
            "started it, or start it again with --train.overwrite true"
        )
    tensors = _tensor_state(model, optimizer)
    try:
        _unwrapped(dcp.load, tensors, checkpoint_id=str(path))
    except Exception as error:  # noqa: BLE001 -- DCP wraps a missing or unexpected key in its own errors
        raise TrainingError(
            f"checkpoint {path} does not match the model and optimizer of this run ({_first_line(error)}): "
            "resume with the model and settings the run started with, or start a new run"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True),
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(state["rng"])
    return state


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__
