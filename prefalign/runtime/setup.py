"""What every command does first: threads and seeds, the run folder (with its config.yaml), tensors to the
device."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.config import ModelConfig, TrainConfig, save_config
from prefalign.errors import ConfigError, PrefalignError
from prefalign.files import atomic_file, writing
from prefalign.models.loading import load_causal_lm, resolve_dtype
from prefalign.runtime import distributed
from prefalign.runtime.run_folder import (
    CONFIG_FILE,
    check_new_run,
    check_resume,
    clear_run,
    run_dir_for,
)

logger = logging.getLogger("prefalign")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def prepare_run_dir(config: Any, command: str) -> Path:
    """The run folder, as train.resume / train.overwrite say (prefalign.runtime.run_folder has the rules): a
    new run refuses a folder holding a run or files a run would replace; overwrite removes only what a
    previous run wrote; resume checks the config against the run's config.yaml and keeps that file. Writes
    the resolved config.yaml (unless resuming)."""
    run_dir = run_dir_for(config.train, command)
    # Rank 0 alone checks and writes the folder (another rank would find rank 0's config.yaml there); its
    # verdict reaches every process, so a refusal is an error on all of them.
    problem = distributed.on_main_process(_prepare_run_dir, config, command, run_dir)
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem
    return run_dir


def _prepare_run_dir(config: Any, command: str, run_dir: Path) -> PrefalignError | None:
    """The folder checked and config.yaml written (rank 0); the refusal returned rather than raised."""
    train: TrainConfig = config.train
    try:
        with writing(run_dir, "set train.output_dir to another folder"):
            if train.resume:
                check_resume(config, run_dir)
            elif train.overwrite:
                clear_run(run_dir, command)
            else:
                check_new_run(run_dir, command)
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (train.resume and (run_dir / CONFIG_FILE).exists()):
                with atomic_file(run_dir / CONFIG_FILE) as staging:
                    save_config(config, staging)
    except PrefalignError as error:
        return error
    return None


def write_run_file(path: Path, text: str) -> None:
    """A small file of the run folder (data_stats.json, ...), written atomically; a read-only folder or a
    full disk is an OutputError naming it. Rank 0 writes it; the other processes go on."""
    if not distributed.is_main_process():
        return
    with writing(path, "set train.output_dir to another folder"), atomic_file(path) as staging:
        staging.write_text(text)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a collated batch onto the model's device (a no-op where they already are)."""
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }


def master_weights(config: Any) -> ModelConfig:
    """The model section to load the trained model with: under distributed.strategy fsdp, float32 master
    weights (FSDP computes in distributed.compute_dtype over them: AdamW steps at lr ~1e-6 round away in
    bf16 weights); a bf16/fp16 model.dtype is refused there, before anything loads."""
    parallel = getattr(config, "distributed", None)
    if parallel is None or parallel.strategy != "fsdp":
        return config.model
    if config.model.dtype in ("bfloat16", "float16"):
        raise ConfigError(
            f"model.dtype {config.model.dtype} would make FSDP's master weights {config.model.dtype}, where "
            "small AdamW steps round away: under distributed.strategy fsdp leave model.dtype auto (float32 "
            "shards) and set --distributed.compute_dtype bfloat16 for bf16 forwards and backwards"
        )
    if not distributed.group_active():
        logger.warning("distributed.strategy fsdp with one process: nothing to shard, the model trains whole")
        return config.model
    return dataclasses.replace(config.model, dtype="float32")


def copy_dtype(config: Any, device: torch.device) -> torch.dtype | None:
    """The dtype for a frozen copy of the policy (a reference) under FSDP: the compute dtype when it is not
    the fp32 of the master weights (the copy only runs forwards, whole on each process), else None (as
    loaded)."""
    parallel = getattr(config, "distributed", None)
    if parallel is None or parallel.strategy != "fsdp" or not distributed.group_active():
        return None
    dtype = resolve_dtype(parallel.compute_dtype, device)
    return None if dtype == torch.float32 else dtype


def start_run(config: Any, command: str, model=None, tokenizer=None, *, load: Callable = load_causal_lm):
    """What every trainer does first, in this order (seeds before any weight is made, so runs repeat bit for
    bit): threads, seeds, the run folder with its config.yaml, then the model and tokenizer from config.model
    unless given (a model needs its tokenizer). Returns (run_dir, model, tokenizer)."""
    set_threads(config.train.num_threads)
    seed_everything(config.train.seed)
    run_dir = prepare_run_dir(config, command)
    if model is None:
        model, tokenizer = load(master_weights(config))
    elif tokenizer is None:
        raise ConfigError(f"{command}(model=...) needs tokenizer=... as well.")
    return run_dir, model, tokenizer
