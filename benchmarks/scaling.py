"""Scaling efficiency of multi-process training on this CPU: tokens/s with 2 processes x 1 thread over
2 x tokens/s with 1 process x 1 thread, for DPO and GRPO on the same job (the built-in task's data, a random
Llama of `--width` x `--layers` with the char tokenizer, fp32).

    python benchmarks/scaling.py --repeats 3

Each repeat runs 1 process, then 2 processes (torchrun, gloo) once per `--strategies` entry (ddp: a replica
per process; fsdp: FSDP2 shards), each `--steps` optimizer steps; `--dpo-accum 8` makes DPO's step 64 pairs;
a run's throughput is the median over its steps after the first `--warmup` of metrics.jsonl's
`tokens_per_second` (tokens of the global step over rank 0's step time, generation included for GRPO).
Prints each run and, per algorithm, the median over repeats of the same-repeat ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prefalign.tasks.model import TinyModelConfig, new_model
from prefalign.tasks.tokenizer import build_char_tokenizer

JOBS = {
    # 16 pairs per step; the reference log-probs are precomputed (sharded) before training, outside the steps.
    "dpo": ["dpo", "--train.batch_size", "8", "--train.grad_accum", "2", "--mixed_precision", "off",
            "--data.max_length", "64", "--train.learning_rate", "1e-5"],
    # 8 prompts x 8 completions per step, 16 new tokens at most.
    "grpo": ["grpo", "--train.batch_size", "64", "--num_generations", "8", "--max_new_tokens", "16",
             "--train.learning_rate", "1e-5"],
}  # fmt: skip


def build_model(folder: Path, width: int, layers: int) -> str:
    tokenizer = build_char_tokenizer()
    shape = TinyModelConfig(
        hidden_size=width, num_layers=layers, num_heads=max(1, width // 64), intermediate_size=width * 3,
    )
    model = new_model(shape, tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run(
    job: str, processes: int, model: str, steps: int, folder: Path, strategy: str = "ddp", dpo_accum: int = 2,
) -> list[float]:
    out = folder / f"{job}-{processes}-{strategy}"
    shutil.rmtree(out, ignore_errors=True)
    arguments = [
        *JOBS[job], "--model.name_or_path", model, "--model.dtype", "float32",
        "--distributed.strategy", strategy,
        *(["--train.grad_accum", str(dpo_accum)] if job == "dpo" else []),
        "--train.max_steps", str(steps), "--train.output_dir", str(out), "--train.num_threads", "1",
        "--train.progress", "false", "--train.log_every", "1", "--report", "false",
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, "-m", "prefalign", *arguments]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "-m", "prefalign", *arguments]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{job} x{processes} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_second"] for r in records if "tokens_per_second" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--jobs", default="dpo,grpo")
    parser.add_argument("--strategies", default="ddp")
    parser.add_argument("--dpo-accum", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="prefalign-scaling-"))
    model = build_model(folder / "model", args.width, args.layers)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    ratios: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for job in args.jobs.split(","):
            one = statistics.median(
                run(job, 1, model, args.steps, folder, dpo_accum=args.dpo_accum)[args.warmup:]
            )
            for strategy in args.strategies.split(","):
                per_step = run(job, 2, model, args.steps, folder, strategy, args.dpo_accum)[args.warmup:]
                two = statistics.median(per_step)
                efficiency = two / (2 * one)
                ratios.setdefault(f"{job} {strategy}", []).append(efficiency)
                print(f"repeat {repeat + 1} {job} {strategy}: 1 process {one:,.0f} tok/s, 2 processes "
                      f"{two:,.0f} tok/s, efficiency {efficiency:.3f}", flush=True)  # fmt: skip
    print(f"load average at end: {os.getloadavg()}")
    for job, values in ratios.items():
        print(f"{job}: median efficiency {statistics.median(values):.3f} "
              f"(repeats: {', '.join(f'{v:.3f}' for v in values)})")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
