"""Turning checked rows into token ids: prompt ids and completion ids, kept apart.

How a row becomes tokens:
- Conversation: render the prompt alone with the generation prompt, and prompt + completion without
  it, through the chat template (or a caller's `render`). The completion text is what the whole adds
  after the prompt; if the rendered prompt is not a string prefix of the rendered whole the row is a
  DataError (the template rewrites earlier turns, or the completion is not an assistant turn).
- Plain text: the prompt and the completion strings as given.
- Prompt text and completion text are tokenized separately with `add_special_tokens=False` and
  concatenated, so the prompt ids are an exact prefix of the sequence by construction.
- BOS at most once: prepended to the prompt when the tokenizer normally adds it and the text does
  not already start with it (chat templates often write it themselves); a doubled BOS is collapsed.
- EOS once: appended to each completion unless it already ends with EOS (ignoring trailing
  whitespace, as chat templates may write "<|im_end|>\\n").

Length policy (counted in `TokenizeStats`, never silent):
- `max_prompt_length`: longer prompts are cut from the LEFT (keeping a leading BOS), so the most
  recent context, next to the completion, survives.
- `max_length`: prompt + completion longer than this has its completion cut on the RIGHT.
- A prompt that leaves no room for even one completion token is dropped (counted), or is a
  DataError when `too_long_prompt == "error"`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from prefalign.config import DataConfig
from prefalign.data.formats import (
    Messages,
    Rows,
    Text,
    normalize_preference,
    normalize_prompts,
    normalize_sft,
    where,
)
from prefalign.data.sources import HIDDEN_COLUMNS
from prefalign.errors import ConfigError, DataError

# render(messages, add_generation_prompt) -> text; the default is the tokenizer's chat template.
Render = Callable[[Messages, bool], str]
TOKEN_IDS = datasets.List(datasets.Value("int32"))


@dataclass
class TokenizeStats:
    """What the length policy did; the caller logs `summary()`."""

    rows: int = 0  # rows read
    dropped_too_long_prompt: int = 0  # rows whose prompt alone fills max_length
    truncated_prompts: int = 0  # prompts cut from the left to max_prompt_length
    truncated_completions: int = 0  # completions (chosen and rejected counted apart) cut to max_length

    @property
    def kept(self) -> int:
        return self.rows - self.dropped_too_long_prompt

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "kept": self.kept}

    def summary(self) -> str:
        return (
            f"{self.rows} rows, {self.kept} kept: {self.dropped_too_long_prompt} dropped (prompt fills "
            f"max_length), {self.truncated_prompts} prompts cut from the left (max_prompt_length), "
            f"{self.truncated_completions} completions cut on the right (max_length)"
        )


# ----------------------------------------------------------------------------- the encoder


class _Encoder:
    """A tokenizer plus the BOS / EOS / rendering rules above."""

    def __init__(self, tokenizer: Any, render: Render | None):
        self.tokenizer = tokenizer
        self.render = render
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.eos_text = tokenizer.eos_token
        # Does plain `tokenizer(text)` start with BOS? (Llama yes, Qwen no, GPT-2 no.)
        with_special = tokenizer("a")["input_ids"]
        without_special = tokenizer("a", add_special_tokens=False)["input_ids"]
        adds_bos = (
            self.bos_id is not None
            and with_special[:1] == [self.bos_id]
            and without_special[:1] != [self.bos_id]
        )
        self.bos_prefix = [self.bos_id] if adds_bos else []

    def render_messages(self, messages: Messages, add_generation_prompt: bool, record: dict[str, Any]) -> str:
        if self.render is None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(
                    f"{where(record)}: the data is conversational but the tokenizer has no chat template. "
                    "Use a chat/instruct model whose tokenizer has one, set tokenizer.chat_template, "
                    "or give plain-text strings instead of message lists."
                )
            render = self._chat_template
        else:
            render = self.render
        try:
            return render(messages, add_generation_prompt)
        except DataError:
            raise
        except Exception as error:  # jinja errors (raise_exception in templates) and the like
            raise DataError(f"{where(record)}: the chat template failed on this row: {error}") from error

    def _chat_template(self, messages: Messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_text(self, prompt: Text, record: dict[str, Any]) -> str:
        if isinstance(prompt, list):
            return self.render_messages(prompt, True, record)
        return prompt

    def completion_text(
        self, prompt: Text, prompt_text: str, completion: Text, record: dict[str, Any], column: str
    ) -> str:
        if not isinstance(completion, list):
            return completion
        whole = self.render_messages(list(prompt) + completion, False, record)
        if not whole.startswith(prompt_text):
            raise DataError(_not_a_prefix_message(record, column, prompt_text, whole))
        return whole[len(prompt_text) :]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (the texts may already hold them)."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_prefix and ids[:1] != self.bos_prefix:
            ids = self.bos_prefix + ids
        while self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids

    def with_eos(self, ids: list[int], text: str) -> list[int]:
        if self.eos_id is None:
            return ids
        if ids[-1:] == [self.eos_id] or (self.eos_text and text.rstrip().endswith(self.eos_text)):
            return ids
        return ids + [self.eos_id]

    def lead_length(self, prompt_ids: list[int]) -> int:
        """1 when the prompt starts with BOS (kept when cutting from the left), else 0."""
        return 1 if self.bos_id is not None and prompt_ids[:1] == [self.bos_id] else 0


def _not_a_prefix_message(record: dict[str, Any], column: str, prompt_text: str, whole: str) -> str:
    differ = next(
        (index for index, (a, b) in enumerate(zip(prompt_text, whole, strict=False)) if a != b),
        min(len(prompt_text), len(whole)),
    )
    start = max(0, differ - 30)
    return (
        f"{where(record, column)}: the chat template renders the prompt (with the generation prompt) as text "
        f"that is not a prefix of the rendered prompt + completion; they differ at character {differ}: "
        f"prompt ...{prompt_text[start : differ + 30]!r} vs whole ...{whole[start : differ + 30]!r}. The "
        "template changes earlier turns depending on later ones, or the completion does not start with an "
        "assistant turn. Use a template whose prompt rendering is a prefix (or pass render=...)."
    )


# ----------------------------------------------------------------------------- length policy


def _check_lengths(config: DataConfig) -> None:
    if config.max_length < 2:
        raise ConfigError(f"config key 'data.max_length' must be at least 2, got {config.max_length}")
    if config.max_prompt_length is not None and config.max_prompt_length < 2:
        raise ConfigError(
            "config key 'data.max_prompt_length' must be at least 2 (BOS + one token) or null, got "
            f"{config.max_prompt_length}"
        )


def _fit(
    prompt_ids: list[int],
    completions: list[list[int]],
    encoder: _Encoder,
    config: DataConfig,
    stats: TokenizeStats,
    record: dict[str, Any],
) -> tuple[list[int], list[list[int]]] | None:
    """Apply the length policy to one row; None = drop it."""
    limit = config.max_prompt_length
    if limit is not None and len(prompt_ids) > limit:
        lead = encoder.lead_length(prompt_ids)
        prompt_ids = prompt_ids[:lead] + prompt_ids[len(prompt_ids) - (limit - lead) :]
        stats.truncated_prompts += 1
    room = config.max_length - len(prompt_ids)
    if room < 1:
        if config.too_long_prompt == "error":
            raise DataError(
                f"{where(record, 'prompt')}: the prompt is {len(prompt_ids)} tokens, which leaves no room "
                f"for a completion within data.max_length={config.max_length}. Raise data.max_length, set "
                "data.max_prompt_length to cut prompts from the left, or set data.too_long_prompt=drop."
            )
        stats.dropped_too_long_prompt += 1
        return None
    fitted = []
    for ids in completions:
        if len(ids) > room:
            ids = ids[:room]
            stats.truncated_completions += 1
        fitted.append(ids)
    return prompt_ids, fitted


def _require_some_kept(stats: TokenizeStats, config: DataConfig) -> None:
    if stats.rows == 0:
        raise DataError("no rows to tokenize; check data.path and data.max_samples.")
    if stats.kept == 0:
        raise DataError(
            f"every one of the {stats.rows} rows was dropped because its prompt fills "
            f"data.max_length={config.max_length}; raise data.max_length or set data.max_prompt_length."
        )


# ----------------------------------------------------------------------------- the three formats


def _encode_rows(
    rows: list[dict[str, Any]], completion_columns: list[str], encoder: _Encoder
) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """Prompt ids (with BOS) and completion ids (with EOS) per row, in batched tokenizer calls."""
    prompt_texts = [encoder.prompt_text(row["prompt"], row) for row in rows]
    prompt_ids = [encoder.with_bos(ids) for ids in encoder.encode(prompt_texts)]
    completions = {}
    for column in completion_columns:
        texts = [
            encoder.completion_text(row["prompt"], prompt_text, row[column], row, column)
            for row, prompt_text in zip(rows, prompt_texts, strict=True)
        ]
        completions[column] = [
            encoder.with_eos(ids, text) for ids, text in zip(encoder.encode(texts), texts, strict=True)
        ]
    return prompt_ids, completions


def _tokenize_pairs(
    rows: list[dict[str, Any]],
    completion_columns: list[str],
    tokenizer: Any,
    config: DataConfig,
    render: Render | None,
) -> tuple[dict[str, list[Any]], TokenizeStats]:
    _check_lengths(config)
    encoder = _Encoder(tokenizer, render)
    prompt_ids, completions = _encode_rows(rows, completion_columns, encoder)
    stats = TokenizeStats(rows=len(rows))
    output_columns = ["prompt_ids"] + [f"{column}_ids" for column in completion_columns]
    has_margin = bool(rows) and "margin" in rows[0]
    columns: dict[str, list[Any]] = {name: [] for name in output_columns + (["margin"] if has_margin else [])}
    for index, row in enumerate(rows):
        fitted = _fit(
            prompt_ids[index],
            [completions[column][index] for column in completion_columns],
            encoder,
            config,
            stats,
            row,
        )
        if fitted is None:
            continue
        for name, ids in zip(output_columns, [fitted[0], *fitted[1]], strict=True):
            columns[name].append(ids)
        if has_margin:
            columns["margin"].append(row["margin"])
    _require_some_kept(stats, config)
    return columns, stats


def tokenize_preference(
    rows: Rows, tokenizer: Any, config: DataConfig, *, render: Render | None = None
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Preference rows -> Dataset[prompt_ids, chosen_ids, rejected_ids (+ margin: float)], stats."""
    columns, stats = _tokenize_pairs(
        normalize_preference(rows), ["chosen", "rejected"], tokenizer, config, render
    )
    features = {"prompt_ids": TOKEN_IDS, "chosen_ids": TOKEN_IDS, "rejected_ids": TOKEN_IDS}
    if "margin" in columns:
        features["margin"] = datasets.Value("float32")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), stats


def tokenize_sft(
    rows: Rows, tokenizer: Any, config: DataConfig, *, render: Render | None = None
) -> tuple[datasets.Dataset, TokenizeStats]:
    """SFT rows -> Dataset[prompt_ids, completion_ids], stats."""
    columns, stats = _tokenize_pairs(normalize_sft(rows), ["completion"], tokenizer, config, render)
    features = datasets.Features({"prompt_ids": TOKEN_IDS, "completion_ids": TOKEN_IDS})
    return datasets.Dataset.from_dict(columns, features=features), stats


def tokenize_prompts(
    rows: Rows, tokenizer: Any, config: DataConfig, *, render: Render | None = None
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Prompt-only rows -> Dataset[prompt_ids, prompt (as given), every extra column as is], stats.

    The prompt ends with the generation prompt for conversations, ready for sampling.
    """
    _check_lengths(config)
    normalized = normalize_prompts(rows)
    encoder = _Encoder(tokenizer, render)
    prompt_ids, _ = _encode_rows(normalized, [], encoder)
    stats = TokenizeStats(rows=len(normalized))
    kept, kept_ids = [], []
    for index, row in enumerate(normalized):
        fitted = _fit(prompt_ids[index], [], encoder, config, stats, row)
        if fitted is not None:
            kept.append(index)
            kept_ids.append(fitted[0])
    _require_some_kept(stats, config)
    if isinstance(rows, datasets.Dataset):
        return _select_with_prompt_ids(rows, kept, kept_ids), stats
    records = [
        {name: value for name, value in normalized[index].items() if name not in HIDDEN_COLUMNS}
        for index in kept
    ]
    return datasets.Dataset.from_list(records).add_column("prompt_ids", kept_ids, feature=TOKEN_IDS), stats


def _select_with_prompt_ids(
    rows: datasets.Dataset, kept: list[int], kept_ids: list[list[int]]
) -> datasets.Dataset:
    """The kept rows with their own column types (ClassLabel, nested features) plus prompt_ids.

    Works on the Arrow table directly: `select` + `add_column` would rewrite a shuffled dataset's
    whole table (flatten_indices), which takes seconds for a few thousand rows.
    """
    table = rows.with_format("arrow")[kept]
    table = table.drop_columns([name for name in HIDDEN_COLUMNS if name in table.column_names])
    table = table.append_column("prompt_ids", pa.array(kept_ids, type=pa.list_(pa.int32())))
    features = {name: feature for name, feature in rows.features.items() if name not in HIDDEN_COLUMNS}
    info = datasets.DatasetInfo(features=datasets.Features({**features, "prompt_ids": TOKEN_IDS}))
    return datasets.Dataset(InMemoryTable(table), info=info)
