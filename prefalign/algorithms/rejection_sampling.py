"""`prefalign sample`: rejection sampling, the policy's own answers turned into training data.

For each prompt the policy draws n samples (the rollout engine: one shared prefill, full-vocabulary
log-probs), the scorers rank them (reward functions and/or a reward model, weighted), and then either

- pairs by strategy (preference data for DPO / reward training):
  `best_vs_worst`  the best sample against the worst;
  `best_vs_random` the best against a random sample scoring lower by at least the margin;
  `all_pairs`      every pair whose scores differ by at least the margin (identical pairs once);
- or `best_of_n`: the best sample as an SFT completion (rejection-sampling fine-tuning).

What is dropped is counted, never silent (`SampleStats`): a prompt too long for the model's context,
a sample whose scorer raised or returned NaN (reported with its prompt index), a sample with no score,
an empty completion (the data layer refuses it as chosen or rejected), a group whose scores are all
equal (no preference to learn), a gap below the margin, a best score below `min_best_score`.
Ties: the first sample (lowest index) with the best / worst score is taken, so reruns are identical.

Rows come out in the formats the trainers read (prompt/chosen/rejected or prompt/completion, as
conversations when the prompt is one), with the scores, the prompt's index and its extra columns (not a
prompt file's own chosen/rejected/completion/label/margin, which describe its static answers),
and provenance.json (model, seed, sampling settings, counts) beside them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from prefalign.algorithms.rejection_sampling_config import (
    OUTPUT_SUFFIX,
    PAIR_STRATEGIES,
    STATIC_ANSWER_COLUMNS,
    RejectionSamplingConfig,
    SampleConfig,
    check_settings,
)
from prefalign.config import save_config, to_dict, validate
from prefalign.data import tokenize_prompts
from prefalign.data.context import fit_to_context
from prefalign.data.splits import log_stats, resolve_rows
from prefalign.errors import ConfigError, DataError
from prefalign.files import atomic_file, atomic_folder
from prefalign.models.loading import load_causal_lm, resolve_model_path
from prefalign.rewards import WeightedRewards, describe_failures
from prefalign.rewards.functions import as_completion, build_scorers
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import FINISH_LENGTH, SamplingParams
from prefalign.runtime import distributed
from prefalign.runtime.setup import seed_everything, set_threads
from prefalign.version import __version__

logger = logging.getLogger("prefalign")


@dataclass
class SampleStats:
    """Counts of what was kept and dropped; `summary()` is logged, `as_dict()` goes to metrics."""

    prompts: int = 0
    dropped_over_context: int = 0  # prompt + max_new_tokens beyond the model's context
    samples: int = 0
    reward_failures: int = 0  # samples a scorer raised on or returned NaN for
    unscored_samples: int = 0  # every scorer returned None
    empty_samples: int = 0
    truncated_samples: int = 0
    groups_too_few_scored: int = 0
    groups_all_equal: int = 0
    groups_below_margin: int = 0
    groups_below_min_score: int = 0
    tied_pairs: int = 0  # all_pairs: pairs skipped because their scores are equal
    duplicate_pairs: int = 0  # all_pairs: the same (chosen, rejected) texts again
    rows: int = 0
    prompts_with_rows: int = 0
    mean_score: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    score_by_function: dict[str, float] = field(default_factory=dict)  # functions that scored a sample
    silent_functions: list[str] = field(default_factory=list)  # returned None for every sample
    # the first few scorer failures, with prompt index
    failure_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (
            f"{self.prompts} prompts, {self.samples} samples -> {self.rows} rows from "
            f"{self.prompts_with_rows} prompts; mean score {self.mean_score:.4f}; dropped: "
            f"{self.dropped_over_context} prompts over the context, {self.reward_failures} samples a scorer "
            f"failed on, {self.unscored_samples} unscored, {self.empty_samples} empty, groups: "
            f"{self.groups_all_equal} all-equal, {self.groups_below_margin} below the margin, "
            f"{self.groups_below_min_score} below min_best_score, {self.groups_too_few_scored} with too few "
            f"scored samples; {self.truncated_samples} samples hit max_new_tokens"
        )


@dataclass
class SampleOutput:
    rows: list[dict[str, Any]]  # preference or SFT rows, ready for datasets.Dataset.from_list
    samples: list[dict[str, Any]]  # every sample with its scores
    stats: SampleStats


def choose_pairs(
    scores: list[float], strategy: str, margin: float, rng: random.Random
) -> tuple[list[tuple[int, int]], str | None, int]:
    """Pairs (chosen, rejected) as positions in `scores`, why none (or None), and tied pairs skipped.

    scores: one prompt's usable samples (at least 2). Ties never pair; the first index wins a tie.
    """
    best, worst = max(scores), min(scores)
    if best == worst:
        return [], "all_equal", 0

    # a gap equal to the margin up to float rounding (0.3 - 0.1 vs 0.2) counts
    def clears(gap: float) -> bool:
        return gap >= margin or math.isclose(gap, margin, rel_tol=1e-9, abs_tol=1e-12)

    best_index = scores.index(best)
    if strategy == "best_vs_worst":
        pairs = [(best_index, scores.index(worst))] if clears(best - worst) else []
        return pairs, None if pairs else "below_margin", 0
    if strategy == "best_vs_random":
        lower = [index for index, score in enumerate(scores) if score < best and clears(best - score)]
        return ([(best_index, rng.choice(lower))], None, 0) if lower else ([], "below_margin", 0)
    if strategy == "all_pairs":
        pairs, ties = [], 0
        for chosen, chosen_score in enumerate(scores):
            for rejected, rejected_score in enumerate(scores[chosen + 1 :], start=chosen + 1):
                if chosen_score == rejected_score:
                    ties += 1
                    continue
                high, low = (chosen, rejected) if chosen_score > rejected_score else (rejected, chosen)
                if clears(abs(chosen_score - rejected_score)):
                    pairs.append((high, low))
        return pairs, None if pairs else "below_margin", ties
    raise ConfigError(f"unknown pair strategy {strategy!r}; use one of {PAIR_STRATEGIES} or best_of_n")


def _usable(
    group: list[dict[str, Any]], settings: RejectionSamplingConfig, stats: SampleStats,
) -> list[dict[str, Any]]:
    """The samples that can take part in a row: scored, non-empty, and not truncated when asked."""
    usable = []
    for sample in group:
        if sample["reward_failed"]:
            stats.reward_failures += 1
        elif sample["score"] is None:
            stats.unscored_samples += 1
        elif not sample["text"].strip():
            stats.empty_samples += 1
        elif not (settings.drop_truncated and sample["finish_reason"] == FINISH_LENGTH):
            usable.append(sample)
    return usable


def rows_for_prompt(
    prompt_row: dict[str, Any], group: list[dict[str, Any]], settings: RejectionSamplingConfig,
    rng: random.Random, stats: SampleStats
) -> list[dict[str, Any]]:
    """One prompt's scored samples -> its preference or SFT rows (possibly none, counted in stats)."""
    usable = _usable(group, settings, stats)
    needed = 1 if settings.strategy == "best_of_n" else 2
    if len(usable) < needed:
        stats.groups_too_few_scored += 1
        return []
    scores = [sample["score"] for sample in usable]
    if settings.min_best_score is not None and max(scores) < settings.min_best_score:
        stats.groups_below_min_score += 1
        return []
    extra = {
        name: value
        for name, value in prompt_row.items()
        if name not in ("prompt", "prompt_ids", *STATIC_ANSWER_COLUMNS)
    }
    prompt = prompt_row["prompt"]
    if settings.strategy == "best_of_n":
        best = usable[scores.index(max(scores))]
        return [_with_extra(
            {"prompt": prompt, "completion": as_completion(prompt, best["text"]), "score": best["score"]},
            extra,
        )]
    pairs, reason, ties = choose_pairs(scores, settings.strategy, settings.score_margin, rng)
    stats.tied_pairs += ties
    if reason == "all_equal":
        stats.groups_all_equal += 1
    elif reason == "below_margin":
        stats.groups_below_margin += 1
    rows, seen = [], set()
    for chosen_index, rejected_index in pairs:
        chosen, rejected = usable[chosen_index], usable[rejected_index]
        if (chosen["text"], rejected["text"]) in seen or chosen["text"] == rejected["text"]:
            stats.duplicate_pairs += 1  # a scorer that is not a function of the text, or a repeated pair
            continue
        seen.add((chosen["text"], rejected["text"]))
        rows.append(_with_extra({
            "prompt": prompt,
            "chosen": as_completion(prompt, chosen["text"]),
            "rejected": as_completion(prompt, rejected["text"]),
            "chosen_score": chosen["score"],
            "rejected_score": rejected["score"],
        }, extra))
    return rows


def _with_extra(row: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    # The sampled fields win over an extra column of the same name (a `score` column, say).
    return {**row, **{name: value for name, value in extra.items() if name not in row}}


def build_rewards(settings: RejectionSamplingConfig, *, device: str = "auto") -> WeightedRewards:
    """The weighted scorers: reward functions, plus the reward model when one is configured."""
    return build_scorers(
        settings.reward_functions, settings.reward_weights, reward_model=settings.reward_model,
        reward_model_weight=settings.reward_model_weight, device=device,
        batch_size=settings.generation_batch_size, needed_by="rejection sampling",
    )


def rejection_sample(
    model, tokenizer, prompts: datasets.Dataset, rewards: WeightedRewards, settings: RejectionSamplingConfig,
    *, seed: int, too_long_prompt: str = "drop",
) -> SampleOutput:
    """Sample n completions per tokenized prompt (`prompt_ids`, `prompt`, extra columns), score, build
    rows."""
    check_settings(settings)
    stats = SampleStats(prompts=len(prompts))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    fitted, positions = fit_to_context(  # positions[i]: i's index in the input
        prompts, context, settings.max_new_tokens, too_long=too_long_prompt, name="sampling"
    )
    stats.dropped_over_context += len(prompts) - len(fitted)
    prompts = fitted
    params = SamplingParams(
        n=settings.n, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens, stop_strings=list(settings.stop_strings) or None, seed=seed,
    )
    engine = distributed.ShardedEngine(
        LocalEngine(model, tokenizer, batch_size=settings.generation_batch_size)
    )
    generated = engine.generate([list(ids) for ids in prompts["prompt_ids"]], params)  # [prompt][sample]
    prompt_rows = prompts.remove_columns(["prompt_ids"]).to_list()
    raw_prompts = [row["prompt"] for row in prompt_rows]
    columns = (
        {name: [row[name] for row in prompt_rows] for name in prompt_rows[0] if name != "prompt"}
        if prompt_rows else {}
    )
    completions = [
        [as_completion(prompt, sample.text) for sample in group]
        for prompt, group in zip(raw_prompts, generated, strict=True)
    ]
    # The sampled token ids go to the scorers by name, as GRPO passes them (TRL's `completion_ids`).
    token_ids = {"completion_ids": [[list(sample.token_ids) for sample in group] for group in generated]}
    scored = rewards.score_groups(raw_prompts, completions, columns, token_ids)
    for failure in scored.failures:
        failure.prompt_index = positions[failure.prompt_index]
    if scored.failures:
        logger.warning(describe_failures(scored.failures))
        stats.failure_examples = [failure.describe() for failure in scored.failures[:5]]
    samples = _sample_records(generated, scored, positions)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for prompt_index, prompt_row in enumerate(prompt_rows):
        # the engine returns n each
        group = samples[prompt_index * settings.n : (prompt_index + 1) * settings.n]
        new_rows = rows_for_prompt(prompt_row, group, settings, rng, stats)
        stats.prompts_with_rows += bool(new_rows)
        rows.extend({**row, "prompt_index": positions[prompt_index]} for row in new_rows)
    _fill_sample_stats(stats, samples, scored.per_function)
    stats.rows = len(rows)
    return SampleOutput(rows=rows, samples=samples, stats=stats)


def _sample_records(generated, scored, positions: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "prompt_index": positions[prompt_index],
            "sample_index": sample_index,
            "text": sample.text,
            "num_tokens": len(sample.token_ids),
            "logprob_sum": sum(sample.logprobs),
            "finish_reason": sample.finish_reason,
            "score": scored.scores[prompt_index][sample_index],
            "reward_failed": scored.failed[prompt_index][sample_index],
            **{
                f"score/{name}": values[prompt_index][sample_index]
                for name, values in scored.per_function.items()
            },
        }
        for prompt_index, group in enumerate(generated)
        for sample_index, sample in enumerate(group)
    ]


def _fill_sample_stats(
    stats: SampleStats, samples: list[dict[str, Any]], per_function: dict[str, Any],
) -> None:
    stats.samples = len(samples)
    stats.truncated_samples = sum(sample["finish_reason"] == FINISH_LENGTH for sample in samples)
    stats.finish_reasons = dict(Counter(sample["finish_reason"] for sample in samples))
    scores = [sample["score"] for sample in samples if sample["score"] is not None]
    stats.mean_score = sum(scores) / len(scores) if scores else 0.0
    for name, groups in per_function.items():
        values = [value for group in groups for value in group if value is not None]
        if values:
            stats.score_by_function[name] = sum(values) / len(values)
        else:
            stats.silent_functions.append(name)


def no_rows_reason(stats: SampleStats) -> str:
    """Why no row came out: the rewards when no sample was scored at all, else the sampling settings."""
    if stats.samples and stats.reward_failures + stats.unscored_samples >= stats.samples:
        causes = []
        if stats.reward_failures:
            causes.append(
                f"the reward failed on {stats.reward_failures} of {stats.samples} samples "
                f"({'; '.join(stats.failure_examples[:3])})"
            )
        if stats.silent_functions:
            causes.append(
                f"reward function(s) {', '.join(map(repr, stats.silent_functions))} returned None for every "
                "sample"
            )
        elif stats.unscored_samples:
            causes.append(f"every reward function returned None on {stats.unscored_samples} samples")
        return (
            f"no sample got a score: {'; and '.join(causes)}. Fix the reward function(s) (or the data "
            "columns they read); sampling more would not help."
        )
    return f"{stats.summary()}. Sample more (sampling.n), lower score_margin or min_best_score."


def write_rows(rows: list[dict[str, Any]], path: Path, output_format: str) -> Path:
    """Rows as JSONL, Parquet or a save_to_disk folder, written atomically (prefalign.files)."""
    if output_format not in OUTPUT_SUFFIX:
        raise ConfigError(
            f"config key 'output_format' must be one of {list(OUTPUT_SUFFIX)}, got {output_format!r}"
        )
    if output_format == "hf":
        with atomic_folder(path) as staging:
            datasets.Dataset.from_list(rows).save_to_disk(str(staging))
        return path
    with atomic_file(path) as staging:
        if output_format == "parquet":
            datasets.Dataset.from_list(rows).to_parquet(str(staging))
        else:
            with staging.open("w") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def sample(
    config: SampleConfig, *, dataset: datasets.Dataset | None = None, model=None, tokenizer=None,
) -> SampleOutput:
    """`prefalign sample`: write rows (pairs or best-of-n), samples, stats and provenance to output_dir."""
    validate(config)
    set_threads(config.num_threads)
    seed_everything(config.seed)
    out = Path(config.output_dir)
    name = "best_of_n" if config.sampling.strategy == "best_of_n" else "pairs"
    rows_path = out / f"{name}{OUTPUT_SUFFIX[config.output_format]}"
    if rows_path.exists() and not config.overwrite:
        raise ConfigError(
            f"{rows_path} already exists; set output_dir to a new folder or pass --overwrite true"
        )
    if model is None:
        model, tokenizer = load_causal_lm(config.model, trainable=False)
    rewards = build_rewards(config.sampling, device=config.model.device)
    # The built-in split for sampling is the task's training prompts; held-out prompts stay unseen.
    rows, _ = resolve_rows(config.data, dataset=dataset)
    prompts, tokenize_stats = tokenize_prompts(rows, tokenizer, config.data)
    data_stats = log_stats("prompts", tokenize_stats)
    started = time.perf_counter()
    output = rejection_sample(
        model, tokenizer, prompts, rewards, config.sampling, seed=config.seed,
        too_long_prompt=config.data.too_long_prompt,
    )
    seconds = time.perf_counter() - started
    logger.info("sample: %s", output.stats.summary())
    if not output.rows:
        raise DataError(f"no rows to write: {no_rows_reason(output.stats)}")
    # Every process sampled its share and holds all the rows (ShardedEngine); one writes them.
    distributed.on_main_process(write_outputs, config, output, rows_path, name, data_stats, seconds)
    return output


def write_outputs(
    config: SampleConfig, output: SampleOutput, rows_path: Path, name: str, data_stats: dict, seconds: float,
) -> None:
    """output_dir's files: the rows, samples.jsonl (save_samples), config.yaml and provenance.json."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    write_rows(output.rows, rows_path, config.output_format)
    if config.save_samples:
        write_rows(output.samples, out / "samples.jsonl", "jsonl")
    provenance = {
        "prefalign": __version__,
        "model": (
            resolve_model_path(config.model.name_or_path) if config.model.name_or_path == "builtin"
            else config.model.name_or_path
        ),
        "data": list(config.data.path),
        "seed": config.seed,
        "sampling": to_dict(config.sampling),
        "rows_file": rows_path.name,
        "format": "preference" if name == "pairs" else "sft",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 2),
        "data_stats": data_stats,
        "stats": output.stats.as_dict(),
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    print(f"{output.stats.rows} rows -> {rows_path} ({output.stats.summary()})")
