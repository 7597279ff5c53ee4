"""Supervised fine-tuning: maximise the log-likelihood of completions given prompts.

The SFT runtime also builds the built-in base model, which proves the shared runtime before DPO and RL
stand on it. Loss: summed completion-token NLL / completion tokens in the optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch

from prefalign.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    TrainConfig,
    distributed_option,
    validate,
)
from prefalign.data import collate_sft, tokenize_sft
from prefalign.data.splits import log_stats, resolve_rows
from prefalign.models.forward import completion_logps, count_tokens
from prefalign.models.loading import fit_max_length, model_device
from prefalign.models.saving import model_card, save_model
from prefalign.options import option
from prefalign.runtime import distributed
from prefalign.runtime.loop import LossOutput, TrainResult, finished_run, train_on_examples
from prefalign.runtime.setup import start_run, to_device, write_run_file


@dataclass
class SFTConfig:
    model: ModelConfig = option(help="The model to fine-tune.", factory=ModelConfig)
    data: DataConfig = option(help="prompt/completion or messages rows.", factory=DataConfig)
    train: TrainConfig = option(
        help="Optimisation and run folder. lr 2e-5 as TRL's SFTConfig (full fine-tuning; LoRA usually wants "
             "about 10x), one epoch unless max_steps is set.",
        factory=lambda: TrainConfig(learning_rate=2e-5),
    )
    distributed: DistributedConfig = distributed_option()


def sft_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
    scored = completion_logps(model, batch)
    nll = -scored.token_logps.sum()
    return LossOutput(loss_sum=nll, metrics={}, tokens=count_tokens(batch))


def completion_tokens(batch: dict[str, torch.Tensor]) -> float:
    return float(batch["completion_mask"].sum())


def make_evaluator(examples, pad_token_id: int, batch_size: int):
    """Held-out mean token NLL of completions."""

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        model.eval()
        total, tokens = 0.0, 0.0
        for start in range(0, len(examples), batch_size):
            batch = to_device(
                collate_sft(examples[start:start + batch_size], pad_token_id), model_device(model),
            )
            scored = completion_logps(model, batch)
            total -= float(scored.token_logps.sum())
            tokens += float(scored.mask.sum())
        return {"loss": total / max(tokens, 1.0)}

    return evaluate


def sft(
    config: SFTConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None, save: bool = True,
) -> TrainResult:
    """Run SFT as configured; returns the training result (the model is saved to <run>/final). Resuming a
    finished run returns its result without training (prefalign.runtime.loop.finished_run)."""
    validate(config)
    if (finished := finished_run(config, "sft")) is not None:
        return finished
    run_dir, model, tokenizer = start_run(config, "sft", model, tokenizer)
    config = dataclasses.replace(config, data=fit_max_length(config.data, model, "sft"))
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    train_data, stats = tokenize_sft(train_rows, tokenizer, config.data)
    data_stats = {"train": log_stats("train", stats)}
    examples = train_data.to_list()
    evaluate = None
    if eval_rows is not None:
        eval_data, eval_stats = tokenize_sft(eval_rows, tokenizer, config.data)
        data_stats["eval"] = log_stats("eval", eval_stats)
        evaluate = make_evaluator(eval_data.to_list(), tokenizer.pad_token_id, config.train.batch_size)
    write_run_file(run_dir / "data_stats.json", json.dumps(data_stats, indent=2))
    result = train_on_examples(
        model=model,
        examples=examples,
        collate=lambda batch: collate_sft(batch, tokenizer.pad_token_id),
        loss_fn=sft_loss,
        units_of=completion_tokens,
        config=config.train,
        run_dir=run_dir,
        evaluate=evaluate,
        description="sft",
        parallel=config.distributed,
    )
    if save:
        card = model_card("SFT model", _card_lines(config, result))
        distributed.on_main_process_whole(
            save_model, model, tokenizer, run_dir / "final", card=card, merge_lora=config.model.merge_lora,
        )
    return result


def _card_lines(config: SFTConfig, result: TrainResult) -> dict[str, Any]:
    last = next((m for m in reversed(result.metrics) if "loss" in m), {})
    return {
        "method": "supervised fine-tuning (completion-token NLL)",
        "base model": config.model.name_or_path,
        "data": ", ".join(config.data.path),
        "steps": result.step,
        "learning rate": config.train.learning_rate,
        "final train loss": f"{last.get('loss', float('nan')):.4f}",
    }
