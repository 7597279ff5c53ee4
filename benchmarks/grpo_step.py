"""Wall time per GRPO step, split into generation and training: prefalign's `grpo` against TRL's \
`GRPOTrainer`.

Same tiny Llama (about 4M parameters, char tokenizer with a chat template), same built-in task prompts, \
same G,
completions per step, completion limit, learning rate and reward function; TRL generates with transformers
(no vLLM). Each tool runs in its own subprocess with one torch thread, alternating, `--repeats` times; the
first `--warmup` steps of each run are left out and the median step is reported.

Two comparisons:
  defaults  each tool as a user gets it, with only the shared settings above set (TRL: gradient checkpointing
            on, its default; prefalign: off);
  matched   the same, but TRL without gradient checkpointing.

TRL is used only through its public API: GRPOConfig, GRPOTrainer and a TrainerCallback for the step
boundaries. Its generation time is measured by timing the model's own `generate` method (the model object
is ours); prefalign's comes from its metrics (`generation_time`: sampling, scoring and advantages).

    python benchmarks/grpo_step.py                  # 4 prompts x G=8 = 32 completions of up to 32 tokens
    python benchmarks/grpo_step.py --repeats 3 --steps 12
    PREFALIGN_DATA_DIR=../shared/data python benchmarks/grpo_step.py --data gsm8k   \
# GSM8K questions as prompts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dpo_throughput import build_model  # the same random Llama as the DPO benchmark

HERE = Path(__file__).resolve()


def digit_share(prompts, completions, **_columns):
    """A cheap reward that differs between samples of a random model: the share of digits in the text."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


# ----------------------------------------------------------------------------- shared set-up (parent)


def prompt_rows(count: int, data: str = "task") -> list[dict]:
    """{"prompt": [user message], "answer": ...}: the built-in task's (7-9 tokens) or GSM8K questions
    (~260)."""
    if data == "gsm8k":
        folder = os.environ.get("PREFALIGN_DATA_DIR")
        if not folder or not (Path(folder) / "gsm8k" / "test.jsonl").is_file():
            raise SystemExit(
                "--data gsm8k needs PREFALIGN_DATA_DIR set to the folder holding gsm8k/test.jsonl"
            )
        lines = (Path(folder) / "gsm8k" / "test.jsonl").read_text().splitlines()[:count]
        rows = [json.loads(line) for line in lines]
        return [
            {"prompt": [{"role": "user", "content": row["question"]}], "answer": row["answer"]}
            for row in rows
        ]
    from prefalign.tasks.arithmetic import prompt_dataset

    return prompt_dataset("train", limit=count).to_list()  # {"prompt": [user message], "answer": "68"}


# ----------------------------------------------------------------------------- workers (one per subprocess)


def worker_prefalign(args) -> dict:
    import datasets
    import torch

    from prefalign.algorithms.grpo import GRPOConfig, grpo
    from prefalign.config import DataConfig, ModelConfig, TrainConfig
    from prefalign.rewards import register_reward_function

    torch.set_num_threads(args.threads)
    register_reward_function("digit_share", digit_share)
    config = GRPOConfig(
        model=ModelConfig(name_or_path=args.model, device="cpu"),
        data=DataConfig(max_length=1024),
        train=TrainConfig(
            output_dir=args.out, overwrite=True, learning_rate=1e-5,
            batch_size=args.prompts * args.generations, max_steps=args.warmup + args.steps,
            schedule="constant", progress=False, seed=args.seed,
        ),
        reward_functions=["digit_share"], num_generations=args.generations,
        max_new_tokens=args.max_new_tokens, log_completions_every=0,
    )  # fmt: skip
    rows = datasets.Dataset.from_list(prompt_rows(args.prompts * (args.warmup + args.steps), args.data))
    result = grpo(config, dataset=rows, save=False)
    steps = [m for m in result.metrics if "step_time" in m][args.warmup :]
    return {
        "step_time": [m["step_time"] for m in steps],
        "generation_time": [m["generation_time"] for m in steps],
        "mean_length": statistics.mean(m["completions/mean_length"] for m in steps),
    }


def worker_trl(args, matched: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generation_seconds: list[float] = []
    plain_generate = model.generate

    def timed_generate(*positional, **keywords):
        started = time.perf_counter()
        output = plain_generate(*positional, **keywords)
        generation_seconds.append(time.perf_counter() - started)
        return output

    model.generate = timed_generate
    lengths: list[float] = []

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.generation, self.started = [], [], 0.0

        def on_step_begin(self, *unused, **unused_keywords):
            generation_seconds.clear()
            self.started = time.perf_counter()

        def on_step_end(self, *unused, **unused_keywords):
            self.times.append(time.perf_counter() - self.started)
            self.generation.append(sum(generation_seconds))

        def on_log(self, _args, _state, _control, logs=None, **unused_keywords):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    settings = dict(
        output_dir=args.out, use_cpu=True, bf16=False, learning_rate=1e-5,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, max_steps=args.warmup + args.steps, logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    if matched:
        settings["gradient_checkpointing"] = False
    clock = StepClock()
    rows = datasets.Dataset.from_list(prompt_rows(args.prompts * (args.warmup + args.steps), args.data))
    trainer = GRPOTrainer(
        model=model, reward_funcs=digit_share, args=GRPOConfig(**settings), train_dataset=rows,
        processing_class=tokenizer, callbacks=[clock],
    )
    trainer.train()
    return {
        "step_time": clock.times[args.warmup :],
        "generation_time": clock.generation[args.warmup :],
        "mean_length": statistics.mean(lengths[args.warmup :]) if lengths[args.warmup :] else float("nan"),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }


def run_worker(job: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"grpo-step-{job}-") as out:
        command = [sys.executable, str(HERE), "--worker", job, "--model", args.model, "--out", out]
        for key in ("prompts", "generations", "max_new_tokens", "steps", "warmup", "threads", "seed", "data"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        environment = {**os.environ, "PYTHONPATH": str(HERE.parent.parent), "TOKENIZERS_PARALLELISM": "false"}
        completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
        if completed.returncode:
            raise RuntimeError(f"{job} worker failed:\n{completed.stderr[-4000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def summarise(runs: list[dict]) -> dict:
    steps = [t for run in runs for t in run["step_time"]]
    generation = [t for run in runs for t in run["generation_time"]]
    train = [s - g for run in runs for s, g in zip(run["step_time"], run["generation_time"], strict=True)]
    return {
        "step_s": statistics.median(steps),
        "generation_s": statistics.median(generation),
        "train_s": statistics.median(train),
        "generation_share": statistics.median(g / s for s, g in zip(steps, generation, strict=True)),
        "mean_length": statistics.mean(run["mean_length"] for run in runs),
        "steps_measured": len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--worker", choices=["prefalign", "trl-defaults", "trl-matched"])
    parser.add_argument("--model", default="")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--data", choices=["task", "gsm8k"], default="task",
        help="prompts: the built-in task's or GSM8K questions",
    )
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--json", default="", help="write the summary here too")
    args = parser.parse_args()
    if args.worker:
        job = {
            "prefalign": worker_prefalign, "trl-defaults": lambda a: worker_trl(a, matched=False),
            "trl-matched": lambda a: worker_trl(a, matched=True),
        }[args.worker]
        print(json.dumps(job(args)))
        return
    with tempfile.TemporaryDirectory(prefix="grpo-step-model-") as folder:
        args.model = folder
        parameters = build_model(Path(folder), args.hidden_size, args.num_layers, context=1024)
        runs: dict[str, list[dict]] = {"prefalign": [], "trl-defaults": [], "trl-matched": []}
        for repeat in range(args.repeats):
            for job in runs:
                print(f"repeat {repeat + 1}/{args.repeats}: {job}", file=sys.stderr, flush=True)
                runs[job].append(run_worker(job, args))
    summary = {job: summarise(found) for job, found in runs.items()}
    report(args, parameters, summary)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"settings": vars(args), "parameters": parameters, "summary": summary, "runs": runs}, indent=2,
        ))


def report(args, parameters: int, summary: dict) -> None:
    ours = summary["prefalign"]
    print(f"\nGRPO step ({args.data} prompts): {parameters / 1e6:.1f}M-parameter Llama, "
          f"{args.prompts} prompts x G={args.generations} = {args.prompts * args.generations} "
          f"completions of up to {args.max_new_tokens} tokens, {args.threads} thread(s), median of "
          f"{ours['steps_measured']} steps per tool")
    print(f"{'tool':<14} {'step s':>8} {'generate s':>11} {'train s':>8} {'gen share':>10} {'mean len':>9}")
    for job, found in summary.items():
        print(f"{job:<14} {found['step_s']:>8.3f} {found['generation_s']:>11.3f} {found['train_s']:>8.3f} "
              f"{found['generation_share']:>10.2f} {found['mean_length']:>9.1f}")
    for job in ("trl-defaults", "trl-matched"):
        theirs = summary[job]
        print(
            f"prefalign / {job}: step {ours['step_s'] / theirs['step_s']:.2f}x, generation "
            f"{ours['generation_s'] / theirs['generation_s']:.2f}x, training "
            f"{ours['train_s'] / theirs['train_s']:.2f}x (below 1 = prefalign faster)"
        )


if __name__ == "__main__":
    main()
