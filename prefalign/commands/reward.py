"""`prefalign reward` (train a reward model, or evaluate one with --eval_only) and `prefalign eval-reward`."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.algorithms.reward_model import RewardConfig, train_reward_model
from prefalign.commands.builtin import builtin_data, resolve_builtin, resolve_builtin_models
from prefalign.config import DataConfig, validate
from prefalign.data.splits import resolve_rows
from prefalign.evaluation.pairs import evaluate_pairs, format_pair_metrics
from prefalign.options import check_device, check_model_location, option
from prefalign.rewards.encoding import encode_pairs
from prefalign.rewards.scorer import RewardModelScorer
from prefalign.runtime import distributed
from prefalign.runtime.setup import set_threads


@dataclass
class EvalRewardConfig:
    model: str = option(
        "runs/reward/final",
        "Reward-model folder (final/ of `prefalign reward`, or any one-label sequence classifier).",
        check=check_model_location,
    )
    data: DataConfig = option(
        help="Held-out preference rows: data.path (builtin = the task's held-out pairs).", factory=DataConfig,
    )
    batch_size: int = option(64, "Sequences per forward pass.", low=1)
    device: str = option(
        "auto", "Where the model runs; auto = cuda when it is available, else cpu.", check=check_device,
    )
    output_dir: str = option("runs/eval-reward", "Where eval_reward.json is written.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).", low=0)


def eval_reward(config: EvalRewardConfig) -> dict[str, Any]:
    """`prefalign eval-reward`: pairwise accuracy (95% CI), mean margin, length correlation; table + JSON."""
    validate(config)
    set_threads(config.num_threads)
    resolve_builtin_models(config)
    scorer = RewardModelScorer(config.model, batch_size=config.batch_size, device=config.device)
    # `builtin` here means the task's held-out pairs: evaluation never reads training pairs.
    dataset, _ = builtin_data(config.data, "preference", train_split="held_out")
    rows, _ = resolve_rows(config.data, dataset=dataset)
    started = time.perf_counter()
    examples, stats = encode_pairs(rows, scorer.tokenizer, scorer.settings, config.data)
    metrics = {"model": config.model, **evaluate_pairs(scorer, examples),
               "dropped_identical": stats.dropped_identical, "truncated_sequences": stats.truncated_sequences,
               "seconds": round(time.perf_counter() - started, 2)}
    if distributed.is_main_process():
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_reward.json").write_text(json.dumps(metrics, indent=2))
        print(format_pair_metrics(metrics))
    return metrics


def reward(
    config: RewardConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, save: bool = True,
) -> Any:
    """`prefalign reward`: train (or, with --eval_only, evaluate) a reward model. Keyword arguments as
    prefalign.algorithms.reward_model.train_reward_model takes them."""
    validate(config)
    if not config.eval_only:
        dataset, eval_dataset = resolve_builtin(
            config, "reward_pairs", dataset=dataset, eval_dataset=eval_dataset, model=model,
        )
        return train_reward_model(
            config, dataset=dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer, save=save,
        )
    data = copy.deepcopy(config.data)
    if data.eval_path:
        data.path, data.eval_path = list(data.eval_path), []
    return eval_reward(EvalRewardConfig(
        model=config.model.name_or_path, data=data, batch_size=config.eval_batch_size,
        device=config.model.device, output_dir=config.train.output_dir or "runs/eval-reward",
        num_threads=config.train.num_threads,
    ))
