"""Iterative (on-policy) DPO: `prefalign dpo --rounds K`.

Each round k = 1..K:
1. the policy as it left round k-1 (round 1: the starting model) samples n completions for the round's
   prompts, the scorers rank them, and pairs are built by the configured strategy (`prefalign sample`'s
   rejection sampling, so the pairs are the policy's own answers: on-policy data);
2. DPO trains on those pairs for `train.max_steps` steps (or `train.epochs` over them): the optimizer and
   schedule start afresh each round, because the data and the reference do;
3. the reference is either the original model (`round_reference=original`: the same anchor every round,
   as in one long DPO run) or the policy at the start of the round (`previous`: each round may move a
   KL-bounded step from where the last one ended, so the policy can travel further over the rounds);
4. the policy is scored greedily on held-out prompts; the round's numbers (sampling counts, DPO metrics,
   held-out accuracy) go to `<run>/metrics.jsonl` and `<run>/report.md`.

Round k's DPO run, its pairs and its samples' statistics live in `<run>/round-k/`; the final policy in
`<run>/final`. The prompts come from `sampling.prompt_path`, else from the training rows (their prompt
and extra columns such as `answer`; the static chosen/rejected are not used); held-out prompts from the
eval rows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets

from prefalign.algorithms.dpo import DPOConfig, dpo
from prefalign.algorithms.rejection_sampling import build_rewards, rejection_sample, write_rows
from prefalign.algorithms.rejection_sampling_config import (
    PAIR_STRATEGIES,
    RoundSamplingConfig,
    check_settings,
)
from prefalign.config import DataConfig, to_dict, validate
from prefalign.data import load_rows, tokenize_prompts
from prefalign.data.sources import HIDDEN_COLUMNS
from prefalign.data.splits import resolve_rows
from prefalign.errors import ConfigError, DataError
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import is_peft_model
from prefalign.models.reference import Reference
from prefalign.models.saving import model_card, save_model
from prefalign.options import option
from prefalign.runtime import distributed
from prefalign.runtime.loop import TrainResult
from prefalign.runtime.setup import start_run

logger = logging.getLogger("prefalign")


PAIR_COLUMNS = ("chosen", "rejected", "margin", "chosen_score", "rejected_score", "prompt_index")


@dataclass
class IterativeDPOConfig(DPOConfig):
    """DPO's keys plus the rounds: each round samples from the current policy, pairs, and trains DPO."""

    rounds: int = option(
        2,
        "Rounds of sample -> pairs -> DPO with the current policy (train.max_steps per round, else "
        "train.epochs over its pairs), at least 2.",
        low=2,
    )
    round_reference: Literal["original", "previous"] = option(
        "original", "Each round's reference is the original model, or the policy as it starts the round.",
    )
    sampling: RoundSamplingConfig = option(
        help="How each round samples (prompts from data.path or sampling.prompt_path), scores and pairs.",
        factory=RoundSamplingConfig,
    )

    def check(self, prefix: str = "") -> None:
        DPOConfig.check(self, prefix)
        check_iterative(self)


def plain_dpo_config(config: DPOConfig) -> DPOConfig:
    """The DPO part of a config that may carry more keys (IterativeDPOConfig, the dpo command's), as a
    copy."""
    return DPOConfig(
        **{field.name: copy.deepcopy(getattr(config, field.name)) for field in dataclasses.fields(DPOConfig)}
    )


def check_iterative(config) -> None:
    if config.distributed.strategy == "fsdp":
        raise ConfigError(
            "iterative DPO (rounds >= 2) does not run under distributed.strategy fsdp yet (each round "
            "restarts training on the model the previous round sharded): use --distributed.strategy ddp, "
            "or run the rounds as separate `prefalign sample` and `prefalign dpo` commands"
        )
    if config.rounds < 2:
        raise ConfigError(
            f"iterative DPO needs rounds >= 2, got {config.rounds} (rounds=1 is plain offline DPO)"
        )
    if config.sampling.strategy not in PAIR_STRATEGIES:
        raise ConfigError(
            f"config key 'sampling.strategy' is {config.sampling.strategy!r}; iterative DPO trains on pairs, "
            f"so use one of {list(PAIR_STRATEGIES)}"
        )
    if config.round_reference not in ("original", "previous"):
        raise ConfigError(
            f"config key 'round_reference' must be 'original' or 'previous', got {config.round_reference!r}"
        )
    if config.round_reference == "previous" and config.reference:
        raise ConfigError(
            "reference is set, but round_reference=previous makes each round's reference the policy "
            "at the start of that round; unset reference, or use round_reference=original to keep "
            "that model as the anchor"
        )
    if config.train.resume:
        raise ConfigError(
            "resume is not supported for rounds > 1 yet: start the run again (or resume a "
            "round's DPO run by hand)"
        )
    if config.sampling.prompts_per_round < 0:
        raise ConfigError(
            f"config key 'sampling.prompts_per_round' must be >= 0, got {config.sampling.prompts_per_round}"
        )
    check_settings(config.sampling)


def prompt_rows(rows: datasets.Dataset) -> datasets.Dataset:
    """The distinct prompts of preference (or prompt-only) rows, with their extra columns."""
    drop = [name for name in rows.column_names if name in PAIR_COLUMNS or name in HIDDEN_COLUMNS]
    seen, keep = set(), []
    for index, prompt in enumerate(rows["prompt"] if "prompt" in rows.column_names else []):
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    if not keep:
        raise DataError(
            "iterative DPO samples from prompts, but the training rows have no `prompt` column "
            "(implicit-prompt pairs); give prompt-only rows with sampling.prompt_path"
        )
    return rows.select(keep).remove_columns(drop)


def _prompt_pool(
    config, train_rows, eval_rows, tokenizer,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Tokenized sampling prompts (shuffled once with the seed) and held-out prompts (or None)."""
    data_config: DataConfig = config.data
    source = (
        load_rows(config.sampling.prompt_path, split=data_config.split, columns=data_config.columns)
        if config.sampling.prompt_path else train_rows
    )
    pool, _ = tokenize_prompts(prompt_rows(source), tokenizer, data_config)
    pool = pool.select(random.Random(config.train.seed).sample(range(len(pool)), len(pool)))
    held_out = None
    if eval_rows is not None and config.sampling.eval_prompts > 0:
        eval_prompts = prompt_rows(eval_rows)
        eval_prompts = eval_prompts.select(range(min(len(eval_prompts), config.sampling.eval_prompts)))
        held_out, _ = tokenize_prompts(eval_prompts, tokenizer, data_config)
    return pool, held_out


def round_prompts(pool: datasets.Dataset, round_index: int, per_round: int) -> datasets.Dataset:
    """Round k's slice of the pool, taken in turn (wrapping), so rounds see fresh prompts while they last."""
    if per_round <= 0 or per_round >= len(pool):
        return pool
    start = ((round_index - 1) * per_round) % len(pool)
    return pool.select([(start + offset) % len(pool) for offset in range(per_round)])


def original_reference(config, model, reference):
    """round_reference=original: the same anchor every round. None when dpo() loads config.reference
    itself each round; else the one Reference rule (a given model, LoRA adapters off, or a frozen copy of
    the start)."""
    if reference is None and config.reference:
        return None
    return Reference(model, reference, snapshot=True)


def _clear_unfinished(run_dir: Path) -> None:
    """A run folder without final/ holds an interrupted run: its rounds are redone from the start."""
    stale = sorted(run_dir.glob("round-*")) + [path for path in [run_dir / "metrics.jsonl"] if path.exists()]
    if stale:
        logger.warning(
            "removing %d files/folders of an unfinished run in %s (rounds cannot be resumed)", len(stale),
            run_dir,
        )
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def round_config(config, run_dir: Path, round_index: int):
    """Round k's plain DPO config: its own folder, the sampled pairs as its whole training set."""
    single = plain_dpo_config(config)
    # No overwrite: that would empty the round folder, pairs.jsonl included, before DPO reads it.
    single.train = dataclasses.replace(
        config.train, output_dir=str(run_dir / f"round-{round_index}"), overwrite=False, resume=False,
    )
    single.data = dataclasses.replace(
        config.data, path=[str(run_dir / f"round-{round_index}" / "pairs.jsonl")], eval_path=[],
        eval_fraction=0.0, max_samples=None,
    )
    if config.round_reference == "previous":
        single.reference = None
    return single


def held_out_metrics(model, tokenizer, prompts, rewards, config) -> dict[str, float]:
    metrics = evaluate_policy(
        model, tokenizer, prompts, rewards, k=0, max_new_tokens=config.sampling.max_new_tokens,
        batch_size=config.sampling.generation_batch_size, seed=config.train.seed,
    )
    # The mean greedy length shows a policy that stops ending its answers (a known DPO failure: EOS pushed
    # down).
    return {
        "heldout/accuracy": metrics["accuracy"], "heldout/mean_reward": metrics["mean_reward"],
        "heldout/mean_length": metrics["mean_length"],
    }


def iterative_dpo(
    config: IterativeDPOConfig, *, dataset=None, eval_dataset=None, model=None, tokenizer=None,
    reference=None, save: bool = True,
) -> TrainResult:
    """K rounds of sample -> pairs -> DPO. Returns a TrainResult whose metrics hold one record per round."""
    validate(config)
    check_iterative(config)  # also for a config whose own check allows one round (the dpo command's)
    started = time.perf_counter()
    run_dir, model, tokenizer = start_run(config, "dpo", model, tokenizer)
    _clear_unfinished(run_dir)
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    pool, held_out = _prompt_pool(config, train_rows, eval_rows, tokenizer)
    rewards = build_rewards(config.sampling, device=config.model.device)
    anchor = original_reference(config, model, reference) if config.round_reference == "original" else None
    history: list[dict[str, Any]] = []
    if held_out is not None:
        history.append(
            {"round": 0, "step": 0, **held_out_metrics(model, tokenizer, held_out, rewards, config)}
        )
        log_round(run_dir, history[-1])  # the starting point, so metrics.jsonl holds the whole curve
    total_steps = 0
    for round_index in range(1, config.rounds + 1):
        single = round_config(config, run_dir, round_index)
        round_dir = Path(single.train.output_dir)
        sampling_started = time.perf_counter()
        sampled = rejection_sample(
            model, tokenizer, round_prompts(pool, round_index, config.sampling.prompts_per_round), rewards,
            config.sampling, seed=config.train.seed * 1000 + round_index,
            too_long_prompt=config.data.too_long_prompt,
        )  # fmt: skip
        sampling_seconds = time.perf_counter() - sampling_started
        logger.info("round %d sampling (%.1f s): %s", round_index, sampling_seconds, sampled.stats.summary())
        if not sampled.rows:
            raise DataError(
                f"round {round_index}: sampling gave no pairs ({sampled.stats.summary()}). The "
                "policy's samples all score alike: raise sampling.n or sampling.temperature, or use "
                "a finer-grained scorer."
            )
        # Every process holds the round's pairs (sampling is sharded and gathered); rank 0 writes them.
        distributed.on_main_process(write_round, round_dir, sampled)
        # previous: the policy as the round starts. Full fine-tuning: dpo() reads it before its first update;
        # LoRA: a merged frozen copy (adapters off would be the original base).
        round_reference = anchor if config.round_reference == "original" else (
            Reference(model, snapshot=True, adapters_off=False) if is_peft_model(model) else None
        )
        result = dpo(
            single, eval_dataset=eval_rows, model=model, tokenizer=tokenizer, reference=round_reference,
            save=False,
        )
        total_steps += result.step
        record = {
            "round": round_index, "step": total_steps, **_sample_metrics(sampled.stats),
            **_dpo_metrics(result),
        }
        record["sample/seconds"], record["dpo/train_seconds"] = sampling_seconds, result.wall_time
        if held_out is not None:
            record.update(held_out_metrics(model, tokenizer, held_out, rewards, config))
        history.append(record)
        distributed.on_main_process(log_round, run_dir, record)
        logger.info(
            "round %d: %s", round_index,
            {key: round(value, 4) if isinstance(value, float) else value for key, value in record.items()},
        )
    distributed.on_main_process(Path.write_text, run_dir / "report.md", report(config, history))
    if save:
        card = model_card("Iterative DPO model", _card_lines(config, history, total_steps))
        distributed.on_main_process_whole(
            save_model, model, tokenizer, run_dir / "final", card=card, merge_lora=config.model.merge_lora,
        )
    return TrainResult(
        step=total_steps, metrics=history, run_dir=run_dir, wall_time=time.perf_counter() - started,
    )


def write_round(round_dir: Path, sampled) -> None:
    """A round's pairs.jsonl (the DPO run's data) and sample_stats.json."""
    write_rows(sampled.rows, round_dir / "pairs.jsonl", "jsonl")
    (round_dir / "sample_stats.json").write_text(json.dumps(sampled.stats.as_dict(), indent=2))


def log_round(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _sample_metrics(stats) -> dict[str, Any]:
    return {
        "sample/prompts": stats.prompts,
        "sample/pairs": stats.rows,
        "sample/mean_score": stats.mean_score,
        "sample/groups_all_equal": stats.groups_all_equal,
        "sample/groups_below_margin": stats.groups_below_margin,
        "sample/reward_failures": stats.reward_failures,
        "sample/truncated": stats.truncated_samples,
    }


def _dpo_metrics(result: TrainResult) -> dict[str, Any]:
    last_train = next((m for m in reversed(result.metrics) if "loss" in m), {})
    last_eval = next((m for m in reversed(result.metrics) if "eval/loss" in m), {})
    picked = {
        f"train/{key}": last_train[key]
        for key in ("loss", "rewards/accuracies", "rewards/margins")
        if key in last_train
    }
    picked.update({key: value for key, value in last_eval.items() if key.startswith("eval/")})
    picked["dpo_steps"] = result.step
    return picked


def report(config, history: list[dict[str, Any]]) -> str:
    def cell(record: dict[str, Any], key: str, digits: int = 3) -> str:
        value = record.get(key)
        return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    scorers = to_dict(config.sampling)["reward_functions"]  # callables by their qualified names
    lines = [
        f"# Iterative DPO: {config.rounds} rounds",
        "",
        f"Reference: {config.round_reference}; sampling: n={config.sampling.n}, "
        f"temperature={config.sampling.temperature}, "
        f"strategy={config.sampling.strategy}, scorers={', '.join(scorers) or '-'}"
        f"{', reward model ' + config.sampling.reward_model if config.sampling.reward_model else ''}; "
        f"DPO: {', '.join(config.loss_type) if isinstance(config.loss_type, list) else config.loss_type}, "
        f"beta={config.beta}, "
        + (
            f"{config.train.max_steps} DPO steps per round." if config.train.max_steps
            else f"{config.train.epochs:g} epochs over each round's pairs."
        ),
        "",
        "Held-out accuracy: share of held-out prompts whose greedy completion scores at least 1.",
        "",
        "| round | DPO steps (total) | prompts | pairs | all-equal groups | sample mean score | samples "
        "cut at max_new_tokens | train loss | eval pair accuracy | held-out accuracy | held-out mean "
        "score | held-out mean length |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for record in history:
        lines.append(
            f"| {record['round']} | {record['step']} | {cell(record, 'sample/prompts')} | "
            f"{cell(record, 'sample/pairs')} | {cell(record, 'sample/groups_all_equal')} | "
            f"{cell(record, 'sample/mean_score')} | {cell(record, 'sample/truncated')} | "
            f"{cell(record, 'train/loss')} | {cell(record, 'eval/rewards/accuracies')} | "
            f"{cell(record, 'heldout/accuracy')} | {cell(record, 'heldout/mean_reward')} | "
            f"{cell(record, 'heldout/mean_length', 2)} |"
        )
    return "\n".join(lines) + "\n"


def _card_lines(config, history: list[dict[str, Any]], total_steps: int) -> dict[str, Any]:
    last = history[-1] if history else {}
    lines = {
        "method": f"iterative DPO, {config.rounds} rounds of rejection sampling ({config.sampling.strategy}, "
                  f"n={config.sampling.n}) then DPO (β = {config.beta})",
        "base model": config.model.name_or_path,
        "reference": f"{config.round_reference} (per round)",
        "DPO steps": total_steps,
        "learning rate": config.train.learning_rate,
    }
    if "heldout/accuracy" in last:
        lines["held-out greedy accuracy per round"] = ", ".join(
            f"{record['heldout/accuracy']:.3f}" for record in history
        )
    return lines
