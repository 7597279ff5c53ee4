"""What every command does first: threads and seeds, the run folder (with its config.yaml), tensors to the
device."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.config import TrainConfig, save_config
from prefalign.errors import ConfigError
from prefalign.models.loading import load_causal_lm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def prepare_run_dir(config: Any, command: str) -> Path:
    """Create the run folder, refuse to clobber a finished run, write the resolved config."""
    train: TrainConfig = config.train
    run_dir = Path(train.output_dir or f"runs/{command}")
    if (run_dir / "final").exists() and not (train.resume or train.overwrite):
        raise ConfigError(
            f"run folder {str(run_dir)!r} already holds a finished run; set train.output_dir to a new "
            "folder, or pass --overwrite true to replace it (--resume true to continue it)"
        )
    if train.overwrite and not train.resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    return run_dir


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch onto the model's device (a no-op where they already are)."""
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def start_run(config: Any, command: str, model=None, tokenizer=None, *, load: Callable = load_causal_lm):
    """What every trainer does first, in this order (seeds before any weight is made, so runs repeat bit for
    bit): threads, seeds, the run folder with its config.yaml, then the model and tokenizer from config.model
    unless given (a model needs its tokenizer). Returns (run_dir, model, tokenizer)."""
    set_threads(config.train.num_threads)
    seed_everything(config.train.seed)
    run_dir = prepare_run_dir(config, command)
    if model is None:
        model, tokenizer = load(config.model)
    elif tokenizer is None:
        raise ConfigError(f"{command}(model=...) needs tokenizer=... as well.")
    return run_dir, model, tokenizer
