"""The one training loop every algorithm runs, and the optimizer, schedule and clipping it uses.

`train` owns everything but the step: optimizer and schedule, gradient accumulation over micro-batches, the
step normaliser, the NaN/inf guard, clipping, eval cadence, logging, checkpoints and bit-exact resume. What
it optimises comes from a *source* of phases: an offline trainer's source (`ExampleSource`) hands out one
optimizer step per phase, drawn from a shuffled stream of examples; an RL source collects experience
(rollouts, rewards, reference log-probs) and hands out the optimizer steps that batch feeds. Checkpoints fall
on phase boundaries, so there is never a half-used rollout to save.

Exact resume: a source's position is a few numbers (examples consumed, generation calls made) from which its
stream is a fixed function; weights, optimizer and scheduler state and RNG states are saved with them, so a
resumed run repeats the uninterrupted one bit for bit on the same machine and threads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from prefalign.config import DistributedConfig, TrainConfig, validate
from prefalign.errors import ConfigError, TrainingError
from prefalign.files import writing
from prefalign.models.loading import model_device, resolve_dtype
from prefalign.runtime import distributed
from prefalign.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefalign.runtime.metrics import MetricsLogger
from prefalign.runtime.run_folder import (
    last_step,
    read_log,
    remove_interrupted_saves,
    run_dir_for,
    trim_step_logs,
)
from prefalign.runtime.setup import to_device

logger = logging.getLogger("prefalign")


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, learning_rates: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: weight decay except on biases and norm gains, at
    config.learning_rate, or at learning_rates[prefix] for parameters whose name starts with that prefix
    (PPO's critic has its own rate). With one rate the groups are exactly [decay, no decay]."""
    rates = learning_rates or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        rate = next((lr for prefix, lr in rates.items() if name.startswith(prefix)), config.learning_rate)
        # Biases and norm gains are scale parameters: decaying them only hurts.
        decayed = not (parameter.ndim < 2 or "norm" in name.lower())
        groups.setdefault((rate, decayed), []).append(parameter)
    ordered = sorted(groups, key=lambda key: (key[0] != config.learning_rate, -key[0], not key[1]))
    parameters = [p for params in groups.values() for p in params]
    # The fused kernel (one pass over all parameters; transformers' Trainer default too) is about 5x faster
    # than the per-tensor update on CPU; it needs floating parameters on CPU or CUDA.
    fused = config.fused_optimizer and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters
    )
    return torch.optim.AdamW(
        [
            {"params": groups[key], "lr": key[0], "weight_decay": config.weight_decay if key[1] else 0.0}
            for key in ordered
        ],
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
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the norm over every process's shards
        norm = norm.full_tensor()
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


def total_steps_for(num_examples: int, config: TrainConfig, per_step: int | None = None) -> int:
    """max_steps, or the steps of `epochs` passes over the examples (per_step of them a step: batch_size x
    grad_accum by default)."""
    if config.max_steps > 0:
        return config.max_steps
    per_step = per_step or config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * num_examples / per_step))


@dataclass
class LossOutput:
    """What an algorithm's loss function returns for one micro-batch.

    `loss_sum` is summed over the micro-batch's units (tokens for SFT, pairs for DPO); the loop divides by
    the units of the whole optimizer step (`units_of`, summed over processes), so batch 8 x accumulation 1
    and batch 1 x accumulation 8 give the same update. `metrics` are sums over the same units. A loss that
    normalises itself over the step (RL: its normaliser depends on the loss type) is run with
    `units_of=None`: then `loss_sum` is its share of the step's loss and `metrics` its share of each mean.
    """

    loss_sum: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # non-pad tokens processed, for tokens_per_second
    maxima: dict[str, float] = field(default_factory=dict)  # metrics the step reports as their largest value


@dataclass
class TrainResult:
    step: int
    metrics: list[dict[str, Any]]
    run_dir: Path
    wall_time: float


@dataclass
class Phase:
    """What a source hands the loop: the micro-batches of one or more optimizer steps (an RL rollout batch
    feeds several), the metrics they share (rollout statistics, the epoch) and the seconds spent making them
    (generation and scoring for RL), which are shared among its steps in step_time."""

    steps: list[list[dict[str, Any]]]
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    generation: bool = False  # report `seconds` as generation time (RL)
    logged: list[dict[str, Any]] = field(default_factory=list)  # samples to write (RL's completions.jsonl)


class Source(Protocol):
    """Where the optimizer steps come from; `state` (JSON-able) is saved in checkpoints."""

    def next_phase(self, step: int, steps_left: int) -> Phase: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


class ExampleSource:
    """Offline training: one optimizer step per phase, batch_size x grad_accum examples from a shuffled
    stream (with `grouped`, grad_accum ready-made micro-batches: the reward model's length-grouped batches).

    The stream is one global order; with N processes each takes a contiguous 1/N of every step's examples,
    in micro-batches of at most batch_size (the same number on every rank), so a step's examples are the
    same whatever N is.
    """

    def __init__(
        self, examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, Any]], config: TrainConfig,
        *, grouped: bool = False,
    ):
        self.examples, self.collate, self.config, self.grouped = examples, collate, config, grouped
        self.per_step = config.grad_accum if grouped else config.batch_size * config.grad_accum
        global_examples = config.batch_size * config.grad_accum
        processes = distributed.world_size()
        if global_examples % processes:
            raise ConfigError(
                f"{processes} processes cannot share a step of batch_size x grad_accum = "
                f"{config.batch_size} x {config.grad_accum} = {global_examples} examples evenly: choose "
                f"batch_size x grad_accum divisible by {processes} (the global batch of an optimizer step)."
            )
        self.per_rank = global_examples // processes
        self.restore({"position": 0})

    def restore(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.stream = example_stream(len(self.examples), self.config.seed, start=self.position)

    def state(self) -> dict[str, Any]:
        return {"position": self.position}

    def next_phase(self, step: int, steps_left: int) -> Phase:
        drawn = [self.examples[next(self.stream)] for _ in range(self.per_step)]
        self.position += self.per_step
        if distributed.world_size() == 1:
            chunks = drawn if self.grouped else [
                drawn[start:start + self.config.batch_size]
                for start in range(0, len(drawn), self.config.batch_size)
            ]
        else:
            flat = [example for batch in drawn for example in batch] if self.grouped else drawn
            share = distributed.shard(flat)
            if not share:
                raise TrainingError(f"step {step + 1}: no examples left for process {distributed.rank()}")
            parts = min(-(-self.per_rank // self.config.batch_size), len(share))
            chunks = [share[slice(*distributed.shard_bounds(len(share), parts, i))] for i in range(parts)]
        micro_batches = [self.collate(chunk) for chunk in chunks]
        return Phase(steps=[micro_batches], metrics={"epoch": self.position / len(self.examples)})


def train(
    *,
    model: torch.nn.Module,
    source: Source,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], LossOutput],
    units_of: Callable[[dict[str, Any]], float] | None,
    config: TrainConfig,
    run_dir: Path,
    total_steps: int,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    description: str = "train",
    prepare_step: Callable[[list[dict[str, Any]]], None] | None = None,
    after_phase: Callable[[Phase, int, int], None] | None = None,
    max_seconds: float = 0.0,
    learning_rates: dict[str, float] | None = None,
    parallel: DistributedConfig | None = None,
) -> TrainResult:
    """Optimise `loss_fn` over the steps `source` hands out until `total_steps` (or `max_seconds`, checked at
    phase boundaries). `prepare_step` sees each step's micro-batches before the first forward pass (step-wide
    totals a loss needs); `after_phase(phase, first_step, last_step)` runs after each phase's steps;
    `parallel` says how several processes share the model (DDP replicas by default, or FSDP2 shards)."""
    # The train and distributed sections' rules, for callers that did not validate their whole config.
    validate(config)
    parallel = validate(parallel or DistributedConfig())
    device = model_device(model)
    # Training forwards go through DDP or FSDP under a process group (FSDP shards the model in place, so the
    # optimizer is built after it); rank 0 alone writes metrics and shows progress.
    run = distributed.wrap(
        model, parallel.strategy, cpu_offload=parallel.cpu_offload,
        compute_dtype=resolve_dtype(parallel.compute_dtype, device),  # the one precision rule
    )
    optimizer = build_optimizer(model, config, learning_rates)
    scheduler = build_scheduler(optimizer, config, total_steps)
    step = resume(config, run_dir, model, optimizer, scheduler, source)
    metrics_logger = MetricsLogger(
        run_dir, total_steps, config, initial_step=step, description=description,
        enabled=distributed.is_main_process(),
    )
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    model.train()
    try:
        while step < total_steps and not out_of_time(started, max_seconds):
            first_step, phase_started = step, time.perf_counter()
            phase = source.next_phase(step, total_steps - step)
            phase.seconds += time.perf_counter() - phase_started
            for micro_batches in phase.steps:
                micro_batches = [to_device(batch, device) for batch in micro_batches]
                step_started = time.perf_counter()
                try:
                    if prepare_step is not None:
                        prepare_step(micro_batches)
                    if run.lockstep:  # sharded forwards: the same number on every process
                        micro_batches = in_lockstep(micro_batches)
                    metrics = accumulate(run, micro_batches, loss_fn, units_of, step)
                    metrics["grad_norm"] = clip_and_step(model, optimizer, scheduler, config.max_grad_norm)
                except TrainingError as error:
                    raise stop_error(error, step, run_dir) from None
                step += 1
                record = step_record(phase, metrics, time.perf_counter() - step_started, scheduler)
                if evaluate is not None and due(config.eval_every, step) and step < total_steps:
                    record.update({f"eval/{key}": value for key, value in evaluate(model).items()})
                    model.train()
                if due(config.log_every, step) or step == total_steps:
                    metrics_logger.log(step, record)
                history.append({"step": step, **record})
                metrics_logger.advance()
            if after_phase is not None:
                after_phase(phase, first_step, step)
            every = config.save_every
            if every > 0 and step // every > first_step // every and step < total_steps:
                save_checkpoint(
                    run_dir, step, model, optimizer, scheduler, source.state(), keep=config.keep_checkpoints,
                )
        if step < total_steps:
            reached = (description, max_seconds, step, total_steps)
            logger.warning("%s: max_time of %.0f s reached after %d of %d steps", *reached)
        if evaluate is not None:
            final_eval = {f"eval/{key}": value for key, value in evaluate(model).items()}
            metrics_logger.log(step, final_eval)
            history.append({"step": step, **final_eval})
    finally:
        metrics_logger.close()
    return TrainResult(step=step, metrics=history, run_dir=run_dir, wall_time=time.perf_counter() - started)


def out_of_time(started: float, max_seconds: float) -> bool:
    """Whether a wall-clock limit (0 = none) is reached; rank 0's clock decides for every process, so all
    stop at the same phase boundary."""
    if not max_seconds:
        return False
    return bool(distributed.broadcast_object(time.perf_counter() - started > max_seconds))


def due(every: int, step: int) -> bool:
    """Whether a cadence (eval_every, log_every; 0 = never) falls on this step."""
    return every > 0 and step % every == 0


def resume(config: TrainConfig, run_dir: Path, model, optimizer, scheduler, source: Source) -> int:
    """The step to start from: 0, or the last checkpoint's (model, optimizer, RNG and source restored; the
    step logs cut back to it; staging folders of an interrupted checkpoint save removed)."""
    if not config.resume:
        return 0
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    state = load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
    source.restore(state)
    if distributed.is_main_process():
        with writing(run_dir, "set train.output_dir to another folder"):
            remove_interrupted_saves(run_dir)
            trim_step_logs(run_dir, state["step"])
    distributed.barrier()
    logger.warning("resumed from checkpoint step %d (%s)", state["step"], checkpoints[-1])
    return state["step"]


def finished_run(config: Any, command: str) -> TrainResult | None:
    """With train.resume on a finished run (final/ exists): says so and returns its TrainResult without
    training: `step` is the run's last step, `metrics` the records of its metrics.jsonl, `wall_time` 0.
    None otherwise (train as usual)."""
    run_dir = run_dir_for(config.train, command)
    if not (config.train.resume and (run_dir / "final").is_dir()):
        return None
    step = last_step(run_dir)
    logger.warning(
        "%s: the run in %s is already finished (step %d, model in %s): nothing to resume. To train it "
        "again pass --train.overwrite true instead of --train.resume, or set a new train.output_dir.",
        command, run_dir, step, run_dir / "final",
    )  # fmt: skip
    return TrainResult(step=step, metrics=read_log(run_dir / "metrics.jsonl"), run_dir=run_dir, wall_time=0.0)


def step_record(phase: Phase, metrics: dict[str, float], train_seconds: float, scheduler) -> dict[str, float]:
    """One optimizer step's metrics: the phase's, the update's, and timing (the phase's time is shared by
    its steps)."""
    shared = phase.seconds / len(phase.steps)
    step_time = shared + train_seconds
    tokens = metrics.pop("tokens")  # prompt + completion tokens the step trained on
    timing = {"step_time": step_time, "tokens_per_second": tokens / step_time}
    if phase.generation:
        timing.update(generation_time=shared, generation_share=shared / step_time)
    return {**phase.metrics, **metrics, "learning_rate": scheduler.get_last_lr()[0], **timing}


def in_lockstep(micro_batches: list[dict[str, Any] | None]) -> list[dict[str, Any] | None]:
    """A step's micro-batches padded with idle ones (None) to the largest count over the processes: under
    FSDP every forward and backward gathers and scatters weights collectively, so a rank with one micro-batch
    fewer (an RL share one group short) runs an idle one. Idle micro-batches add nothing to gradients or
    metrics."""
    most = int(distributed.max_tensor_across(torch.tensor([len(micro_batches)], dtype=torch.float64)).item())
    return micro_batches + [None] * (most - len(micro_batches))


def accumulate(
    run, micro_batches: list[dict[str, Any] | None], loss_fn, units_of, step: int,
) -> dict[str, float]:
    """Forward/backward every micro-batch of one optimizer step; the loss is normalised over the step.
    `run(loss_fn, batch)` runs the loss on the model (through DDP or FSDP under a process group:
    distributed.wrap); an idle micro-batch (None, in_lockstep) repeats the first with its loss times zero."""
    # The normaliser (tokens, pairs, ...) of the whole step, over every process, before the first backward.
    step_units = 1.0
    if units_of is not None:
        step_units = max(
            distributed.sum_across(float(sum(units_of(b) for b in micro_batches if b is not None))), 1e-12,
        )
    totals: dict[str, float] = {"loss": 0.0, "tokens": 0.0}
    maxima: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        # DDP: gradients cross processes once per step, on its last micro-batch (forward and backward inside).
        with run.micro_batch(sync=index == len(micro_batches) - 1):
            output = run(loss_fn, micro_batches[0] if batch is None else batch)
            if batch is None:
                run.backward(output.loss_sum * 0.0)
                continue
            if not torch.isfinite(output.loss_sum):
                raise TrainingError(f"loss is {output.loss_sum.item()}")
            run.backward(output.loss_sum / step_units if units_of is not None else output.loss_sum)
        totals["loss"] += output.loss_sum.item()
        totals["tokens"] += output.tokens
        for key, value in output.metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        for key, value in output.maxima.items():
            maxima[key] = max(maxima.get(key, value), value)
    totals, maxima = _across_processes(totals, sum_of=True), _across_processes(maxima, sum_of=False)
    means = {key: (value if key == "tokens" else value / step_units) for key, value in totals.items()}
    return {**means, **maxima}


def _across_processes(values: dict[str, float], *, sum_of: bool) -> dict[str, float]:
    """Each process's step metrics (partial sums, or maxima) combined over every process; every rank runs
    the same loss function, so the keys agree."""
    if distributed.world_size() == 1 or not values:
        return values
    keys = sorted(values)
    vector = torch.tensor([values[key] for key in keys], dtype=torch.float64)
    combined = distributed.sum_tensor_across(vector) if sum_of else distributed.max_tensor_across(vector)
    return dict(zip(keys, combined.tolist(), strict=True))


def stop_error(error: TrainingError, step: int, run_dir: Path) -> TrainingError:
    """The NaN/inf guard's message: where it happened, what is kept, what to try."""
    kept = list_checkpoints(run_dir)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    return TrainingError(
        f"{error} at optimizer step {step + 1}: training stopped before the update; {where}. "
        "Lower train.learning_rate, check the data for empty or extreme rows, or keep max_grad_norm on."
    )


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
    grouped: bool = False,
    parallel: DistributedConfig | None = None,
) -> TrainResult:
    """`train` over shuffled micro-batches of `examples` (SFT, DPO, the reward model; `grouped`: the
    examples are ready-made micro-batches, ExampleSource)."""
    source = ExampleSource(examples, collate, config, grouped=grouped)
    return train(
        model=model, source=source, loss_fn=loss_fn, units_of=units_of, config=config, run_dir=run_dir,
        total_steps=total_steps_for(len(examples), config, source.per_step), evaluate=evaluate,
        description=description, prepare_step=prepare_step, parallel=parallel,
    )  # fmt: skip
