"""The distributed seam: the only module that talks to torch.distributed.

Launch: `torchrun` and `accelerate launch` start N processes with RANK / WORLD_SIZE / MASTER_ADDR in their
environment; `start()` joins them into one process group (NCCL on GPU, gloo on CPU) with a timeout on every
collective. Without those variables nothing is started and every function here is the identity, so one
process behaves exactly as it would with no torch.distributed at all.

Training: `wrap` runs each loss function inside DistributedDataParallel's forward, with a comm hook that
*sums* gradients (every loss is already divided by the step's global count, so DDP's default average would
divide twice), and `no_sync` skips the all-reduce on every micro-batch but a step's last.

Everything that crosses examples goes through here too: step normalisers (tokens, completions, pairs),
batch-level reward statistics, whitening, logged means, gathers of per-example outputs, and a rank's share
of a global list (`shard_bounds`).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from prefalign.errors import ConfigError

logger = logging.getLogger("prefalign")

# Seconds any collective may wait for the other processes before the job fails (a rank that died or hangs
# ends the job instead of blocking it forever). PREFALIGN_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 1800

# What `accelerate launch` exports for settings prefalign would otherwise silently ignore.
ACCELERATE_REFUSED = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def _group_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_world_size() -> int:
    """The number of processes a launcher started (WORLD_SIZE), 1 when run directly."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def check_launch_settings() -> None:
    """Refuse launcher settings prefalign does not honour (accelerate's FSDP / DeepSpeed / precision), before
    any process group exists."""
    for variable, name in ACCELERATE_REFUSED.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"`accelerate launch` was configured for {name} ({variable}=true), which prefalign does not "
                "use: it trains with DistributedDataParallel. Run `accelerate launch` with a plain "
                "multi-process config (no --use_fsdp / --use_deepspeed), or torchrun."
            )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("", "no"):
        raise ConfigError(
            f"`accelerate launch` asked for mixed precision {precision!r} (ACCELERATE_MIXED_PRECISION); "
            "prefalign sets precision itself (model.dtype, mixed_precision). Launch with "
            "--mixed_precision no and set prefalign's options instead."
        )


def start() -> bool:
    """Join the process group a launcher set up (a no-op with one process). Returns whether one is active."""
    if _group_active():
        return True
    if launched_world_size() <= 1:
        return False
    check_launch_settings()
    seconds = int(os.environ.get("PREFALIGN_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=seconds)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl", timeout=timeout)
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    if not is_main_process():
        # One voice: the other ranks keep warnings and errors only.
        logging.getLogger("prefalign").setLevel(logging.WARNING)
    return True


def stop() -> None:
    """Leave the process group (end of a command)."""
    if _group_active():
        torch.distributed.destroy_process_group()


def refuse(command: str, why: str) -> None:
    """For commands that run in one process only (`base`, `demo`): a clear error under a launcher."""
    size = launched_world_size()
    if size > 1:
        raise ConfigError(
            f"`prefalign {command}` runs in one process ({why}), but it was started as {size} processes "
            f"(WORLD_SIZE={size}). Run it without torchrun / accelerate launch."
        )


def rank() -> int:
    return torch.distributed.get_rank() if _group_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _group_active() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes run folders, logs and prints."""
    return rank() == 0


def barrier() -> None:
    if _group_active():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (builds a file the others then read); the others wait, then run it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def on_main_process(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` on rank 0 only (a write: the final model folder, a report), while the other
    processes wait until it is done. Returns its result on rank 0, None on the others."""
    result = function(*args, **kwargs) if is_main_process() else None
    barrier()
    return result


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every process."""
    if not _group_active():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(value: float) -> float:
    """The sum of `value` over every process (a step normaliser: tokens, pairs, completions)."""
    if not _group_active():
        return value
    return float(sum_tensor_across(torch.tensor([value], dtype=torch.float64)).item())


def sum_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over every process (sums and counts behind a logged mean or a std)."""
    return _all_reduce(values, torch.distributed.ReduceOp.SUM) if _group_active() else values


def max_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over every process (metrics a step reports as their largest value)."""
    return _all_reduce(values, torch.distributed.ReduceOp.MAX) if _group_active() else values


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    """An all-reduce of a copy, on the device the backend needs (NCCL: this rank's GPU), returned where
    `values` was."""
    device = torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else values.device
    total = values.detach().to(device, copy=True)
    torch.distributed.all_reduce(total, op=op)
    return total.to(values.device)


def _backend() -> str:
    return str(torch.distributed.get_backend())


def gather_across(items: list[Any]) -> list[Any]:
    """Every process's `items`, concatenated in rank order (per-example outputs, whole groups)."""
    if not _group_active():
        return list(items)
    gathered: list[list[Any]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def shard_bounds(count: int, parts: int | None = None, index: int | None = None) -> tuple[int, int]:
    """[start, end) of part `index` (default: this rank) of `count` items cut into `parts` (default: the
    world size) contiguous pieces whose sizes differ by at most one, larger pieces first."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(items: list[Any]) -> list[Any]:
    """This rank's contiguous share of a global list (all of it with one process)."""
    start, end = shard_bounds(len(items))
    return items[start:end]


def map_shards(function: Callable[..., list[Any]], *sequences: list[Any]) -> list[Any]:
    """`function` over this rank's contiguous share of equally long `sequences` (all of them with one
    process); every rank gets every result back, in order. For per-item work with no collective inside
    (sampling, scoring, reference log-probs): shares may differ by one item without any rank waiting."""
    if world_size() == 1:
        return list(function(*sequences))
    start, end = shard_bounds(len(sequences[0]))
    return gather_across(function(*(sequence[start:end] for sequence in sequences)))


class ShardedEngine:
    """A rollout engine whose calls every process makes together: each samples a contiguous 1/N of the
    prompts, keyed by their index in the whole call (the engine's keyed sampling), and every process gets
    all the samples back in prompt order. Rewards, group statistics and sampling decisions computed from
    them are then the same on every rank and the same as with one process. With one process, the engine."""

    def __init__(self, engine: Any):
        self.engine = engine

    def generate(self, prompt_token_ids: list[list[int]], params: Any, keys: list[int] | None = None):
        keys = list(range(len(prompt_token_ids))) if keys is None else list(keys)
        return map_shards(
            lambda prompts, share: self.engine.generate(prompts, params, keys=share), prompt_token_ids, keys,
        )

    def __getattr__(self, name: str) -> Any:  # last_stats, model, ... of the wrapped engine
        return getattr(self.engine, name)


def _sum_gradients(_state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP comm hook: all-reduce a gradient bucket as a sum (DDP's own hook divides by the world size)."""
    work = torch.distributed.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class _LossForward(torch.nn.Module):
    """The model with a forward that runs a whole loss function on it: DDP then sees every forward the loss
    makes (a prompt prefill and its completions, PPO's policy and critic) as one forward before one backward,
    whatever submodules the loss calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[torch.nn.Module, Any], Any], batch: Any) -> Any:
        return loss_fn(self.model, batch)


def wrap(model: torch.nn.Module) -> Callable[[Callable[[torch.nn.Module, Any], Any], Any], Any]:
    """`run(loss_fn, batch)` for training forwards: `loss_fn(model, batch)`, through DistributedDataParallel
    with summed gradients under a process group. Generation, reference, reward and evaluation forwards use
    the model itself (no DDP hooks)."""
    if not _group_active() or not any(p.requires_grad for p in model.parameters()):
        return lambda loss_fn, batch: loss_fn(model, batch)
    device = next(model.parameters()).device
    # Buffers (rotary tables, ...) are the same on every rank and never trained: no per-forward sync. The
    # keyword was renamed in torch 2.13.
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    replicated = torch.nn.parallel.DistributedDataParallel(
        _LossForward(model), device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True, **{keyword: False},
    )
    replicated.register_comm_hook(None, _sum_gradients)
    return replicated


@contextlib.contextmanager
def no_sync(run: Any, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for this backward (a micro-batch before the step's last)."""
    if skip and isinstance(run, torch.nn.parallel.DistributedDataParallel):
        with run.no_sync():
            yield
    else:
        yield
