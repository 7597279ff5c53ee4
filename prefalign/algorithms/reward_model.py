"""Reward model: learn a scalar score of (prompt, completion) from preference pairs (Bradley–Terry).

Loss per pair −log σ(r_w − r_l − m) (+ c · mean((r_w + r_l)²) reward centering), from
`prefalign.losses.bradley_terry_loss`. The backbone is `AutoModelForSequenceClassification` with one label:
a decoder reads its score at the last non-padding token, an encoder at its pooled first token (the model's
own rule, see `prefalign.rewards.scorer`). Chosen and rejected go through one forward pass.

The saved folder loads with plain `AutoModelForSequenceClassification.from_pretrained`; beside the weights,
prefalign_reward.json holds the text rendering, max_length and the mean/std of the scores on the training
data, so `RewardModelScorer` scores exactly as training saw the text. A LoRA run saves the merged model (the
adapter goes to final/adapter).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from prefalign.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    TrainConfig,
    distributed_option,
    validate,
)
from prefalign.data.splits import resolve_rows
from prefalign.evaluation.pairs import evaluate_pairs
from prefalign.losses import bradley_terry_loss
from prefalign.models.forward import count_tokens, mixed_precision, use_bf16_autocast
from prefalign.models.loading import disable_dropout, fit_max_length, is_peft_model, model_device
from prefalign.models.saving import model_card, save_model
from prefalign.options import option
from prefalign.rewards.encoding import (
    SETTINGS_FILE,
    PairStats,
    RewardSettings,
    collate_pairs,
    encode_pairs,
    resolve_rendering,
)
from prefalign.rewards.scorer import RewardModelScorer, load_reward_backbone, reward_scores
from prefalign.runtime import distributed
from prefalign.runtime.loop import LossOutput, TrainResult, finished_run, train_on_examples
from prefalign.runtime.setup import start_run, write_run_file

logger = logging.getLogger("prefalign")


@dataclass
class RewardConfig:
    model: ModelConfig = option(
        help="Backbone: a causal LM or an encoder folder (a one-label score head is added); "
             "builtin = the tiny base model.",
        factory=ModelConfig,
    )
    data: DataConfig = option(
        help="Preference rows (prompt/chosen/rejected, plain or conversational, implicit prompt, optional "
             "margin). max_length cuts whole sequences from the left.",
        factory=lambda: DataConfig(max_length=512),
    )
    train: TrainConfig = option(
        help="Optimisation and run folder. lr 2e-5 for a full fine-tune of the backbone (InstructGPT's 6B "
             "reward model used 9e-6), one epoch unless max_steps is set (reward models overfit after one "
             "epoch, Ouyang et al. 2022). The built-in task's recipe is examples/reward.yaml.",
        factory=lambda: TrainConfig(learning_rate=2e-5),
    )
    distributed: DistributedConfig = distributed_option()
    rendering: Literal["auto", "chat_template", "plain"] = option(
        "auto",
        "How conversations become text: the tokenizer's chat template, or 'User: ...\\nAssistant: ...' "
        "(plain); auto = the template when there is one.",
    )
    center_rewards_coefficient: float = option(
        0.0, "Reward centering c · mean((r_w + r_l)²) (Eisenstein et al. 2023 suggest 0.01); 0 = off.", low=0,
    )
    use_margin: bool = option(True, "Subtract the data's `margin` column from r_w − r_l when it has one.")
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto",
        "bf16 autocast for the training forward/backward (weights and optimizer stay in their dtype): auto = "
        "on CUDA with bf16, and on CPUs with native bf16 instructions (AVX512-BF16 or AMX) for models at "
        "least 256 wide, where bf16 matmuls run several times faster than fp32 (attention over at most 128 "
        "keys stays in fp32 there: faster on a CPU); no = never. Scoring and evaluation never autocast.",
    )
    group_by_length: bool = option(
        True,
        "Build micro-batches of pairs of similar length (seeded, from shuffled groups of 64 batches) to cut "
        "padding; batches come in random order each epoch.",
    )
    disable_dropout: bool = option(
        True,
        "Turn the backbone's dropout off while training (TRL's RewardConfig does the same by default): on "
        "HH-RLHF with MiniLM the held-out accuracy was the same without it (0.600-0.604 vs 0.602), and on a "
        "CPU in bf16 its random masks cost about a third of the forward pass.",
    )
    normalization_pairs: int = option(
        1000, "Training pairs scored after training for the saved reward mean/std (0 = all).", low=0,
    )
    eval_batch_size: int = option(64, "Sequences per forward pass when evaluating and scoring.", low=1)
    eval_only: bool = option(
        False,
        "Only evaluate model.name_or_path (a trained reward model) on data.eval_path (else data.path).",
    )


@dataclass
class RewardTrainResult(TrainResult):
    evaluation: dict[str, Any] | None = None  # held-out pair metrics (pair_metrics) when there is eval data
    settings: RewardSettings = field(default_factory=RewardSettings)
    model_dir: Path | None = None  # <run>/final when saved


def make_reward_loss(center_coefficient: float, use_margin: bool, autocast_bf16: bool = False):
    """loss_fn for train_on_examples: sums over the micro-batch's pairs (the runtime divides by the step's
    pairs)."""

    def reward_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
        # bf16 autocast with short attention kept in fp32 on a CPU (faster there: MiniLM-L6, 32 rows x 128
        # tokens, forward + backward 1.0 s against 1.33 s with bf16 attention).
        with mixed_precision(model_device(model), autocast_bf16):
            scores = reward_scores(model, batch).float()  # (2B,): the loss and its differences in fp32
        pairs = scores.shape[0] // 2
        margin = batch["margin"].to(scores.device) if use_margin and "margin" in batch else None
        loss, metrics = bradley_terry_loss(
            scores[:pairs], scores[pairs:], margin=margin, center_coefficient=center_coefficient,
        )
        detached = scores.detach().float()
        # std/min/max of each micro-batch, weighted by its pairs: exact with grad_accum = 1.
        metrics.update(
            mean_reward=detached.mean().item(),
            std_reward=detached.std(correction=0).item(),
            min_reward=detached.min().item(),
            max_reward=detached.max().item(),
        )
        return LossOutput(
            loss_sum=loss * pairs, metrics={k: v * pairs for k, v in metrics.items()},
            tokens=count_tokens(batch),
        )

    return reward_loss


def count_pairs(batch: dict[str, torch.Tensor]) -> float:
    return batch["input_ids"].shape[0] / 2


def length_grouped_batches(
    examples: list[dict[str, Any]], batch_size: int, seed: int, group: int = 64,
) -> list[list[dict[str, Any]]]:
    """Micro-batches of pairs of similar length: shuffle, cut into groups of `group` batches, sort each
    group by the longer side of each pair, slice into batches. Padding shrinks to the spread inside a batch;
    the runtime then draws the batches in a new random order every epoch."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(
            order[start : start + span],
            key=lambda i: max(len(examples[i]["chosen_ids"]), len(examples[i]["rejected_ids"])),
        )
        batches += [
            [examples[i] for i in chunk[k : k + batch_size]] for k in range(0, len(chunk), batch_size)
        ]
    return batches


def train_reward_model(
    config: RewardConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, save: bool = True,
) -> RewardTrainResult:
    """Train a reward model as configured; saved to <run>/final unless save=False. Resuming a finished run
    returns its result without training (finished_reward_run)."""
    validate(config)
    if (finished := finished_run(config, "reward")) is not None:
        return finished_reward_run(finished)
    run_dir, model, tokenizer = start_run(config, "reward", model, tokenizer, load=load_reward_backbone)
    config = dataclasses.replace(config, data=fit_max_length(config.data, model, "reward"))
    settings = RewardSettings(
        rendering=resolve_rendering(config.rendering, tokenizer), max_length=config.data.max_length,
    )
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    examples, stats = encode_pairs(train_rows, tokenizer, settings, config.data)
    data_stats = {"train": _log_stats("train", stats)}
    eval_examples = None
    if eval_rows is not None:
        eval_examples, eval_stats = encode_pairs(eval_rows, tokenizer, settings, config.data)
        data_stats["eval"] = _log_stats("eval", eval_stats)
    write_run_file(run_dir / "data_stats.json", json.dumps(data_stats, indent=2))
    scorer = RewardModelScorer(model, tokenizer, batch_size=config.eval_batch_size, settings=settings)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    autocast_bf16 = use_bf16_autocast(config.mixed_precision, model_device(model), width)
    logger.info("reward model training in %s", "bf16 autocast" if autocast_bf16 else "the weights' dtype")
    if config.disable_dropout:
        disable_dropout(model)
    items, collate = examples, lambda batch: collate_pairs(batch, tokenizer.pad_token_id)
    if config.group_by_length:
        # The runtime then draws whole micro-batches (grouped): one "example" per micro-batch.
        items = length_grouped_batches(examples, config.train.batch_size, config.train.seed)
    result = train_on_examples(
        model=model,
        examples=items,
        collate=collate,
        loss_fn=make_reward_loss(config.center_rewards_coefficient, config.use_margin, autocast_bf16),
        units_of=count_pairs,
        config=config.train,
        run_dir=run_dir,
        evaluate=(lambda _model: _numeric(evaluate_pairs(scorer, eval_examples))) if eval_examples else None,
        grouped=config.group_by_length,
        description="reward",
        parallel=config.distributed,
    )
    settings.reward_mean, settings.reward_std = _training_reward_statistics(scorer, examples, config)
    evaluation = evaluate_pairs(scorer, eval_examples) if eval_examples else None
    if evaluation is not None:
        write_run_file(run_dir / "eval_reward.json", json.dumps(evaluation, indent=2))
    model_dir = None
    if save:
        model_dir = run_dir / "final"
        distributed.on_main_process_whole(
            save_reward_model, model, tokenizer, model_dir, settings, _card_lines(config, result, evaluation),
        )
    return RewardTrainResult(
        step=result.step, metrics=result.metrics, run_dir=run_dir, wall_time=result.wall_time,
        evaluation=evaluation, settings=settings, model_dir=model_dir,
    )


def finished_reward_run(finished: TrainResult) -> RewardTrainResult:
    """A finished run's result as training returns it: its steps and metrics (finished_run), the held-out
    evaluation and scoring settings it saved, and its final/ folder."""
    model_dir = finished.run_dir / "final"
    evaluation_file = finished.run_dir / "eval_reward.json"
    settings_file = model_dir / SETTINGS_FILE
    return RewardTrainResult(
        **vars(finished),
        evaluation=json.loads(evaluation_file.read_text()) if evaluation_file.exists() else None,
        settings=RewardSettings.from_folder(model_dir, None, None) if settings_file.exists() else (
            RewardSettings()
        ),
        model_dir=model_dir,
    )


def _log_stats(name: str, stats: PairStats) -> dict[str, Any]:
    log = logger.warning if stats.truncated_sequences or stats.dropped_identical else logger.info
    log("%s data: %s", name, stats.summary())
    return stats.__dict__.copy()


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """Eval metrics for metrics.jsonl; an undefined correlation stays out rather than becoming NaN."""
    return {key: value for key, value in metrics.items() if value is not None}


def _training_reward_statistics(
    scorer: RewardModelScorer, examples: list[dict[str, Any]], config: RewardConfig,
) -> tuple[float, float]:
    """Mean and std of the scores of training completions (a seeded sample of pairs), saved for
    normalising."""
    chosen = examples
    if config.normalization_pairs and len(examples) > config.normalization_pairs:
        chosen = random.Random(config.train.seed).sample(examples, config.normalization_pairs)
    scores = scorer.score_sequences([e["chosen_ids"] for e in chosen] + [e["rejected_ids"] for e in chosen])
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return mean, std


def save_reward_model(
    model, tokenizer, out_dir: Path, settings: RewardSettings, card_lines: dict[str, Any],
) -> Path:
    """A folder AutoModelForSequenceClassification loads as is; LoRA is merged (adapter kept in adapter/)."""
    to_save = copy.deepcopy(model).merge_and_unload() if is_peft_model(model) else model
    card = model_card("Reward model", card_lines)
    save_model(to_save, tokenizer, out_dir, card=card, extra_files={SETTINGS_FILE: settings.as_dict()})
    if is_peft_model(model):
        model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    return out_dir


def _card_lines(
    config: RewardConfig, result: TrainResult, evaluation: dict[str, Any] | None,
) -> dict[str, Any]:
    lines: dict[str, Any] = {
        "method": "Bradley–Terry reward model (one-label sequence classifier)",
        "backbone": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "steps": result.step,
        "learning rate": config.train.learning_rate,
        "text rendering": config.rendering,
        "max length (left truncation)": config.data.max_length,
        "scoring": f"see {SETTINGS_FILE}; "
                   "prefalign.rewards.RewardModelScorer(folder).score(prompts, completions)",
    }
    if evaluation:
        lines["held-out accuracy"] = (
            f"{evaluation['accuracy']:.3f} (95% CI "
            f"{evaluation['accuracy_ci95_low']:.3f}–{evaluation['accuracy_ci95_high']:.3f}, "
            f"{evaluation['num_pairs']} pairs)"
        )
    return lines
