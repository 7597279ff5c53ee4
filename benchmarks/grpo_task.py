"""GRPO on the built-in task: held-out greedy accuracy of the base model before and after, over seeds.

The base model is the cached built-in one (`prefalign base`); every seed starts from it and trains for at most
`--max-time` seconds (GRPO's `max_time`, checked at rollout boundaries) or `--max-steps` steps, with the
exact-match reward. Greedy accuracy is measured on the fixed held-out set (the task's 500 held-out problems,
never trained on) every `--eval-every` steps, giving the curve; pass@8 at temperature 1 is measured for the
base and each final policy. Prints the curve and mean ± sample std over seeds, and writes them as JSON.

    PREFALIGN_CACHE=/tmp/pfcache python benchmarks/grpo_task.py --seeds 0 1 2 --max-time 600
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def held_out(tokenizer, count: int):
    from prefalign.config import DataConfig
    from prefalign.data import tokenize_prompts
    from prefalign.tasks.arithmetic import prompt_dataset

    prompts, _ = tokenize_prompts(prompt_dataset("held_out", limit=count), tokenizer, DataConfig())
    return prompts


def measure(model, tokenizer, prompts, k: int, seed: int) -> dict:
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.rewards import WeightedRewards

    found = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=k, max_new_tokens=8, seed=seed,
    )
    return {"accuracy": found["accuracy"], f"pass@{k}": found.get(f"pass@{k}")}


def train_seed(args, seed: int, base_path: Path, prompts) -> dict:
    from prefalign.algorithms.grpo import GRPOConfig, grpo
    from prefalign.config import DataConfig, ModelConfig, TrainConfig
    from prefalign.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base_path), device="cpu"))
    with tempfile.TemporaryDirectory(prefix=f"grpo-task-{seed}-") as run_dir:
        config = GRPOConfig(
            model=ModelConfig(name_or_path=str(base_path), device="cpu"),
            data=DataConfig(max_length=64),
            train=TrainConfig(
                output_dir=run_dir, learning_rate=args.learning_rate,
                batch_size=args.prompts * args.generations, max_steps=args.max_steps, schedule=args.schedule,
                adam_beta2=args.adam_beta2, eval_every=args.eval_every, progress=False, seed=seed,
                log_every=10,
            ),
            num_generations=args.generations, max_new_tokens=8, beta=args.beta, loss_type=args.loss_type,
            scale_rewards=args.scale_rewards, epsilon_high=args.epsilon_high, max_time=args.max_time,
            log_completions_every=0,
        )  # fmt: skip
        started = time.perf_counter()
        result = grpo(config, eval_dataset=None, model=model, tokenizer=tokenizer, save=False)
        wall = time.perf_counter() - started
    train_seconds, curve = 0.0, [{"step": 0, "train_seconds": 0.0, "accuracy": args.base["accuracy"]}]
    for record in result.metrics:
        train_seconds += record.get("step_time", 0.0)
        if "eval/accuracy" in record:
            curve.append({
                "step": record["step"], "train_seconds": round(train_seconds, 1),
                "accuracy": record["eval/accuracy"],
            })
    final = measure(model, tokenizer, prompts, 8, seed)
    return {
        "seed": seed, "steps": result.step, "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1), "final": final, "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-time", type=float, default=600.0, help="seconds of GRPO per seed (evaluations included)",
    )
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--adam-beta2", type=float, default=0.999)
    parser.add_argument(
        "--schedule", default="constant", help="constant, or cosine / linear decay over --max-steps",
    )
    parser.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="G")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--scale-rewards", default="group")
    parser.add_argument("--epsilon-high", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="grpo_task.json")
    args = parser.parse_args()

    import torch

    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm
    from prefalign.recipes.base_model import ensure_base_model

    torch.set_num_threads(args.threads)
    base_path = ensure_base_model()
    base_model, tokenizer = load_causal_lm(
        ModelConfig(name_or_path=str(base_path), device="cpu"), trainable=False,
    )
    prompts = held_out(tokenizer, 500)
    args.base = measure(base_model, tokenizer, prompts, 8, 0)
    print(f"base: greedy accuracy {args.base['accuracy']:.3f}, pass@8 {args.base['pass@8']:.3f} on "
          f"{len(prompts)} held-out prompts", flush=True)
    runs = []
    for seed in args.seeds:
        runs.append(train_seed(args, seed, base_path, prompts))
        run = runs[-1]
        print(f"seed {seed}: {run['steps']} steps in {run['wall_seconds']} s: greedy "
              f"{run['final']['accuracy']:.3f}, pass@8 {run['final']['pass@8']:.3f}",
              file=sys.stderr, flush=True)
    report(args, runs)
    Path(args.json).write_text(
        json.dumps({"settings": {k: v for k, v in vars(args).items()}, "runs": runs}, indent=2)
    )


def mean_std(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
        else f"{values[0]:.3f}"
    )


def report(args, runs: list[dict]) -> None:
    finals = [run["final"]["accuracy"] for run in runs]
    gains = [value - args.base["accuracy"] for value in finals]
    print(f"\nheld-out greedy accuracy: base {args.base['accuracy']:.3f} -> {mean_std(finals)} (gain "
          f"{mean_std(gains)}) over seeds {args.seeds}")
    print(f"pass@8: base {args.base['pass@8']:.3f} -> {mean_std([run['final']['pass@8'] for run in runs])}")
    print("\ncurve (greedy accuracy at each evaluation; training seconds are the mean over seeds):")
    steps = sorted({point["step"] for run in runs for point in run["curve"]})
    print(
        f"{'step':>6} {'train s':>8} " + " ".join(f"{'seed ' + str(run['seed']):>8}" for run in runs)
        + f" {'mean':>7}"
    )
    for step in steps:
        points = [next((p for p in run["curve"] if p["step"] == step), None) for run in runs]
        present = [p for p in points if p is not None]
        cells = " ".join(f"{p['accuracy']:>8.3f}" if p else f"{'':>8}" for p in points)
        print(f"{step:>6} {statistics.mean(p['train_seconds'] for p in present):>8.0f} {cells} "
              f"{statistics.mean(p['accuracy'] for p in present):>7.3f}")


if __name__ == "__main__":
    main()
