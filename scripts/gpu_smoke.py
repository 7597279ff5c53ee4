"""GPU smoke test: a few steps of each command on CUDA with bf16, for when a GPU machine is lent.

    python scripts/gpu_smoke.py [--out DIR] [--scale 0.5b|tiny]

`--scale 0.5b` adds DPO and GRPO with `distributed.strategy` ddp and fsdp in a one-process group on a
random-initialised Qwen2-0.5B-shaped model (24 layers, hidden 896, 151,936-token vocabulary, from a config: no
download): median step time, tokens/s and peak CUDA memory of each. `--scale tiny` runs the same code on a
tiny model (a CPU check of the script itself).

Each check runs on its own and reports PASS/FAIL with the error; the exit code is the number of failures.
A command that fails to import is a FAIL like any other error (a broken import is a bug, not a missing
feature); commands go through the public API (`from prefalign import ...`), which resolves `builtin`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path


def check_cuda() -> str:
    import torch

    assert torch.cuda.is_available(), "CUDA is not available"
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    tflops = 20 * 2 * 2048**3 / (time.perf_counter() - started) / 1e12
    return f"{torch.cuda.get_device_name()} bf16 matmul {tflops:.0f} TFLOP/s"


def small_train(output_dir: Path, **train):
    from prefalign.config import TrainConfig

    return TrainConfig(
        output_dir=str(output_dir), max_steps=3, batch_size=8, progress=False, overwrite=True, **train,
    )


def check_sft(out: Path) -> str:
    from prefalign import SFTConfig, sft

    config = SFTConfig(train=small_train(out / "sft", learning_rate=1e-4))
    config.data.max_samples = 64
    result = sft(config)
    return f"{result.step} steps, loss {result.metrics[-1].get('loss', result.metrics[-2].get('loss')):.3f}"


def check_generation(out: Path) -> str:
    from prefalign import ensure_base_model
    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm
    from prefalign.rollout.engine import LocalEngine
    from prefalign.rollout.types import SamplingParams

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(ensure_base_model())), trainable=False)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "12+34"}], tokenize=False, add_generation_prompt=True,
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    samples = LocalEngine(model, tokenizer).generate([ids] * 4, SamplingParams(n=8, max_new_tokens=8, seed=0))
    return (
        f"{sum(len(s) for s in samples)} samples on {next(model.parameters()).device}, dtype "
        f"{next(model.parameters()).dtype}"
    )


def check_command(function: str, config_class: str, configure) -> str:
    import prefalign

    config = getattr(prefalign, config_class)()
    configure(config)
    result = getattr(prefalign, function)(config)
    return f"ran: {type(result).__name__}"


SCALE_SHAPES = {
    # Qwen2.5-0.5B's shape (~494M parameters, tied embeddings).
    "0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "tiny": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def scale_model(out: Path, shape: str) -> Path:
    """A random-initialised Qwen2-shaped model saved as an HF folder with the built-in task's tokenizer (its
    ids are a subset of the larger vocabulary)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from prefalign import ensure_base_model

    folder = out / f"qwen2-{shape}"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = Qwen2Config(tie_word_embeddings=True, max_position_embeddings=2048, **SCALE_SHAPES[shape])
        Qwen2ForCausalLM(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(ensure_base_model()).save_pretrained(folder)
    return folder


def one_process_group() -> None:
    """A process group of one (what torchrun --nproc_per_node 1 would give a strategy to shard over)."""
    import os

    import torch

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)


def check_scale(out: Path, shape: str, command: str, strategy: str) -> str:
    import statistics

    import torch

    import prefalign

    one_process_group()
    model = str(scale_model(out, shape))
    config = getattr(prefalign, {"dpo": "DPOConfig", "grpo": "GRPOConfig"}[command])()
    config.model.name_or_path = model
    config.distributed.strategy = strategy
    config.data.max_samples = 64
    config.train = small_train(out / f"{command}-{shape}-{strategy}")
    config.train.max_steps = 4
    if command == "grpo":
        config.max_new_tokens, config.num_generations = 32, 8
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = getattr(prefalign, command)(config)
    steps = [m for m in result.metrics if "step_time" in m][1:]  # the first step warms up
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    return (
        f"step {statistics.median(m['step_time'] for m in steps):.3f} s, "
        f"{statistics.median(m['tokens_per_second'] for m in steps):,.0f} tokens/s{peak}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--scale", choices=sorted(SCALE_SHAPES), default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="prefalign-gpu-"))

    def limit(config, name: str, **train) -> None:
        config.train = small_train(out / name, **train)
        config.data.max_samples = 64

    checks = {
        "cuda": check_cuda,
        "env": lambda: importlib.import_module("prefalign.commands.env").env() and "ok",
        "generation": lambda: check_generation(out),
        "sft": lambda: check_sft(out),
        "dpo": lambda: check_command("dpo", "DPOConfig", lambda c: limit(c, "dpo")),
        "reward": lambda: check_command("reward", "RewardConfig", lambda c: limit(c, "reward")),
        # The built-in base has a 128-token context: GRPO's default 256 new tokens would not fit.
        "grpo": lambda: check_command(
            "grpo", "GRPOConfig", lambda c: (limit(c, "grpo"), setattr(c, "max_new_tokens", 8))
        ),
    }
    if args.scale:
        checks = {} if args.scale == "tiny" else checks
        for command in ("dpo", "grpo"):
            for strategy in ("ddp", "fsdp"):
                checks[f"{command}-{args.scale}-{strategy}"] = (
                    lambda c=command, s=strategy: check_scale(out, args.scale, c, s)
                )
    failures = 0
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            message = check()
            status = "PASS"
        except Exception as error:  # noqa: BLE001 - report every failure and go on
            status, message = "FAIL", f"{type(error).__name__}: {error}"
            traceback.print_exc()
            failures += 1
        print(f"[{status}] {name} ({time.perf_counter() - started:.1f} s): {message}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
