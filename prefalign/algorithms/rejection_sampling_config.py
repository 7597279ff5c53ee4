"""Rejection sampling's configuration (the `sample` command's and iterative DPO's per-round settings): every
field's range, and the cross-field rules (`check`) that prefalign.config.validate runs before any model
loads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prefalign.config import DataConfig, ModelConfig
from prefalign.errors import ConfigError
from prefalign.options import check_model_location, option
from prefalign.rewards.functions import check_rewards

PAIR_STRATEGIES = ("best_vs_worst", "best_vs_random", "all_pairs")


OUTPUT_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet", "hf": ""}


# A prompt file's own answers (preference, SFT, unpaired formats): they describe its static answers, not the
# samples (a static `margin` would reach reward training on the sampled pairs), so they are not copied into
# the rows.
STATIC_ANSWER_COLUMNS = ("chosen", "rejected", "completion", "label", "margin")


@dataclass
class RejectionSamplingConfig:
    """How samples are drawn, scored and turned into rows (shared by `sample` and `dpo --rounds K`)."""

    n: int = option(8, "Samples per prompt (at least 2 for a pair strategy).", low=1)
    temperature: float = option(
        1.0, "Sampling temperature (0 = greedy, which makes n identical samples).", low=0,
    )
    top_p: float = option(
        1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.", above=0, high=1,
    )
    top_k: int = option(0, "Keep only the k most likely tokens (0 = off).", low=0)
    max_new_tokens: int = option(64, "Longest completion in tokens.", low=1)
    stop_strings: list[str] = option(
        help="Extra strings that end a completion (EOS always does).", factory=list,
    )
    strategy: Literal["best_vs_worst", "best_vs_random", "all_pairs", "best_of_n"] = option(
        "best_vs_worst",
        "Pairs by strategy (preference data), or best_of_n (SFT data: each prompt's best sample)."
    )
    score_margin: float = option(
        0.0, "A pair needs chosen score - rejected score >= this (and > 0: ties never pair).", low=0,
    )
    min_best_score: float | None = option(
        None,
        "Keep a prompt only when its best sample scores at least this (e.g. 1.0: only right answers are "
        "chosen); None = no floor.",
    )
    drop_truncated: bool = option(
        False, "Leave out samples cut at max_new_tokens (counted); otherwise they are scored as they are.",
    )
    reward_functions: list[str | Callable] = option(
        help="Reward functions by registry name or 'module:function'.", factory=lambda: ["exact_match"],
    )
    reward_weights: list[float] = option(help="One weight per reward function (default all 1).", factory=list)
    reward_model: str | None = option(
        None, "A reward model folder scored alongside the functions (prefalign.rewards.RewardModelScorer).",
        check=check_model_location,
    )
    reward_model_weight: float = option(1.0, "Weight of the reward model's score in the sum.")
    generation_batch_size: int = option(64, "Sequences (prompts x n) the engine decodes together.", low=1)

    def check(self, prefix: str = "sampling.") -> None:
        check_settings(self, prefix)


@dataclass
class RoundSamplingConfig(RejectionSamplingConfig):
    """The sampling of each round of iterative DPO (`prefalign dpo --rounds K`): the above, plus where
    the prompts come from, how many each round uses, and the per-round held-out check."""

    prompt_path: list[str] = option(
        help="Prompt-only rows to sample from; empty = the prompts (and extra columns) of data.path.",
        factory=list,
    )
    prompts_per_round: int = option(
        0, "Prompts sampled per round, taken in turn from the shuffled pool (0 = every prompt, every round).",
        low=0,
    )
    eval_prompts: int = option(
        200, "Held-out prompts (from the eval rows) scored greedily after each round; 0 = skip.", low=0,
    )


@dataclass
class SampleConfig:
    model: ModelConfig = option(help="The policy that samples.", factory=ModelConfig)
    data: DataConfig = option(
        help="Prompt-only rows (extra columns such as `answer` go to the reward functions); builtin = the "
             "task's training prompts.",
        factory=lambda: DataConfig(max_length=256),
    )
    sampling: RejectionSamplingConfig = option(
        help="Sampling, scoring and pairing.", factory=RejectionSamplingConfig,
    )
    seed: int = option(0, "Sampling seed (the same seed and settings give the same samples).", low=0)
    output_dir: str = option("runs/sample", "Folder for the rows, samples.jsonl, stats and provenance.")
    output_format: Literal["jsonl", "parquet", "hf"] = option(
        "jsonl", "Rows as JSON Lines, Parquet, or a datasets.save_to_disk folder.",
    )
    save_samples: bool = option(
        True, "Also write every sample with its scores and finish reason (samples.jsonl).",
    )
    overwrite: bool = option(False, "Replace rows already in output_dir.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).", low=0)


def check_settings(settings: RejectionSamplingConfig, prefix: str = "sampling.") -> None:
    """The sampling section's rules between fields (its ranges are declared with the fields); rejection_sample
    runs it too, for callers that build the settings themselves."""
    if settings.strategy in PAIR_STRATEGIES and settings.n < 2:
        raise ConfigError(
            f"config key '{prefix}n' is {settings.n}, but the pair strategy {settings.strategy!r} needs at "
            f"least 2 samples per prompt to compare; raise {prefix}n or use strategy=best_of_n"
        )
    if settings.n < 1:
        raise ConfigError(f"config key '{prefix}n' must be at least 1, got {settings.n}")
    if settings.score_margin < 0:
        raise ConfigError(f"config key '{prefix}score_margin' must be >= 0, got {settings.score_margin}")
    if settings.generation_batch_size < 1:
        raise ConfigError(
            f"config key '{prefix}generation_batch_size' must be at least 1, got "
            f"{settings.generation_batch_size}"
        )
    if any(not stop for stop in settings.stop_strings):
        raise ConfigError(
            f"config key '{prefix}stop_strings' holds an empty string, which would end every completion "
            "at once"
        )
    check_rewards(
        settings.reward_functions, settings.reward_weights, settings.reward_model, "rejection sampling",
        prefix,
    )
