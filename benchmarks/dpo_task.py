"""DPO on the built-in task: held-out greedy accuracy before and after, over several seeds.

The built-in base model (`ensure_base_model()`), the task's training pairs (correct answer vs a near-miss
wrong one), evaluation on the 500 held-out prompts (greedy accuracy, mean reward, pass@8 at temperature 1,
KL to the base) and the implicit-reward accuracy on the 500 held-out pairs. Variants:

  rpo          the demo's recipe (prefalign.train.dpo.DEMO_RECIPE): sigmoid DPO + RPO SFT term (α = 1),
               β = 0.1, lr 1e-3, 300 steps x 32 pairs
  dpo          plain DPO (α = 0), β = 0.1, lr 1e-4, 300 steps x 32 pairs (the issue's "bare DPO loop"
               settings)
  dpo-lr1e-3   plain DPO (α = 0) at the recipe's learning rate
  sft          control: SFT on the chosen answers only, same steps, batch and learning rate as `rpo`

Seeds change the data order (train.seed); the base model is the same for all.

    python benchmarks/dpo_task.py --variants rpo,dpo,sft --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prefalign.algorithms.dpo import DPOConfig, dpo
from prefalign.algorithms.sft import SFTConfig, sft
from prefalign.commands.demo_stages import DEMO_RECIPE
from prefalign.config import DataConfig, ModelConfig, TrainConfig, apply_overrides
from prefalign.data import tokenize_prompts
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import load_causal_lm
from prefalign.recipes.base_model import ensure_base_model
from prefalign.rewards import WeightedRewards
from prefalign.tasks.arithmetic import prompt_dataset


def evaluate(model, tokenizer, reference) -> dict[str, float]:
    prompts, _ = tokenize_prompts(prompt_dataset("held_out"), tokenizer, DataConfig())
    return evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=8, max_new_tokens=8,
        reference=reference, seed=0,
    )


def run_variant(variant: str, seed: int, base: Path, scratch: Path, threads: int) -> dict[str, float]:
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base)))
    started = time.perf_counter()
    implicit = None
    if variant == "sft":
        defaults = apply_overrides(DPOConfig(), DEMO_RECIPE).train
        config = SFTConfig(train=TrainConfig(
            output_dir=str(scratch / f"sft-{seed}"), learning_rate=defaults.learning_rate,
            batch_size=defaults.batch_size, max_steps=defaults.max_steps, warmup_ratio=defaults.warmup_ratio,
            seed=seed, progress=False, num_threads=threads,
        ))  # fmt: skip
        sft(config, model=model, tokenizer=tokenizer, eval_dataset=None, save=False)
    else:
        config = apply_overrides(DPOConfig(), DEMO_RECIPE)
        if variant.startswith("dpo"):
            config.rpo_alpha = 0.0
            config.train.learning_rate = 1e-3 if variant == "dpo-lr1e-3" else 1e-4
        config.train.output_dir, config.train.seed = str(scratch / f"{variant}-{seed}"), seed
        config.train.progress, config.train.num_threads = False, threads
        result = dpo(config, model=model, tokenizer=tokenizer, save=False)
        implicit = next(
            m for m in reversed(result.metrics) if "eval/rewards/accuracies" in m
        )["eval/rewards/accuracies"]
    train_seconds = time.perf_counter() - started
    reference, _ = load_causal_lm(ModelConfig(name_or_path=str(base)), trainable=False)
    metrics = evaluate(model.eval(), tokenizer, reference)
    return {"accuracy": metrics["accuracy"], "mean_reward": metrics["mean_reward"],
            "pass@8": metrics["pass@8"], "kl": metrics["kl"], "implicit_reward_accuracy": implicit,
            "train_seconds": train_seconds}  # fmt: skip


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="rpo,dpo,sft")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = ensure_base_model()
    reference, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base)), trainable=False)
    before = evaluate(reference, tokenizer, None)
    print(f"base {base.name}: greedy accuracy {before['accuracy']:.3f}, mean reward "
          f"{before['mean_reward']:.3f}, pass@8 {before['pass@8']:.3f}")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dpo-task-") as scratch:
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = run_variant(variant, seed, base, Path(scratch), args.threads)
                results.setdefault(variant, []).append(row)
                print(json.dumps({"variant": variant, "seed": seed, **row}), flush=True)
    print("\n| variant | greedy accuracy | gain (points) | mean reward | pass@8 | implicit-reward "
          "accuracy | KL to base | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant, rows in results.items():
        gains = [100 * (r["accuracy"] - before["accuracy"]) for r in rows]
        implicit = [r["implicit_reward_accuracy"] for r in rows if r["implicit_reward_accuracy"] is not None]
        print(f"| {variant} | {spread([r['accuracy'] for r in rows])} | {statistics.mean(gains):+.1f} | "
              f"{spread([r['mean_reward'] for r in rows])} | {spread([r['pass@8'] for r in rows])} | "
              f"{spread(implicit) if implicit else '-'} | {spread([r['kl'] for r in rows])} | "
              f"{statistics.median(r['train_seconds'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
