"""GPU smoke test: a few steps of each command on CUDA with bf16, for when a GPU machine is lent.

    python scripts/gpu_smoke.py [--out DIR]

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
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
