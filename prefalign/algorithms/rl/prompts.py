"""RL prompts: tokenized, with room left for generation in the model's context (GRPO and PPO)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefalign.config import save_config
from prefalign.data import tokenize_prompts
from prefalign.data.context import fit_to_context
from prefalign.data.splits import log_stats, resolve_rows
from prefalign.errors import ConfigError
from prefalign.runtime.setup import write_run_file

logger = logging.getLogger("prefalign")

DEFAULT_MAX_NEW_TOKENS = 256


def load_prompts(config, tokenizer, model, dataset, eval_dataset, run_dir: Path, *, command: str):
    """Tokenized training prompts (a list of rows) and eval prompts (a Dataset or None) of an RL config
    (data, max_new_tokens; GRPO's overlong_buffer), fitted to the model's context (prefalign.data.context).
    max_new_tokens = 0 is resolved here, logged and written to config.yaml."""
    train_rows, eval_rows = resolve_rows(config.data, dataset=dataset, eval_dataset=eval_dataset)
    context = getattr(model.config, "max_position_embeddings", None)
    prompts, stats = tokenize_prompts(train_rows, tokenizer, config.data)
    data_stats = {"train": log_stats("train", stats)}
    if not config.max_new_tokens:
        config.max_new_tokens = default_max_new_tokens(prompts, context)
        logger.info(
            "%s: max_new_tokens = %d (the model's context is %s tokens)",
            command,
            config.max_new_tokens,
            context,
        )
        save_config(config, run_dir / "config.yaml")
        overlong = getattr(config, "overlong_buffer", 0)
        if overlong > config.max_new_tokens:  # check_config could not bound it before the fit
            raise ConfigError(
                f"overlong_buffer {overlong} is longer than max_new_tokens "
                f"{config.max_new_tokens} (fitted to the model's context of {context} tokens); lower "
                "overlong_buffer or set max_new_tokens"
            )
    splits = {"train": prompts}
    if eval_rows is not None:
        splits["eval"], eval_stats = tokenize_prompts(eval_rows, tokenizer, config.data)
        data_stats["eval"] = log_stats("eval", eval_stats)
    for name, rows in splits.items():
        splits[name], kept = fit_to_context(
            rows, context, config.max_new_tokens, too_long=config.data.too_long_prompt, name=name
        )
        data_stats[name]["dropped_context"] = len(rows) - len(kept)
    write_run_file(run_dir / "data_stats.json", json.dumps(data_stats, indent=2))
    return splits["train"].to_list(), splits.get("eval")


def default_max_new_tokens(prompts, context: int | None) -> int:
    """DEFAULT_MAX_NEW_TOKENS, or what the context leaves after the longest prompt if less (and > 0)."""
    room = context - max(map(len, prompts["prompt_ids"]), default=0) if context else DEFAULT_MAX_NEW_TOKENS
    return min(DEFAULT_MAX_NEW_TOKENS, room) if room > 0 else DEFAULT_MAX_NEW_TOKENS
