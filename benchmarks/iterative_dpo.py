"""Iterative (on-policy) DPO against offline DPO on the static pairs, at equal DPO steps.

On the built-in task (2-digit addition, the cached base model), for each seed:
- offline:   one DPO run of rounds x steps optimizer steps on the task's static pairs (right answer vs a
             near-miss wrong answer written by the task, not by the model);
- iterative: `rounds` rounds of rejection sampling (n samples per training prompt from the current policy,
             exact-match scored, best vs worst) then `steps` DPO steps on those pairs.
Same DPO settings (the DPOConfig defaults unless overridden here), same base model, same held-out prompts.
Each run happens in its own subprocess (one torch thread) and prints a JSON line; the parent prints
held-out greedy accuracy and pass@8 (500 held-out prompts) as mean ± std over the seeds, and the ratio.

    PREFALIGN_CACHE=/tmp/pfcache python benchmarks/iterative_dpo.py --seeds 0 1 2 --steps 250 --rounds 2
    python benchmarks/iterative_dpo.py --rpo-alpha 1.0   # both arms with RPO's SFT term on the chosen side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run_arm(arguments) -> dict:
    """One (arm, seed) run in this process; returns held-out metrics."""
    import torch

    torch.set_num_threads(1)
    from prefalign.algorithms.dpo import DPOConfig, dpo
    from prefalign.config import DataConfig, ModelConfig
    from prefalign.data import tokenize_prompts
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.models.loading import load_causal_lm
    from prefalign.recipes.base_model import ensure_base_model
    from prefalign.rewards import WeightedRewards
    from prefalign.tasks.arithmetic import prompt_dataset

    base = str(ensure_base_model())
    config = DPOConfig(model=ModelConfig(name_or_path=base, device="cpu"), rpo_alpha=arguments.rpo_alpha)
    if arguments.beta is not None:
        config.beta = arguments.beta
    if arguments.learning_rate is not None:
        config.train.learning_rate = arguments.learning_rate
    config.train.seed = arguments.seed
    config.train.progress = False
    config.train.overwrite = True
    config.train.num_threads = 1
    config.train.output_dir = os.path.join(arguments.output_dir, f"{arguments.arm}-seed{arguments.seed}")
    if arguments.arm == "offline":
        config.train.max_steps = arguments.rounds * arguments.steps
    else:
        config.rounds = arguments.rounds
        config.round_reference = arguments.round_reference
        config.train.max_steps = arguments.steps
        config.sampling.n = arguments.n
        config.sampling.max_new_tokens = 8
        config.sampling.prompts_per_round = arguments.prompts_per_round
        config.sampling.eval_prompts = 500
    model, tokenizer = load_causal_lm(config.model)
    started = time.perf_counter()
    result = dpo(config, model=model, tokenizer=tokenizer, save=False)
    seconds = time.perf_counter() - started
    prompts, _ = tokenize_prompts(prompt_dataset("held_out"), tokenizer, DataConfig())
    metrics = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=8, max_new_tokens=8,
        seed=arguments.seed,
    )
    rounds = [record.get("heldout/accuracy") for record in result.metrics if "round" in record]
    return {
        "arm": arguments.arm, "seed": arguments.seed, "steps": result.step, "seconds": round(seconds, 1),
        "accuracy": metrics["accuracy"], "pass@8": metrics["pass@8"], "mean_length": metrics["mean_length"],
        "accuracy_per_round": rounds,
    }  # fmt: skip


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=250, help="DPO steps per round (offline runs rounds x steps)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt in each round")
    parser.add_argument(
        "--prompts-per-round", type=int, default=0, help="0 = every training prompt each round",
    )
    parser.add_argument("--round-reference", choices=["original", "previous"], default="original")
    parser.add_argument("--rpo-alpha", type=float, default=0.0)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--output-dir", default="runs/bench-iterative")
    parser.add_argument("--arm", choices=["offline", "iterative"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.arm:  # worker
        print("RESULT " + json.dumps(run_arm(arguments)), flush=True)
        return

    results: dict[str, list[dict]] = {"offline": [], "iterative": []}
    forwarded = [argument for argument in sys.argv[1:]]
    for seed in arguments.seeds:
        for arm in ("offline", "iterative"):
            command = [sys.executable, __file__, *forwarded, "--arm", arm, "--seed", str(seed)]
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.exit(f"{arm} seed {seed} failed:\n{completed.stderr[-3000:]}")
            record = json.loads(lines[-1][len("RESULT "):])
            results[arm].append(record)
            print(json.dumps(record), flush=True)

    print(f"\nbuilt-in task, {len(arguments.seeds)} seeds, {arguments.rounds} x {arguments.steps} DPO steps "
          f"each arm, rpo_alpha={arguments.rpo_alpha}, reference={arguments.round_reference}")  # fmt: skip
    print("| arm | held-out greedy accuracy | held-out pass@8 | greedy length (tokens) | "
          "wall time (s, median) |")
    print("| --- | --- | --- | --- | --- |")
    for arm, records in results.items():
        print(f"| {arm} | {summary([r['accuracy'] for r in records])} | "
              f"{summary([r['pass@8'] for r in records])} | "
              f"{summary([r.get('mean_length', float('nan')) for r in records])} | "
              f"{statistics.median(r['seconds'] for r in records):.0f} |")  # fmt: skip
    offline = statistics.mean(r["accuracy"] for r in results["offline"])
    iterative = statistics.mean(r["accuracy"] for r in results["iterative"])
    print(
        f"\nratio iterative / offline held-out accuracy: {iterative / offline:.2f}" if offline
        else "\noffline accuracy is 0"
    )
    per_round = [[round(value, 3) for value in r["accuracy_per_round"]] for r in results["iterative"]]
    print(f"iterative held-out accuracy per round (round 0 = base), per seed: {per_round}")


if __name__ == "__main__":
    main()
