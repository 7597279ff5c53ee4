"""How a (prompt, completion) becomes the sequence a reward model reads, for training (`encode_pairs`) and
scoring (`encode_completions`) alike: rendering, framing with the tokenizer's special tokens, left truncation,
collation, and the settings saved with a reward model (see prefalign.rewards.scorer for the steps)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.config import DataConfig
from prefalign.data import pad_sequences, tokenize_preference, tokenize_prompts, tokenize_sft
from prefalign.data.formats import Messages
from prefalign.errors import ConfigError, DataError, ModelError

logger = logging.getLogger("prefalign")

SETTINGS_FILE = "prefalign_reward.json"
# The data layer cuts completions on the right at max_length; reward sequences are cut from the left here.
NO_LIMIT = 1 << 40
PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
RENDERINGS = ("chat_template", "plain")


# ----------------------------------------------------------------------------- rendering and settings


def render_plain(messages: Messages, add_generation_prompt: bool) -> str:
    """'User: hi\\nAssistant: hello': one line per turn, role name, colon, space, content.

    With the generation prompt the text ends in 'Assistant:', so a rendered prompt is a prefix of the
    rendered prompt + completion and the completion text starts with ' ' (a word boundary).
    """
    turns = [f"{PLAIN_ROLE_NAMES[message['role']]}: {message['content']}" for message in messages]
    if add_generation_prompt:
        turns.append("Assistant:")
    return "\n".join(turns)


def resolve_rendering(choice: str, tokenizer: Any) -> str:
    """'auto' -> the chat template when the tokenizer has one, else the plain-text rendering."""
    if choice == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"
    if choice not in RENDERINGS:
        raise ConfigError(f"config key 'rendering' must be auto, chat_template or plain, got {choice!r}")
    if choice == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "rendering=chat_template but the tokenizer has no chat template; use rendering=plain or auto"
        )
    return choice


def renderer(rendering: str):
    """The data layer's `render=` argument for a rendering name (None = the tokenizer's chat template)."""
    return render_plain if rendering == "plain" else None


@dataclass
class RewardSettings:
    """What scoring must repeat from training; saved beside the weights as prefalign_reward.json."""

    rendering: str = "chat_template"  # chat_template | plain (render_plain)
    max_length: int = 512  # longest sequence; longer ones are cut from the left
    reward_mean: float = 0.0  # of the scores on (a sample of) the training completions
    reward_std: float = 1.0
    plain_format: str = (
        "User: {content}\\nAssistant: {content} (one line per turn; roles System, User, Assistant, Tool)"
    )
    truncation: str = "left, keeping the leading special tokens"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_folder(cls, folder: Path, tokenizer: Any, model_config: Any) -> RewardSettings:
        """The saved settings, or defaults for a reward model trained elsewhere (no prefalign_reward.json)."""
        path = Path(folder) / SETTINGS_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{key: value for key, value in saved.items() if key in known})
        return cls.defaults_for(tokenizer, model_config)

    @classmethod
    def defaults_for(cls, tokenizer: Any, model_config: Any) -> RewardSettings:
        """Chat template if the tokenizer has one, the model's length limit, no normalisation."""
        limits = [
            getattr(model_config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        ]
        sensible = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
        return cls(rendering=resolve_rendering("auto", tokenizer), max_length=min(sensible, default=512))


# ----------------------------------------------------------------------------- text -> sequences


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids `tokenizer(text)` puts before and after a text's own ids: ([CLS], [SEP]) for BERT,
    ([BOS], []) for Llama, ([], []) for Qwen."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def frame_sequence(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], prefix: list[int], suffix: list[int],
    max_length: int
) -> tuple[list[int], bool]:
    """prompt + completion with the special prefix/suffix ensured, cut from the left to max_length.

    Returns (ids, whether it was cut). The leading special tokens ([CLS], BOS) are kept when cutting.
    """
    ids = list(prompt_ids) + list(completion_ids)
    if prefix and ids[: len(prefix)] != prefix:
        ids = prefix + ids
    if suffix and ids[-len(suffix) :] != suffix:
        ids = ids + suffix
    if len(ids) <= max_length:
        return ids, False
    keep = len(prefix)
    if max_length <= keep:
        raise ConfigError(f"max_length={max_length} leaves no room after the {keep} leading special token(s)")
    return ids[:keep] + ids[len(ids) - (max_length - keep) :], True


@dataclass
class PairStats:
    """What encoding did to preference rows; logged and written to data_stats.json, never silent."""

    rows: int = 0
    kept: int = 0
    truncated_sequences: int = 0  # chosen and rejected counted apart, cut from the left to max_length
    dropped_identical: int = 0  # pairs whose chosen and rejected became the same sequence after the cut

    def summary(self) -> str:
        return (
            f"{self.rows} pairs, {self.kept} kept: {self.truncated_sequences} sequences cut from the left to "
            f"max_length, {self.dropped_identical} pairs dropped as identical after the cut"
        )


def _unlimited(data_config: DataConfig | None) -> DataConfig:
    config = dataclasses.replace(data_config) if data_config is not None else DataConfig()
    if config.max_prompt_length is not None:
        raise ConfigError(
            "data.max_prompt_length is not used by reward models: whole sequences are cut from the left to "
            "data.max_length (keeping the final turns); leave data.max_prompt_length unset"
        )
    config.max_length = NO_LIMIT
    return config


def encode_pairs(
    rows: Any, tokenizer: Any, settings: RewardSettings, data_config: DataConfig | None = None
) -> tuple[list[dict[str, Any]], PairStats]:
    """Preference rows -> examples {chosen_ids, rejected_ids, chosen_length, rejected_length[, margin]}.

    *_ids are whole framed sequences; *_length the completion's token count before any cut (for the
    length-bias check). Pairs that become identical after the left cut are dropped and counted.
    """
    tokenized, _ = tokenize_preference(
        rows, tokenizer, _unlimited(data_config), render=renderer(settings.rendering),
    )
    prefix, suffix = special_tokens_around(tokenizer)
    stats = PairStats(rows=len(tokenized))
    examples = []
    for row in tokenized:
        chosen, chosen_cut = frame_sequence(
            row["prompt_ids"], row["chosen_ids"], prefix, suffix, settings.max_length,
        )
        rejected, rejected_cut = frame_sequence(
            row["prompt_ids"], row["rejected_ids"], prefix, suffix, settings.max_length,
        )
        stats.truncated_sequences += chosen_cut + rejected_cut
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        example = {
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "chosen_length": len(row["chosen_ids"]),
            "rejected_length": len(row["rejected_ids"]),
        }
        if "margin" in row:
            example["margin"] = row["margin"]
        examples.append(example)
    stats.kept = len(examples)
    if not examples:
        raise DataError(f"no preference pairs left to use: {stats.summary()}; raise data.max_length")
    return examples, stats


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        return not any(
            str(message.get("content") or "").strip() for message in completion if isinstance(message, dict)
        )
    return False


def encode_completions(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    tokenizer: Any,
    settings: RewardSettings,
    *,
    allow_empty: bool = False,
) -> list[list[int]]:
    """One framed sequence per (prompt, completion), as `encode_pairs` builds them for training.

    An empty completion is a DataError unless `allow_empty`: then it is read as the prompt followed by EOS,
    which is what a policy that stops at once produced.
    """
    if len(prompts) != len(completions):
        raise DataError(
            f"score: {len(prompts)} prompts but {len(completions)} completions; give "
            "one prompt per completion"
        )
    empty = [index for index, completion in enumerate(completions) if _is_empty(completion)]
    if empty and not allow_empty:
        raise DataError(
            f"score: completion {empty[0]} (0-based) is "
            f"empty{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}; a reward model scores a "
            "(prompt, completion) pair. Drop it, or pass allow_empty=True to score it as the prompt followed "
            "by EOS (what the reward function of as_reward_function() does)."
        )
    config, render = _unlimited(None), renderer(settings.rendering)
    prefix, suffix = special_tokens_around(tokenizer)
    empty_set = set(empty)
    filled = [index for index in range(len(completions)) if index not in empty_set]
    sequences: list[list[int]] = [[] for _ in completions]
    if filled:
        rows = [{"prompt": prompts[index], "completion": completions[index]} for index in filled]
        tokenized, _ = tokenize_sft(rows, tokenizer, config, render=render)
        for index, prompt_ids, completion_ids in zip(
            filled, tokenized["prompt_ids"], tokenized["completion_ids"], strict=True,
        ):
            sequences[index] = frame_sequence(
                prompt_ids, completion_ids, prefix, suffix, settings.max_length,
            )[0]
    if empty:
        tokenized, _ = tokenize_prompts(
            [{"prompt": prompts[index]} for index in empty], tokenizer, config, render=render,
        )
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for index, prompt_ids in zip(empty, tokenized["prompt_ids"], strict=True):
            sequences[index] = frame_sequence(prompt_ids, stop, prefix, suffix, settings.max_length)[0]
    return sequences


# ----------------------------------------------------------------------------- batches and the forward pass


def collate_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask: (rows, longest) long, right-padded (an encoder's first token stays
    first)."""
    return {
        "input_ids": pad_sequences(sequences, pad_token_id),
        "attention_mask": pad_sequences([[1] * len(sequence) for sequence in sequences], 0),
    }


def collate_pairs(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs as one batch: input_ids, attention_mask (2B, L) long, right-padded, rows [0, B) chosen and
    [B, 2B) rejected, so one forward pass scores both; margin (B,) float32 when every example has one."""
    if pad_token_id is None:
        raise ModelError(
            "the tokenizer has no pad token; set tokenizer.pad_token (for example to its eos token)"
        )
    batch = collate_sequences(
        [example["chosen_ids"] for example in examples] + [example["rejected_ids"] for example in examples],
        pad_token_id
    )
    if examples and all(example.get("margin") is not None for example in examples):
        batch["margin"] = torch.tensor(
            [float(example["margin"]) for example in examples], dtype=torch.float32,
        )
    return batch


