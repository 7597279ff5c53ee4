"""DPO training throughput and peak memory: prefalign's `dpo` against TRL's `DPOTrainer` (public API only).

Same tiny Llama (about 4M non-embedding parameters, char tokenizer with a chat template), same pairs, same
batch size, same number of optimizer steps (one epoch over exactly steps x batch pairs), same sequence
lengths (no truncation in either tool; the script checks both count the same non-pad tokens). Each tool runs
in its own subprocess (peak memory is per process), alternating, `--repeats` times; medians are reported.

Comparisons:
  defaults        each tool as a user gets it (TRL: reference forward every step, gradient checkpointing, bf16
                  autocast; prefalign: reference log-probs precomputed, no checkpointing, bf16 autocast where
                  the CPU has native bf16 (mixed_precision=auto), else fp32);
  matched         both precompute the reference log-probs, neither checkpoints, both bf16 autocast;
  matched fp32    the same in fp32 (TRL bf16=False, prefalign mixed_precision=off).

Job time = from the trainer call (tokenization, reference pass, training) to the end of training; model
loading and saving are left out of both. Training FLOP/s = (6 x non-embedding parameters x non-pad tokens
+ 2 x non-embedding parameters x tokens through the reference) / job time, as a fraction of this CPU's fp32
matmul rate (median of torch.mm on 2048x2048 with the same thread count). Pairs per CPU-second uses the
job's process CPU time instead of wall time: on a shared machine it leaves out the time other processes
held the core, so it is the steadier of the two (with one thread they agree on a quiet machine).

    PREFALIGN_DATA_DIR=/work/shared/data python benchmarks/dpo_throughput.py   # GSM8K-based pairs
    python benchmarks/dpo_throughput.py --data builtin                          # the built-in task's pairs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- shared set-up (parent)


def build_model(folder: Path, hidden_size: int, num_layers: int, context: int = 512) -> int:
    """A random Llama (heads of width 64, tied embeddings) with the char tokenizer, saved as an HF folder;
    returns its parameter count. grpo_step.py builds its model here too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefalign.tasks.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64, max_position_embeddings=context, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def gsm8k_pairs(count: int, prompt_chars: int, completion_chars: int) -> list[dict] | None:
    """Real pairs: a GSM8K question (its last characters) with a correct vs an incorrect model solution (their
    last characters, which hold the final answer), cut to fixed lengths so no tool has to truncate."""
    data_dir = os.environ.get("PREFALIGN_DATA_DIR")
    path = Path(data_dir or "/nonexistent") / "gsm8k" / "example_model_solutions.jsonl"
    if not path.exists():
        return None
    pairs = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        solutions = [value for value in row.values() if isinstance(value, dict) and "is_correct" in value]
        right = [s["solution"] for s in solutions if s["is_correct"]] or [row["ground_truth"]]
        wrong = [s["solution"] for s in solutions if not s["is_correct"]]
        if not wrong:
            continue
        chosen, rejected = right[0][-completion_chars:], wrong[0][-completion_chars:]
        if chosen == rejected or len(chosen) < completion_chars or len(rejected) < completion_chars:
            continue
        pairs.append({
            "prompt": [{"role": "user", "content": row["question"][-prompt_chars:]}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip
        if len(pairs) == count:
            return pairs
    raise SystemExit(f"only {len(pairs)} usable GSM8K pairs; ask for fewer steps")


def builtin_pairs(count: int) -> list[dict]:
    from prefalign.tasks.arithmetic import preference_dataset

    return [
        {k: row[k] for k in ("prompt", "chosen", "rejected")}
        for row in preference_dataset("train", limit=count)
    ]


def matmul_rate(threads: int, repeats: int = 15, dtype: str = "float32") -> float:
    """FLOP/s of torch.mm on 2048x2048 (median)."""
    import torch

    torch.set_num_threads(threads)
    a, b = (
        torch.randn(2048, 2048, dtype=getattr(torch, dtype)),
        torch.randn(2048, 2048, dtype=getattr(torch, dtype)),
    )
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / statistics.median(times)


# ----------------------------------------------------------------------------- workers (one per subprocess)


def rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_prefalign(args, precision: str) -> dict:
    import datasets
    import torch

    from prefalign.algorithms.dpo import DPOConfig, dpo
    from prefalign.config import DataConfig, ModelConfig, TrainConfig
    from prefalign.models.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    rows = datasets.Dataset.from_json(str(args.workdir / "pairs.jsonl"))
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(args.workdir / "model"), device="cpu"))
    config = DPOConfig(
        model=ModelConfig(device="cpu"), data=DataConfig(max_length=1024),
        train=TrainConfig(
            output_dir=str(args.workdir / f"run-prefalign-{os.getpid()}"), learning_rate=args.learning_rate,
            batch_size=args.batch_size, max_steps=args.steps, progress=False, log_every=args.steps, seed=0,
            num_threads=args.threads,
        ),
        precompute_ref_logps=True, mixed_precision=precision,
    )  # fmt: skip
    baseline = rss_now_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = dpo(config, dataset=rows, model=model, tokenizer=tokenizer, save=False)
    job, job_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    data = json.loads((Path(config.train.output_dir) / "data_stats.json").read_text())
    step_times = [m["step_time"] for m in result.metrics if "step_time" in m]
    tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in _our_token_ids(rows, tokenizer, config.data)
    )  # fmt: skip
    return {"job_seconds": job, "job_cpu_seconds": job_cpu, "step_seconds": step_times, "tokens": tokens,
            "pairs": data["train"]["kept"], "reference_tokens": tokens, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def _our_token_ids(rows, tokenizer, data_config):
    from prefalign.data import tokenize_preference

    data, _ = tokenize_preference(rows, tokenizer, data_config)
    return zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)


def worker_trl(args, matched: bool, bf16: bool = True) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    rows = datasets.Dataset.from_json(str(args.workdir / "pairs.jsonl"))
    model_dir = str(args.workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = dict(
        output_dir=str(args.workdir / f"run-trl-{os.getpid()}"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.learning_rate, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=args.steps, seed=0, use_cpu=True, dataloader_num_workers=0,
    )  # fmt: skip
    if matched:
        settings.update(precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=bf16)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused, **unused_kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **unused_kwargs):
            step_times.append(time.perf_counter() - self.started)

    baseline = rss_now_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer = DPOTrainer(
        model=model, args=DPOConfig(**settings), train_dataset=rows, processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    job, job_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    dataset = trainer.train_dataset
    tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    )
    return {"job_seconds": job, "job_cpu_seconds": job_cpu, "step_seconds": step_times, "tokens": tokens,
            "pairs": len(dataset), "reference_tokens": tokens, "baseline_rss_mb": baseline,
            "peak_rss_mb": peak_rss_mb(),
            "settings": {k: getattr(trainer.args, k)
                         for k in ("precompute_ref_log_probs", "gradient_checkpointing", "bf16")},
            }  # fmt: skip


# ----------------------------------------------------------------------------- parent: run, collect, report

JOBS = {
    "prefalign": "prefalign, defaults",
    "prefalign-fp32": "prefalign, fp32 (mixed_precision=off)",
    "trl-defaults": "TRL DPOTrainer, its defaults",
    "trl-matched": "TRL, precomputed ref, no ckpt, bf16",
    "trl-matched-fp32": "TRL, precomputed ref, no ckpt, fp32",
}
COMPARISONS = [
    ("prefalign", "trl-defaults"), ("prefalign", "trl-matched"), ("prefalign-fp32", "trl-matched-fp32"),
]


def run_worker(job: str, args) -> dict:
    command = [sys.executable, str(HERE), "--worker", job, "--workdir", str(args.workdir),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--learning-rate", str(args.learning_rate)]  # fmt: skip
    environment = {
        **os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(args.threads),
    }
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{job} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], batch_size: int, parameters: int) -> dict:
    job = statistics.median(r["job_seconds"] for r in runs)
    steady = statistics.median(statistics.median(r["step_seconds"][2:] or r["step_seconds"]) for r in runs)
    first = runs[0]
    flops = 6 * parameters * first["tokens"] + 2 * parameters * first["reference_tokens"]
    return {
        "job_seconds": job,
        "pairs_per_second": first["pairs"] / job,
        # CPU seconds of the job's process: on a shared machine this leaves out the time other processes held
        # the core (with one thread, CPU time = time the job actually ran).
        "pairs_per_cpu_second": first["pairs"] / statistics.median(r["job_cpu_seconds"] for r in runs),
        "tokens_per_second": first["tokens"] / job,
        "steady_pairs_per_second": batch_size / steady,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "job_rss_mb": statistics.median(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs),
        "flops_per_second": flops / job,
        "tokens": first["tokens"],
        "pairs": first["pairs"],
        "settings": first.get("settings"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(JOBS))
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--data", choices=["gsm8k", "builtin"], default="gsm8k")
    parser.add_argument("--jobs", default=",".join(JOBS))
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("prefalign"):
            result = worker_prefalign(args, "off" if args.worker == "prefalign-fp32" else "auto")
        else:
            result = worker_trl(
                args, matched=args.worker != "trl-defaults", bf16=args.worker != "trl-matched-fp32",
            )
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as scratch:
        args.workdir = Path(scratch)
        report(args)


def report(args) -> None:
    import torch

    from prefalign.models.loading import count_parameters

    build_model(args.workdir / "model", args.hidden_size, args.num_layers)
    count = args.steps * args.batch_size
    pairs = gsm8k_pairs(count, 48, 28) if args.data == "gsm8k" else None
    if pairs is None:
        if args.data == "gsm8k":
            print("PREFALIGN_DATA_DIR is unset or lacks gsm8k/: using the built-in task's pairs instead")
        pairs = builtin_pairs(count)
    (args.workdir / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.workdir / "model")
    parameters = count_parameters(model, exclude_embeddings=True)
    rate = matmul_rate(args.threads)
    bf16_rate = matmul_rate(args.threads, dtype="bfloat16")
    jobs = args.jobs.split(",")
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    for repeat in range(args.repeats):
        for job in jobs:
            runs[job].append(run_worker(job, args))
            print(f"repeat {repeat + 1}/{args.repeats} {job}: {runs[job][-1]['job_seconds']:.1f} s "
                  f"({runs[job][-1]['job_cpu_seconds']:.1f} CPU s)", flush=True)
    rate_after = matmul_rate(args.threads)
    summary = {job: summarise(results, args.batch_size, parameters) for job, results in runs.items()}
    print(f"\nmodel: Llama, {parameters:,} non-embedding parameters; torch {torch.__version__}, "
          f"{args.threads} thread(s); {summary[jobs[0]]['pairs']} pairs x {args.steps} steps of "
          f"batch {args.batch_size}; "
          f"{summary[jobs[0]]['tokens'] / summary[jobs[0]]['pairs'] / 2:.1f} non-pad tokens per sequence")
    print(f"fp32 matmul rate (torch.mm 2048x2048, median): {rate / 1e9:.1f} GFLOP/s before, "
          f"{rate_after / 1e9:.1f} after; bf16: {bf16_rate / 1e9:.1f} GFLOP/s")
    print(f"\n{'job':<44}{'pairs/s':>9}{'pairs/CPU-s':>13}{'tokens/s':>10}{'steady pairs/s':>16}"
          f"{'peak RSS MB':>13}{'job RSS MB':>12}{'FLOP/s / mm':>13}")
    for job, row in summary.items():
        print(f"{JOBS[job]:<44}{row['pairs_per_second']:>9.2f}{row['pairs_per_cpu_second']:>13.2f}"
              f"{row['tokens_per_second']:>10.0f}{row['steady_pairs_per_second']:>16.2f}"
              f"{row['peak_rss_mb']:>13.0f}{row['job_rss_mb']:>12.0f}{row['flops_per_second'] / rate:>13.2f}")
    token_counts = {job: row["tokens"] for job, row in summary.items()}
    if len(set(token_counts.values())) > 1:
        print(f"WARNING: the tools counted different non-pad tokens: {token_counts}")
    for mine, peer in COMPARISONS:
        if mine in summary and peer in summary:
            ours, theirs = summary[mine], summary[peer]
            print(f"\n{JOBS[mine]} / {JOBS[peer]}: "
                  f"pairs/s x{ours['pairs_per_second'] / theirs['pairs_per_second']:.2f}, "
                  "pairs per CPU-second "
                  f"x{ours['pairs_per_cpu_second'] / theirs['pairs_per_cpu_second']:.2f}, "
                  f"tokens/s x{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}, "
                  "steady-state pairs/s "
                  f"x{ours['steady_pairs_per_second'] / theirs['steady_pairs_per_second']:.2f}, "
                  f"peak memory x{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} "
                  f"(job memory x{ours['job_rss_mb'] / max(theirs['job_rss_mb'], 1):.2f})"
                  f"; TRL settings {theirs['settings']}")
    print(json.dumps({"matmul_flops": rate, "bf16_matmul_flops": bf16_rate, "summary": summary}, default=str))


if __name__ == "__main__":
    main()
