"""PPO (or GRPO, for comparison) on the built-in task from the cached base model: held-out greedy accuracy,
pass@8 and KL to the base, over seeds, with a curve.

Every run starts from the built-in base model (`prefalign base`) and trains for `--max-steps` optimizer steps
or `--max-time` seconds (the trainers' `max_time`, checked at rollout boundaries; evaluations inside the run
count), with the exact-match reward or the learned reward model (`--reward-model`, the demo's reward stage
folder), the gold monitor `exact_match` on. With `--eval-every N` the run evaluates on the 500 held-out
prompts every N steps (greedy accuracy, and eval/kl on one sample per prompt): the curve, with the rollouts'
proxy score and monitored exact match beside it. At the end: the demo's evaluation (greedy, pass@8 at
temperature 1, KL to the base on those 8 samples). Prints mean ± sample std over seeds, writes JSON.

    python benchmarks/ppo_task.py --reward-model runs/demo/reward/final --max-steps 60 --eval-every 10
    python benchmarks/ppo_task.py --algorithms ppo grpo --max-time 150 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def evaluate(model, tokenizer, base_model, seed: int) -> dict:
    from prefalign.config import DataConfig
    from prefalign.data import tokenize_prompts
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.rewards import WeightedRewards
    from prefalign.tasks.arithmetic import prompt_dataset

    prompts, _ = tokenize_prompts(prompt_dataset("held_out", limit=500), tokenizer, DataConfig())
    found = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=8, max_new_tokens=8, seed=seed,
        reference=base_model,
    )  # fmt: skip
    return {"accuracy": found["accuracy"], "pass@8": found["pass@8"], "kl": found["kl"]}


def config_for(args, algorithm: str, seed: int, base_path: Path, run_dir: str):
    from prefalign.algorithms.grpo_config import GRPOConfig
    from prefalign.algorithms.ppo_config import PPOConfig
    from prefalign.config import DataConfig, ModelConfig, TrainConfig

    rewards = {"reward_functions": [], "reward_model": args.reward_model} if args.reward_model else {}
    shared = dict(
        model=ModelConfig(name_or_path=str(base_path), device="cpu"), data=DataConfig(max_length=64),
        max_new_tokens=8, temperature=args.temperature, monitor_functions=["exact_match"],
        max_time=args.max_time, log_completions_every=0, **rewards,
    )  # fmt: skip
    train = dict(
        output_dir=run_dir, max_steps=args.max_steps, schedule="constant",
        eval_every=args.eval_every, progress=False, seed=seed, log_every=1, num_threads=args.threads,
    )  # fmt: skip
    if algorithm == "grpo":
        return GRPOConfig(
            train=TrainConfig(**train, batch_size=args.grpo_prompts * args.generations,
                              learning_rate=args.grpo_learning_rate),
            num_generations=args.generations, beta=args.grpo_beta, **shared,
        )  # fmt: skip
    return PPOConfig(
        train=TrainConfig(**train, batch_size=args.batch, learning_rate=args.learning_rate), beta=args.beta,
        kl_target=args.kl_target,
        num_iterations=args.epochs, steps_per_generation=args.minibatches,
        critic_learning_rate=args.critic_learning_rate, whiten_rewards=args.whiten_rewards,
        missing_eos_penalty=None if args.missing_eos_penalty == "none" else float(args.missing_eos_penalty),
        vf_coef=args.vf_coef, share_prompt=not args.no_share_prompt, **shared,
    )  # fmt: skip


def judge_by_exact_match() -> None:
    """The runs' own evaluations score with the training reward (a reward model's score >= 1 would count as
    "accuracy"): for the curve they score greedy answers by exact match instead, as the demo does."""
    import prefalign.algorithms.grpo as grpo_module
    import prefalign.algorithms.ppo as ppo_module
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.rewards import WeightedRewards

    def by_exact_match(model, tokenizer, prompts, rewards, **kwargs):
        found = evaluate_policy(model, tokenizer, prompts, WeightedRewards(["exact_match"]), **kwargs)
        proxy = {**kwargs, "k": 0, "reference": None}  # the training reward's mean on the greedy answers
        found["proxy"] = evaluate_policy(model, tokenizer, prompts, rewards, **proxy)["mean_reward"]
        return found

    for module in (grpo_module, ppo_module):
        module.evaluate_policy = by_exact_match


def train_seed(args, algorithm: str, seed: int, base_path: Path, base_model) -> dict:
    from prefalign.commands.grpo import grpo  # the commands resolve data.path builtin
    from prefalign.commands.ppo import ppo
    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm
    from prefalign.tasks.arithmetic import prompt_dataset

    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base_path), device="cpu"))
    eval_dataset = prompt_dataset("held_out", limit=500) if args.eval_every else None
    with tempfile.TemporaryDirectory(prefix=f"{algorithm}-task-{seed}-") as run_dir:
        config = config_for(args, algorithm, seed, base_path, run_dir)
        train = grpo if algorithm == "grpo" else ppo
        started = time.perf_counter()
        result = train(config, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, save=False)
        wall = time.perf_counter() - started
    proxy = "objective/scores" if algorithm == "ppo" else "reward"
    train_seconds, curve = 0.0, []
    for record in result.metrics:
        train_seconds += record.get("step_time", 0.0)
        point = {
            "step": record["step"], "train_seconds": round(train_seconds, 1),
            "proxy": record.get(proxy), "monitor": record.get("monitor/exact_match/mean"),
            "kl": record.get("objective/kl"), "beta": record.get("beta"),
        }  # fmt: skip
        if "eval/accuracy" in record:
            point.update({
                "eval_accuracy": record["eval/accuracy"], "eval_kl": record.get("eval/kl"),
                "eval_proxy": record.get("eval/proxy"),
            })  # fmt: skip
        curve.append(point)
    final = evaluate(model, tokenizer, base_model, seed)
    return {
        "algorithm": algorithm, "seed": seed, "steps": result.step, "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1), "final": final, "curve": curve,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--algorithms", nargs="+", choices=["ppo", "grpo"], default=["ppo"],
        help="run each for every seed, alternating (seed-major), so equal budgets see the same load",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--reward-model", default=None, help="reward model folder; default: exact match")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--max-time", type=float, default=0.0, help="seconds per run (0 = --max-steps)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--critic-learning-rate", type=float, default=None)
    parser.add_argument("--batch", type=int, default=64, help="prompts per rollout batch (PPO: completions)")
    parser.add_argument("--generations", type=int, default=8, help="GRPO's G")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs (num_iterations)")
    parser.add_argument("--minibatches", type=int, default=1, help="steps_per_generation")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--kl-target", type=float, default=None)
    parser.add_argument("--vf-coef", type=float, default=0.1)
    parser.add_argument("--whiten-rewards", action="store_true")
    parser.add_argument("--missing-eos-penalty", default="-1.0", help="a number, or none")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-share-prompt", action="store_true")
    parser.add_argument("--grpo-learning-rate", type=float, default=1e-4, help="the demo's GRPO lr")
    parser.add_argument("--grpo-prompts", type=int, default=16, help="GRPO prompts per step (the demo's)")
    parser.add_argument("--grpo-beta", type=float, default=0.0, help="the demo's GRPO β")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="ppo_task.json")
    args = parser.parse_args()

    import torch

    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm
    from prefalign.recipes.base_model import ensure_base_model

    torch.set_num_threads(args.threads)
    judge_by_exact_match()
    base_path = ensure_base_model()
    base_model, tokenizer = load_causal_lm(
        ModelConfig(name_or_path=str(base_path), device="cpu"), trainable=False
    )
    runs = []
    for seed in args.seeds:
        for algorithm in args.algorithms:
            runs.append(train_seed(args, algorithm, seed, base_path, base_model))
            run = runs[-1]
            final = run["final"]
            print(f"{algorithm} seed {seed}: {run['steps']} steps, {run['wall_seconds']} s: greedy "
                  f"{final['accuracy']:.3f}, pass@8 {final['pass@8']:.3f}, KL to base {final['kl']:.3f}",
                  flush=True)  # fmt: skip
            print_curve(run)
    for algorithm in args.algorithms:
        done = [run for run in runs if run["algorithm"] == algorithm]
        if len(done) > 1:
            for key in ("accuracy", "pass@8", "kl"):
                values = [run["final"][key] for run in done]
                spread = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
                print(f"{algorithm} {key}: {spread} over seeds {args.seeds}")
            steps = statistics.mean(run["steps"] for run in done)
            print(f"{algorithm}: {steps:.0f} steps on average")
    Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))


def print_curve(run: dict) -> None:
    points = [p for p in run["curve"] if "eval_accuracy" in p or p["step"] == 1]
    for point in points:
        cells = [f"step {point['step']:>4}", f"{point['train_seconds']:>6.0f} s"]
        for key in ("proxy", "monitor", "kl", "beta", "eval_accuracy", "eval_kl", "eval_proxy"):
            value = point.get(key)
            cells.append(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} -")
        print("  " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
