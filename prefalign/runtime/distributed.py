"""The distributed seam: the only module that talks to torch.distributed.

Launch: `torchrun` and `accelerate launch` start N processes with RANK / WORLD_SIZE / MASTER_ADDR in their
environment; `start()` joins them into one process group (NCCL on GPU, gloo on CPU) with a timeout on every
collective. Without those variables nothing is started and every function here is the identity, so one
process behaves exactly as it would with no torch.distributed at all.

Training: `wrap` returns the Runner the loop trains through. `ddp`: each loss function runs inside
DistributedDataParallel's forward, with a comm hook that *sums* gradients (every loss is already divided by
the step's global count, so DDP's default average would divide twice), and no all-reduce on every
micro-batch but a step's last. `fsdp`: FSDP2 (`fully_shard`) shards parameters, gradients and optimizer
state; forwards whose count differs between processes (generation) run on `full_weights(model)`, a plain twin
filled with the gathered weights.

Everything that crosses examples goes through here too: step normalisers (tokens, completions, pairs),
batch-level reward statistics, whitening, logged means, gathers of per-example outputs, and a rank's share
of a global list (`shard_bounds`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import inspect
import logging
import os
import weakref
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


def group_active() -> bool:
    """Whether a process group exists (a launcher started several processes, or a caller made one)."""
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
                "take from accelerate: it sets up DDP or FSDP2 itself (--distributed.strategy ddp|fsdp). Run "
                "`accelerate launch` with a plain multi-process config (no --use_fsdp / --use_deepspeed), or "
                "torchrun."
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
    if group_active():
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
    if group_active():
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
    return torch.distributed.get_rank() if group_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if group_active() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes run folders, logs and prints."""
    return rank() == 0


def barrier() -> None:
    if group_active():
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
    if not group_active():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(value: float) -> float:
    """The sum of `value` over every process (a step normaliser: tokens, pairs, completions)."""
    if not group_active():
        return value
    return float(sum_tensor_across(torch.tensor([value], dtype=torch.float64)).item())


def sum_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over every process (sums and counts behind a logged mean or a std)."""
    return _all_reduce(values, torch.distributed.ReduceOp.SUM) if group_active() else values


def max_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over every process (metrics a step reports as their largest value)."""
    return _all_reduce(values, torch.distributed.ReduceOp.MAX) if group_active() else values


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
    if not group_active():
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
        model = self.engine.model
        # Under FSDP each rank decodes its share with the whole weights (gathered once for the call): ranks
        # finish after different numbers of steps, which a sharded forward's collectives cannot allow.
        with full_weights(model) as whole:
            longest = max((len(prompt) for prompt in prompt_token_ids), default=0)
            sequences = min(self.engine.batch_size, len(shard(keys)) * params.n)
            check_generation_fits(whole, sequences, longest + params.max_new_tokens)
            self.engine.model = whole
            try:
                return map_shards(
                    lambda prompts, share: self.engine.generate(prompts, params, keys=share),
                    prompt_token_ids, keys,
                )
            finally:
                self.engine.model = model

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


class Runner:
    """How the loop runs training forwards and backwards on the model: `runner(loss_fn, batch)`, then
    `runner.backward(loss, sync)` (gradients cross processes when `sync`, a step's last micro-batch), both
    inside `runner.micro_batch(sync)`. With one process: the loss on the model, a plain backward."""

    # Whether every process must run the same number of forwards per step (sharded parameters are gathered
    # by collectives inside each forward): the loop then pads a short rank with idle micro-batches.
    lockstep = False

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, loss_fn: Callable[[torch.nn.Module, Any], Any], batch: Any) -> Any:
        return loss_fn(self.model, batch)

    def micro_batch(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class _Replicated(Runner):
    """DistributedDataParallel around the loss function (`_LossForward`) with summed gradients."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        device = next(model.parameters()).device
        # Buffers (rotary tables, ...) are the same on every rank and never trained: no per-forward sync.
        # The keyword was renamed in torch 2.13.
        parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
        keyword = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            _LossForward(model), device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True, **{keyword: False},
        )
        self.ddp.register_comm_hook(None, _sum_gradients)

    def __call__(self, loss_fn, batch):
        return self.ddp(loss_fn, batch)

    def micro_batch(self, sync: bool) -> contextlib.AbstractContextManager:
        # DDP decides in the forward whether the backward all-reduces: the forward must be inside no_sync.
        return contextlib.nullcontext() if sync else self.ddp.no_sync()


class _Sharded(Runner):
    """FSDP2 (`fully_shard`) on each decoder layer and on the root: parameters, gradients and optimizer state
    sharded over the processes. The gradient reduce-scatter runs on every micro-batch (FSDP keeps sharded
    gradients only). FSDP averages gradients; gloo has no pre-scaled sum (PREMUL_SUM), so the loss is scaled
    by the world size instead: the average of N x rank sums is their sum, as DDP's hook gives."""

    lockstep = True

    def backward(self, loss: torch.Tensor) -> None:
        (loss * world_size()).backward()


def wrap(
    model: torch.nn.Module, strategy: str = "ddp", *, cpu_offload: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Runner:
    """The Runner for training forwards: under a process group, `ddp` (a replica per process, summed
    gradients) or `fsdp` (FSDP2: the model is sharded in place, so build the optimizer afterwards; with
    `compute_dtype` the forward runs in it over fp32 shards, gradients reduced in fp32). Generation, reference
    and evaluation forwards use the model itself (DDP) or `full_weights(model)` (FSDP)."""
    if not group_active() or not any(p.requires_grad for p in model.parameters()):
        return Runner(model)
    if strategy == "ddp":
        return _Replicated(model)
    shard_model(model, cpu_offload=cpu_offload, compute_dtype=compute_dtype)
    return _Sharded(model)


# ----------------------------------------------------------------------------- FSDP2


@dataclasses.dataclass
class _Skeleton:
    """A sharded model's plain twin: the same modules with parameters on the meta device (no memory) and real
    buffers, filled with gathered full weights while a generation or a save needs them."""

    module: torch.nn.Module
    dtype: torch.dtype | None  # the compute dtype (fp32 shards, bf16 forwards), None = the shards' own
    device: torch.device = torch.device("cpu")  # where forwards run (the shards may be offloaded to CPU)
    active: torch.nn.Module | None = None


_skeletons: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_sharded(model: torch.nn.Module) -> bool:
    return model in _skeletons


def layer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers FSDP wraps one by one: the classes transformers names in `_no_split_modules` (each
    layer's weights gathered alone), else the entries of the model's largest ModuleList."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if layers:
        return layers
    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: torch.nn.Module, *, cpu_offload: bool = False, compute_dtype=None) -> None:
    """fully_shard each decoder layer, then the root, over all processes (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    if cpu_offload and device.type != "cuda":
        raise ConfigError(
            "distributed.cpu_offload moves FSDP's shards from the GPU to CPU memory, but this model trains "
            f"on {device.type}: drop --distributed.cpu_offload"
        )
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating - {torch.float32}:
        raise ConfigError(
            f"distributed.strategy fsdp keeps fp32 master weights, but the model's parameters are "
            f"{', '.join(sorted(str(d) for d in floating))}: set model.dtype float32 (or auto); bf16 compute "
            "on GPU comes from FSDP's mixed precision"
        )
    _skeletons[model] = _Skeleton(_meta_twin(model), compute_dtype, device)
    # Where batches go: with CPU offload the shards live in CPU memory but forwards run on the GPU.
    model.prefalign_compute_device = device
    mesh = init_device_mesh(device.type, (world_size(),))
    options: dict[str, Any] = {"mesh": mesh}
    if compute_dtype is not None and compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layer_modules(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)


def _meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules whose parameters live on the meta device (tied weights stay tied)."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for p in model.parameters()
    }
    twin = copy.deepcopy(model, memo)
    return twin.eval()


@contextlib.contextmanager
def full_weights(model: torch.nn.Module, *, main_only: bool = False) -> Iterator[torch.nn.Module | None]:
    """The model with whole weights for forwards whose count differs between processes (generation, a
    rank's share of reference log-probs) or for a save: the model itself when it is not sharded; under FSDP
    a plain twin filled with the gathered weights (parameters in the compute dtype) for the block, emptied
    after. Every process must enter it together (the gathers are collectives). With `main_only` the weights
    are gathered to rank 0's CPU memory only (a save; fp32) and the other processes get None. Nested blocks
    reuse the outer gather."""
    skeleton = _skeletons.get(model)
    if skeleton is None:
        yield model
        return
    if skeleton.active is not None:  # inside an outer gather
        yield skeleton.active
        return
    if not main_only:
        check_generation_fits(model, sequences=0, length=0)  # the weights alone, before gathering them
    twin = skeleton.module
    _fill(twin, model, skeleton, main_only)
    if main_only and not is_main_process():
        yield None
        return
    skeleton.active = None if main_only else twin
    try:
        yield twin
    finally:
        skeleton.active = None
        _empty(twin)


def _fill(twin: torch.nn.Module, model: torch.nn.Module, skeleton: _Skeleton, main_only: bool) -> None:
    """The twin's parameters and persistent buffers from the sharded model's, one tensor at a time (the peak
    is the twin plus one gathered tensor), in the state dict's order on every process. Each parameter is
    cast to the compute dtype before its all-gather (half the bytes to move in bf16); a weight the model
    ties to another (embeddings and output head) is gathered once and stays tied in the twin."""
    parameters = {id(p) for p in model.parameters()}
    gathered: dict[int, Any] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in gathered:
            whole = gathered[id(value)]
        else:
            is_parameter = id(value) in parameters
            dtype = skeleton.dtype if is_parameter and not main_only else None
            whole = _gather(value, dtype, skeleton.device)
            if main_only:
                whole = whole.cpu() if is_main_process() else None
            if whole is not None and is_parameter:
                whole = torch.nn.Parameter(whole.detach(), requires_grad=False)
            gathered[id(value)] = whole
        if whole is None:
            continue
        owner, _, leaf = name.rpartition(".")
        module = twin.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = whole
        else:
            module._buffers[leaf] = whole.detach()


def _gather(value: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A whole tensor from a sharded one (a DTensor: all-gathered on the compute device, in `dtype`); a
    plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    tensor = value.detach()
    if not isinstance(tensor, DTensor):
        return tensor.to(device)
    local = tensor.to_local()
    local = local.to(device=device, dtype=dtype if dtype is not None and local.is_floating_point() else None)
    shard = DTensor.from_local(
        local, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape,
        stride=tensor.stride(),
    )  # fmt: skip
    return shard.full_tensor()


def check_generation_fits(
    model: torch.nn.Module, sequences: int, length: int, free_bytes: int | None = None,
) -> None:
    """Refuse, with the numbers, generation under FSDP that would not fit in the device memory left beside
    the shards (CUDA only; `free_bytes` overrides the measurement): the whole weights in the compute dtype
    when `model` is a sharded model about to be gathered, plus the KV cache and one step's logits of
    `sequences` x `length` tokens (for a gathered twin, whose weights are already in memory: those alone).
    Any other model: nothing to check."""
    from prefalign.rollout.kv_cache import generation_bytes

    record = _skeletons.get(model) or next((s for s in _skeletons.values() if s.active is model), None)
    if record is None:
        return
    device = record.device
    dtype = record.dtype or torch.float32  # the shards are fp32
    parameters = sum(p.numel() for p in record.module.parameters())  # tied weights once
    parts = generation_bytes(model.config, parameters, sequences, length, dtype)
    if record.active is model:
        parts["weights"] = 0  # gathered already: the free memory is what is left beside them
    if free_bytes is None:
        if device.type != "cuda":
            return
        # Free on the device plus what torch's allocator holds cached but unused (the last rollout's).
        free_bytes = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        free_bytes -= torch.cuda.memory_allocated(device)
        # The fewest free bytes over the processes: all of them refuse together (one alone would leave the
        # others waiting in the next collective).
        free_bytes = -int(max_tensor_across(torch.tensor([-float(free_bytes)], dtype=torch.float64)).item())
    if sum(parts.values()) <= free_bytes:
        return
    gib = {name: value / 2**30 for name, value in parts.items()}
    kind = str(dtype).removeprefix("torch.")
    weights = (
        f"{gib['weights']:.1f} GiB of weights ({parameters:,} parameters in {kind})"
        if parts["weights"] else f"the gathered weights ({parameters:,} parameters)"
    )
    raise ConfigError(
        "generation under FSDP needs the whole model and its KV cache on one device: "
        f"{weights} + {gib['kv_cache']:.1f} GiB of KV cache ({sequences} sequences x {length} tokens) + "
        f"{gib['logits']:.1f} GiB of logits, but {free_bytes / 2**30:.1f} GiB is free on {device}. Lower "
        "generation_batch_size or max_new_tokens (the KV cache), or train a model whose weights fit one "
        "device: generation is not sharded (no vLLM backend yet)"
    )


def _empty(twin: torch.nn.Module) -> None:
    """Parameters back to the meta device (tied ones still one parameter): the gathered weights are
    freed."""
    empty: dict[int, torch.nn.Parameter] = {}
    for module in twin.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in empty:
                    empty[id(parameter)] = torch.nn.Parameter(
                        torch.empty_like(parameter, device="meta"), requires_grad=False,
                    )
                module._parameters[name] = empty[id(parameter)]


def on_main_process_whole(function: Callable[..., Any], model: torch.nn.Module, *args: Any, **kwargs: Any):
    """`function(model, *args, **kwargs)` on rank 0 with the model's whole weights (gathered from every
    process under FSDP: a final HF folder), while the others wait."""
    with full_weights(model, main_only=True) as whole:
        return on_main_process(function, whole, *args, **kwargs)
