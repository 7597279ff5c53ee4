"""The training runtime: set-up, optimizer and schedule, the loop, checkpoints, metrics (L3)."""

from prefalign.runtime.checkpoint import (
    CHECKPOINT_PREFIX,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from prefalign.runtime.loop import (
    ExampleSource,
    LossOutput,
    Phase,
    Source,
    TrainResult,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    example_stream,
    finished_run,
    lr_factor,
    stop_error,
    total_steps_for,
    train,
    train_on_examples,
)
from prefalign.runtime.metrics import MetricsLogger, read_metrics
from prefalign.runtime.setup import prepare_run_dir, seed_everything, set_threads, to_device, write_run_file

__all__ = [
    "seed_everything",
    "set_threads",
    "prepare_run_dir",
    "write_run_file",
    "finished_run",
    "to_device",
    "CHECKPOINT_PREFIX",
    "save_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "MetricsLogger",
    "read_metrics",
    "build_optimizer",
    "lr_factor",
    "build_scheduler",
    "clip_and_step",
    "example_stream",
    "total_steps_for",
    "LossOutput",
    "TrainResult",
    "train_on_examples",
    "train",
    "Phase",
    "Source",
    "ExampleSource",
    "stop_error",
]
