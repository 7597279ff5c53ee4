"""Hyperparameter sensitivity of DPO and GRPO on the built-in task: the measured cost of "careful tuning".

Starts from the demo's recipes (prefalign.commands.demo_recipes) and the cached built-in base model, and
sweeps one knob at a time around the recipe, each value over several seeds: DPO's learning rate and β, GRPO's
learning rate and clip range ε (ε_low = ε_high). With the GRPO recipe's one update per rollout (μ = 1) the
policy ratio is 1 at every update and the clip never binds, so the ε sweep runs with μ = `--clip-iterations`
passes over each rollout (2 by default), where it does. Each run ends with held-out greedy accuracy on the
task's held-out prompts; the figure plots it against each knob (mean ± seed std, the seeds as dots, the base
as a dashed line) and prints, per knob, the spread of the means across values beside the seed std.

Runs start one after another until `--max-minutes` have passed (the run in progress finishes); what did not
run is listed. The full grid (the defaults: 300 DPO steps, 2,500 GRPO steps, 500 prompts) takes hours on 2
cores; a reduced one:

    PREFALIGN_CACHE=/tmp/pfcache python benchmarks/sensitivity.py --dpo-steps 150 --grpo-steps 250 \
        --eval-prompts 200 --max-minutes 20 --output /tmp/sensitivity
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

KNOBS = {  # knob -> (algorithm, config key, axis label, log axis)
    "dpo_lr": ("dpo", "train.learning_rate", "DPO learning rate", True),
    "dpo_beta": ("dpo", "beta", "DPO β", True),
    "grpo_lr": ("grpo", "train.learning_rate", "GRPO learning rate", True),
    "grpo_clip": ("grpo", "epsilon", "GRPO clip range ε (μ = {mu})", False),
}


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpo-lr", type=floats, default=floats("3e-4,1e-3,3e-3"))
    parser.add_argument("--dpo-beta", type=floats, default=floats("0.03,0.1,0.3"))
    parser.add_argument("--grpo-lr", type=floats, default=floats("3e-5,1e-4,3e-4"))
    parser.add_argument("--grpo-clip", type=floats, default=floats("0.1,0.2,0.3"))
    parser.add_argument("--clip-iterations", type=int, default=2, help="GRPO's μ in the ε sweep")
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--grpo-steps", type=int, default=2500)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/sensitivity-results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--replot", action="store_true", help="redraw the figure from --output's JSON")
    return parser.parse_args()


def grid(args) -> list[dict[str, Any]]:
    """One-at-a-time sweeps: every (knob, value, seed), seeds innermost so each value gets all its seeds
    before the next value starts (a capped run then has whole points, not scattered seeds)."""
    values = {"dpo_lr": args.dpo_lr, "dpo_beta": args.dpo_beta, "grpo_lr": args.grpo_lr,
              "grpo_clip": args.grpo_clip}  # fmt: skip
    return [
        {"knob": knob, "value": value, "seed": seed}
        for knob in ("dpo_lr", "grpo_lr", "dpo_beta", "grpo_clip")
        for value in values[knob]
        for seed in args.seeds
    ]


def configure(run: dict[str, Any], args, base: Path, folder: str):
    from prefalign.algorithms.dpo import DPOConfig
    from prefalign.algorithms.grpo_config import GRPOConfig
    from prefalign.commands import demo_recipes as recipes
    from prefalign.config import apply_overrides

    algorithm = KNOBS[run["knob"]][0]
    if algorithm == "dpo":
        config = apply_overrides(DPOConfig(), recipes.DPO)
        config.train.max_steps = args.dpo_steps
        # only the pairs the steps use: the reference log-probs are precomputed for every training pair
        config.data.max_samples = args.dpo_steps * config.train.batch_size
    else:
        config = apply_overrides(GRPOConfig(), recipes.GRPO)
        config.train.max_steps = args.grpo_steps
        config.log_completions_every = 0
    config.model.name_or_path, config.train.output_dir = str(base), folder
    config.train.seed, config.train.num_threads, config.train.progress = run["seed"], args.threads, False
    config.train.log_every = 10
    if run["knob"] in ("dpo_lr", "grpo_lr"):
        config.train.learning_rate = run["value"]
    elif run["knob"] == "dpo_beta":
        config.beta = run["value"]
    else:
        config.epsilon_low = config.epsilon_high = run["value"]
        config.num_iterations = args.clip_iterations
    return algorithm, config


def run_key(run: dict[str, Any], args, base: Path) -> tuple:
    """What a run trains with: runs with the same key give the same model."""
    algorithm, config = configure(run, args, base, "")
    knobs = (config.beta,) if algorithm == "dpo" else (config.epsilon_low, config.num_iterations)
    return (algorithm, config.train.learning_rate, *knobs, run["seed"])


def held_out_accuracy(model, tokenizer, args) -> float:
    """Greedy exact match on the task's held-out prompts, as the demo evaluates (no pass@k here)."""
    from prefalign.commands import demo_recipes as recipes
    from prefalign.config import DataConfig
    from prefalign.data import tokenize_prompts
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.rewards import WeightedRewards
    from prefalign.tasks.arithmetic import prompt_dataset

    rows = prompt_dataset("held_out", limit=args.eval_prompts)
    prompts, _ = tokenize_prompts(rows, tokenizer, DataConfig())
    rewards, settings = WeightedRewards(["exact_match"]), {**recipes.EVALUATION, "k": 0}
    return evaluate_policy(model, tokenizer, prompts, rewards, seed=0, **settings)["accuracy"]


def train_and_evaluate(run: dict[str, Any], args, base: Path) -> dict[str, Any]:
    from prefalign.commands.dpo import dpo
    from prefalign.commands.grpo import grpo
    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base)), trainable=True)
    with tempfile.TemporaryDirectory(prefix="sensitivity-") as folder:
        algorithm, config = configure(run, args, base, folder)
        train = dpo if algorithm == "dpo" else grpo
        result = train(config, model=model, tokenizer=tokenizer, save=False)
    accuracy = held_out_accuracy(model, tokenizer, args)
    seconds = round(time.perf_counter() - started, 1)
    return {**run, "accuracy": accuracy, "steps": result.step, "seconds": seconds}


def base_accuracy(base: Path, args) -> float:
    from prefalign.config import ModelConfig
    from prefalign.models.loading import load_causal_lm

    return held_out_accuracy(*load_causal_lm(ModelConfig(name_or_path=str(base))), args)


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per knob: mean and sample std over seeds for each value, the spread of the means across values, and
    the mean seed std."""
    summary = {}
    for knob in KNOBS:
        points = {}
        for result in (r for r in results if r["knob"] == knob):
            points.setdefault(result["value"], []).append(result["accuracy"])
        if not points:
            continue
        rows = {
            value: {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seeds": len(accs)}
            for value, accs in sorted(points.items())
        }  # fmt: skip
        means = [row["mean"] for row in rows.values()]
        summary[knob] = {
            "values": rows, "spread": max(means) - min(means),
            "seed_std": statistics.fmean(row["std"] for row in rows.values()),
        }
    return summary


def figure(summary, results, base: float, args, path: Path) -> None:
    from prefalign.reporting.figures import DPI, new_figure

    knobs = [knob for knob in KNOBS if knob in summary]
    plot, axes_list = new_figure(len(knobs), columns=2, width=5.2, height=3.8, top=0.4)
    # one accuracy axis for every panel, so a knob's spread and the seed std compare across panels by eye
    accuracies = [r["accuracy"] for r in results] + [base]
    low, high = min(accuracies), max(accuracies)
    margin = 0.08 * (high - low or 0.1)
    for axes, knob in zip(axes_list, knobs, strict=True):
        _, _, label, log = KNOBS[knob]
        label = label.format(mu=args.clip_iterations)
        rows = summary[knob]["values"]
        values = list(rows)
        means, stds = [rows[v]["mean"] for v in values], [rows[v]["std"] for v in values]
        axes.errorbar(values, means, yerr=stds, fmt="-o", color="#1f77b4", capsize=4, linewidth=1.6,
                      label="mean ± seed std")  # fmt: skip
        seeds = [r for r in results if r["knob"] == knob]
        axes.plot([r["value"] for r in seeds], [r["accuracy"] for r in seeds], ".", color="#1f77b4",
                  alpha=0.35, label="each seed")  # fmt: skip
        axes.axhline(base, color="#7f7f7f", linestyle="--", linewidth=1, label="base")
        if log:
            axes.set_xscale("log")
        axes.set_xticks(values, [f"{v:g}" for v in values])
        axes.minorticks_off()
        spread, seed_std = summary[knob]["spread"], summary[knob]["seed_std"]
        axes.set_title(
            f"{label}: spread {100 * spread:.1f} pts, seed std {100 * seed_std:.1f} pts", fontsize=10
        )
        axes.set_xlabel(label, fontsize=9)
        axes.set_ylabel("held-out greedy accuracy", fontsize=9)
        axes.set_ylim(low - margin, high + margin)
        axes.grid(True, alpha=0.25)
        axes.tick_params(labelsize=8)
        axes.legend(fontsize=7.5, loc="best")
    reduced = args.dpo_steps < 300 or args.grpo_steps < 2500 or args.eval_prompts < 500
    plot.suptitle(
        f"{'Reduced grid: ' if reduced else ''}sensitivity on the built-in task (DPO {args.dpo_steps} steps, "
        f"GRPO {args.grpo_steps} steps, {len(args.seeds)} seeds, {args.eval_prompts} held-out prompts)",
        fontsize=11,
    )
    plot.savefig(path, dpi=DPI)


def main() -> None:
    args = arguments()
    import torch

    from prefalign.commands import demo_recipes as recipes
    from prefalign.config import apply_overrides
    from prefalign.recipes.base_model import BaseConfig, ensure_base_model

    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((args.output / "sensitivity.json").read_text())
        results = saved["results"]
        figure(summarise(results), results, saved["base_accuracy"], args, args.output / "sensitivity.png")
        return
    base = ensure_base_model(apply_overrides(BaseConfig(), recipes.BASE_MODEL))
    started, results, skipped, done = time.perf_counter(), [], [], {}
    base_score = base_accuracy(base, args)
    print(f"base: held-out greedy accuracy {base_score:.3f}", flush=True)
    for run in grid(args):
        same = run_key(run, args, base)  # the recipe's own point is in two sweeps: trained once
        if same not in done and time.perf_counter() - started > 60 * args.max_minutes:
            skipped.append(run)
            continue
        if same not in done:
            done[same] = train_and_evaluate(run, args, base)
        results.append({**done[same], **run})
        print(json.dumps(results[-1]), flush=True)
    summary = summarise(results)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "base_accuracy": base_score,
              "results": results, "summary": summary, "skipped": skipped,
              "minutes": round((time.perf_counter() - started) / 60, 1)}  # fmt: skip
    (args.output / "sensitivity.json").write_text(json.dumps(report, indent=2))
    if summary:
        figure(summary, results, base_score, args, args.output / "sensitivity.png")
    for knob, row in summary.items():
        means = ", ".join(f"{v:g}: {r['mean']:.3f} ± {r['std']:.3f}" for v, r in row["values"].items())
        print(f"{knob}: {means}; spread {row['spread']:.3f}, mean seed std {row['seed_std']:.3f}")
    if skipped:
        print(f"not run ({args.max_minutes:g}-minute cap): {len(skipped)} runs, e.g. {skipped[0]}")


if __name__ == "__main__":
    main()
