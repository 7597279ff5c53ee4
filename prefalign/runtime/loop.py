"""The training runtime every algorithm shares.

Optimizer, schedule, accumulation, clipping, seeding, checkpoint/resume, metrics and progress. The
algorithms keep their own loops (one file each) and call these pieces; `train_on_examples` is the loop
for the dataset-driven ones (SFT, DPO, reward model).

Exact resume: the training stream is a fixed function of (seed, epoch), so the data position is just
the number of examples consumed; model weights, optimizer and scheduler state and RNG states are saved
together, so a resumed run repeats the uninterrupted one bit for bit on the same machine and threads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.config import TrainConfig
from prefalign.errors import ConfigError, TrainingError
from prefalign.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefalign.runtime.metrics import MetricsLogger
from prefalign.runtime.setup import to_device

logger = logging.getLogger("prefalign")


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        # Biases and norm gains are scale parameters: decaying them only hurts.
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (one pass over all parameters; transformers' Trainer default too) is about 5x faster
    # than the per-tensor update on CPU; it needs floating parameters on CPU or CUDA.
    fused = config.fused_optimizer and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay
    )
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=fused or None,
    )


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    warmup = int(round(config.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = config.min_lr_ratio
    if config.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def clip_and_step(model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, zero grads; returns the pre-clip global gradient norm. Raises on a non-finite norm."""
    parameters = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm_value = float(norm)
    if not math.isfinite(norm_value):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"gradient norm is {norm_value}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm_value


def example_stream(num_examples: int, seed: int, start: int = 0) -> Iterator[int]:
    """Indices of an endless sequence of shuffled epochs, from position `start`.

    Epoch e is a permutation drawn from its own generator (seed, e), so any position can be reached
    again without replaying the past: resume needs only the count of examples consumed.
    """
    if num_examples == 0:
        raise TrainingError("no training examples left after loading and filtering")
    epoch, offset = divmod(start, num_examples)
    while True:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


def total_steps_for(num_examples: int, config: TrainConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * num_examples / per_step))


@dataclass
class LossOutput:
    """What an algorithm's loss function returns for one micro-batch.

    `loss_sum` is summed over the micro-batch's units (tokens for SFT, pairs for DPO); the runtime divides
    by the units of the whole optimizer step (`units_of`), so batch 8 x accumulation 1 and batch 1 x
    accumulation 8 give the same update. `metrics` are sums over the same units (averaged by the runtime).
    """

    loss_sum: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # non-pad tokens processed, for tokens_per_second


@dataclass
class TrainResult:
    step: int
    metrics: list[dict[str, Any]]
    run_dir: Path
    wall_time: float


def train_on_examples(
    *,
    model: torch.nn.Module,
    examples: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, Any]],
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], LossOutput],
    units_of: Callable[[dict[str, Any]], float],
    config: TrainConfig,
    run_dir: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    description: str = "train",
    prepare_step: Callable[[list[dict[str, Any]]], None] | None = None,
) -> TrainResult:
    """Optimise `loss_fn` over shuffled micro-batches of `examples` with the shared runtime.

    `prepare_step`, when given, sees the collated micro-batches of each optimizer step before the first
    forward pass, to add step-wide totals a loss needs (for example the chosen-token count of RPO's SFT term).
    """
    if config.batch_size < 1 or config.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be at least 1")
    total_steps = total_steps_for(len(examples), config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    step, position = 0, 0
    checkpoints = list_checkpoints(run_dir)
    if config.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        step, position = state["step"], state["position"]
    elif config.resume:
        raise ConfigError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    stream = example_stream(len(examples), config.seed, start=position)
    device = next(model.parameters()).device
    logger = MetricsLogger(run_dir, total_steps, config, initial_step=step, description=description)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    model.train()
    try:
        while step < total_steps:
            step_started = time.perf_counter()
            micro_batches = [
                to_device(collate([examples[next(stream)] for _ in range(config.batch_size)]), device)
                for _ in range(config.grad_accum)
            ]
            position += config.batch_size * config.grad_accum
            try:
                if prepare_step is not None:
                    prepare_step(micro_batches)
                metrics = _accumulate(model, micro_batches, loss_fn, units_of, step)
                metrics["grad_norm"] = clip_and_step(model, optimizer, scheduler, config.max_grad_norm)
            except TrainingError as error:
                raise stop_error(error, step, run_dir) from None
            step += 1
            elapsed = time.perf_counter() - step_started
            metrics.update(
                learning_rate=scheduler.get_last_lr()[0], step_time=elapsed,
                tokens_per_second=metrics.pop("tokens") / elapsed, epoch=position / len(examples),
            )
            if (
                evaluate is not None and config.eval_every > 0 and step % config.eval_every == 0
                and step < total_steps
            ):
                metrics.update({f"eval/{k}": v for k, v in evaluate(model).items()})
                model.train()
            if step % config.log_every == 0 or step == total_steps:
                logger.log(step, metrics)
            history.append({"step": step, **metrics})
            logger.advance()
            if config.save_every > 0 and step % config.save_every == 0 and step < total_steps:
                save_checkpoint(
                    run_dir, step, model, optimizer, scheduler, {"position": position},
                    keep=config.keep_checkpoints,
                )
        if evaluate is not None:
            final_eval = {f"eval/{k}": v for k, v in evaluate(model).items()}
            logger.log(step, final_eval)
            history.append({"step": step, **final_eval})
    finally:
        logger.close()
    return TrainResult(step=step, metrics=history, run_dir=run_dir, wall_time=time.perf_counter() - started)


def _accumulate(model, micro_batches: list[dict[str, Any]], loss_fn, units_of, step: int) -> dict[str, float]:
    """Forward/backward every micro-batch of one optimizer step; the loss is normalised over the step."""
    # The normaliser (tokens, pairs, ...) of the whole step must be known before the first backward.
    step_units = max(float(sum(units_of(batch) for batch in micro_batches)), 1e-12)
    totals: dict[str, float] = {"loss": 0.0, "tokens": 0.0}
    for batch in micro_batches:
        output = loss_fn(model, batch)
        if not torch.isfinite(output.loss_sum):
            raise TrainingError(f"loss is {output.loss_sum.item()} at optimizer step {step + 1}")
        (output.loss_sum / step_units).backward()
        totals["loss"] += output.loss_sum.item()
        totals["tokens"] += output.tokens
        for key, value in output.metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {key: (value if key == "tokens" else value / step_units) for key, value in totals.items()}


def stop_error(error: TrainingError, step: int, run_dir: Path) -> TrainingError:
    """The NaN/inf guard's message: where it happened, what is kept, what to try."""
    kept = list_checkpoints(run_dir)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    return TrainingError(
        f"{error} at optimizer step {step + 1}: training stopped before the update; {where}. "
        "Lower train.learning_rate, check the data for empty or extreme rows, or keep max_grad_norm on."
    )
