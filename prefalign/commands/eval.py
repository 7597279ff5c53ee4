"""`prefalign eval`: a policy on a prompt set: greedy accuracy and mean reward, pass@k, KL to a reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefalign.commands.builtin import builtin_data, resolve_builtin_models
from prefalign.config import DataConfig, ModelConfig, validate
from prefalign.data import tokenize_prompts
from prefalign.data.splits import resolve_rows
from prefalign.evaluation.policy import evaluate_policy, format_table
from prefalign.models.loading import fit_max_length, load_causal_lm
from prefalign.options import check_model_location, option
from prefalign.rewards import WeightedRewards
from prefalign.rewards.functions import check_rewards
from prefalign.runtime import distributed
from prefalign.runtime.setup import seed_everything, set_threads


@dataclass
class EvalConfig:
    model: ModelConfig = option(help="The policy to evaluate.", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows (extra columns go to reward functions); builtin = held-out task prompts.",
        factory=lambda: DataConfig(max_length=256),
    )
    reward_functions: list[str | Callable] = option(
        help="Reward functions by name or 'module:function'.", factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    success_threshold: float = option(1.0, "A completion counts as correct when its reward is at least this.")
    k: int = option(8, "Samples per prompt for pass@k (0 = skip sampling).", low=0)
    temperature: float = option(
        1.0, "Sampling temperature for pass@k and the KL estimate (0 = greedy).", low=0,
    )
    top_p: float = option(1.0, "Nucleus sampling for pass@k.", above=0, high=1)
    max_new_tokens: int = option(16, "Longest completion.", low=1)
    reference: str | None = option(
        None, "Reference model folder; when given, report KL(policy || reference) on the samples.",
        check=check_model_location,
    )
    num_prompts: int | None = option(None, "Evaluate at most this many prompts.", low=1)
    batch_size: int = option(128, "Sequences generated together.", low=1)
    seed: int = option(0, "Sampling seed.", low=0)
    output_dir: str = option("runs/eval", "Where eval.json is written.")
    num_threads: int = option(0, "torch CPU threads (0 = default).", low=0)

    def check(self, prefix: str = "") -> None:
        check_rewards(self.reward_functions, self.reward_weights, None, "eval", prefix)


def evaluate(
    config: EvalConfig, *, dataset=None, model=None, tokenizer=None, reference=None,
) -> dict[str, float]:
    """`prefalign eval`: print a table, write eval.json to the output folder, return the metrics."""
    validate(config)
    resolve_builtin_models(config, skip=("model.name_or_path",) if model is not None else ())
    # The built-in prompts here are the task's held-out ones: evaluation never reads training prompts.
    dataset, _ = builtin_data(config.data, "prompts", dataset, train_split="held_out")
    set_threads(config.num_threads)
    seed_everything(config.seed)
    if model is None:
        model, tokenizer = load_causal_lm(config.model, trainable=False)
    if reference is None and config.reference:
        reference, _ = load_causal_lm(
            ModelConfig(name_or_path=config.reference, device=config.model.device, dtype=config.model.dtype),
            trainable=False,
        )
    rows, _ = resolve_rows(config.data, dataset=dataset)
    if config.num_prompts:
        rows = rows.select(range(min(len(rows), config.num_prompts)))
    # Prompts leave max_new_tokens of the model's positions free for the completion.
    data = fit_max_length(config.data, model, "eval", room=config.max_new_tokens)
    prompts, _ = tokenize_prompts(rows, tokenizer, data)
    metrics = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(config.reward_functions, list(config.reward_weights)),
        k=config.k, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
        success_threshold=config.success_threshold, reference=reference, batch_size=config.batch_size,
        seed=config.seed,
    )
    if distributed.is_main_process():  # every process holds the same metrics (ShardedEngine)
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"model": config.model.name_or_path, **metrics}, indent=2))
        print(format_table(metrics))
    return metrics
