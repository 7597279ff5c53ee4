"""The data formats (preference, SFT, prompt-only): checking rows and bringing them to one shape.

A text field is either a plain string or a conversation: a list of {"role", "content"} messages.
Each `normalize_*` function returns a list of plain dicts, one per row, that keep the hidden origin
keys (`__source__`, `__row__`) so the tokenizers can still name file and row in their errors.

Rules worth knowing:
- If any of prompt / chosen / rejected (or prompt / completion) in a row is a conversation, the plain
  strings in that row are read as one turn: a prompt string is a user turn, a completion string an
  assistant turn.
- Implicit prompt (preference data without a `prompt` column), see `split_implicit_prompt`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import datasets

from prefalign.data.sources import HIDDEN_COLUMNS, ROW_COLUMN, SOURCE_COLUMN, row_location
from prefalign.errors import DataError

logger = logging.getLogger("prefalign")

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, Any]]
Text = str | Messages
Rows = datasets.Dataset | Sequence[dict[str, Any]]


# ----------------------------------------------------------------------------- rows and locations


def _records(rows: Rows) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, visible column names) for a dataset or a list of dicts."""
    if isinstance(rows, datasets.Dataset):
        names = [name for name in rows.column_names if name not in HIDDEN_COLUMNS]
        return rows.to_list(), names
    records = [dict(record) for record in rows]
    names = list(dict.fromkeys(name for record in records for name in record if name not in HIDDEN_COLUMNS))
    return records, names


def _sources(records: list[dict[str, Any]], limit: int = 3) -> str:
    """'a.jsonl, b.jsonl' for messages about a whole column."""
    names = list(dict.fromkeys(record.get(SOURCE_COLUMN, "dataset") for record in records)) or ["the rows"]
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _with_origin(record: dict[str, Any], index: int) -> dict[str, Any]:
    record.setdefault(SOURCE_COLUMN, "dataset")
    record.setdefault(ROW_COLUMN, index + 1)
    return record


def where(record: dict[str, Any], column: str | None = None) -> str:
    """'data.jsonl, line 3, column 'chosen'' for error messages."""
    place = row_location(record[SOURCE_COLUMN], record[ROW_COLUMN])
    return f"{place}, column {column!r}" if column else place


def require_columns(
    present: list[str], required: list[str], kind: str, records: list[dict[str, Any]], example: str
) -> None:
    """A missing column names what exists and how to map it (the most common first-run error)."""
    missing = [name for name in required if name not in present]
    if missing:
        raise DataError(
            f"{_sources(records)}: {kind} data needs column(s) {', '.join(map(repr, missing))}, which are "
            f"missing; columns present: {', '.join(present) or '(none)'}. Rename yours with data.columns, "
            f"e.g. data.columns={example}."
        )


# ----------------------------------------------------------------------------- single values


def is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: list[Any], place: str) -> Messages:
    """Validate a conversation; drop None-valued keys (Arrow fills keys other messages have)."""
    messages = []
    for position, message in enumerate(value, start=1):
        if isinstance(message, dict):
            message = {key: item for key, item in message.items() if item is not None}
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(
                f'{place}, message {position}: expected a {{"role": ..., "content": ...}} object, '
                f"got {_short(message)}."
            )
        if message["role"] not in ROLES:
            raise DataError(
                f"{place}, message {position}: role {message['role']!r} is not one of {', '.join(ROLES)}."
            )
        if "content" not in message:
            raise DataError(f"{place}, message {position} ({message['role']}): missing 'content'.")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{place}, message {position} ({message['role']}): 'content' must be a string, "
                f"got {type(message['content']).__name__} {_short(message['content'])}."
            )
        messages.append(message)
    return messages


def _text(record: dict[str, Any], column: str) -> Text:
    """A string or a validated conversation (a single message object counts as a one-message list)."""
    value = record.get(column)
    place = where(record, column)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        return _check_messages(value, place)
    got = "null (missing)" if value is None else f"{type(value).__name__} {_short(value)}"
    raise DataError(f"{place}: expected a string or a list of {{role, content}} messages, got {got}.")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_empty(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(message["content"].strip() for message in value)


def _require_completion(record: dict[str, Any], column: str, value: Text) -> None:
    if _is_empty(value):
        raise DataError(
            f"{where(record, column)}: empty completion (nothing to learn from); fill it in or drop the row."
        )


def _as_prompt_messages(value: Text) -> Messages:
    if isinstance(value, list):
        return value
    return [{"role": "user", "content": value}] if value else []


def _as_completion_messages(value: Text) -> Messages:
    return value if isinstance(value, list) else [{"role": "assistant", "content": value}]


def _margin(record: dict[str, Any]) -> float:
    value = record.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where(record, 'margin')}: expected a finite number, got {_short(value)}.")
    return float(value)


# ----------------------------------------------------------------------------- implicit prompt


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """(prompt, chosen completion, rejected completion) from two full texts that share a beginning.

    Conversations: the prompt is the longest run of identical leading messages, shortened until the
    next message on both sides is an assistant turn (a completion starts with the model speaking).
    Plain strings: the prompt is the common character prefix, cut back to just before its last run
    of whitespace, so the completions start at a word boundary with their leading space (" 4"), which
    is how BPE / SentencePiece tokenizers split words; a common prefix without whitespace (or whose
    only whitespace is at its very start) is kept whole. The prompt may be empty.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared > 0 and not _assistant_turn_at(chosen, rejected, shared):
            shared -= 1
        return chosen[:shared], chosen[shared:], rejected[shared:]
    prefix = os.path.commonprefix([chosen, rejected])
    cut = _last_whitespace_run_start(prefix)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _assistant_turn_at(chosen: Messages, rejected: Messages, index: int) -> bool:
    return all(index < len(side) and side[index]["role"] == "assistant" for side in (chosen, rejected))


def _last_whitespace_run_start(text: str) -> int:
    end = len(text)
    while end > 0 and not text[end - 1].isspace():
        end -= 1
    if end == 0:
        return len(text)  # no whitespace at all
    start = end - 1
    while start > 0 and text[start - 1].isspace():
        start -= 1
    return start if start > 0 else len(text)


# ----------------------------------------------------------------------------- preference


def normalize_preference(rows: Rows) -> list[dict[str, Any]]:
    """Checked preference rows: {prompt, chosen, rejected, [margin], __source__, __row__}.

    prompt/chosen/rejected are all strings or all conversations (chosen/rejected = the completion
    turns only). Without a `prompt` column the prompt is implicit (`split_implicit_prompt`).
    """
    records, present = _records(rows)
    require_columns(present, ["chosen", "rejected"], "preference", records, "{good: chosen, bad: rejected}")
    has_prompt, has_margin = "prompt" in present, "margin" in present
    normalized = [
        _preference_row(_with_origin(record, index), has_prompt, has_margin)
        for index, record in enumerate(records)
    ]
    _check_prompts(normalized, has_prompt)
    return normalized


def _check_prompts(rows: list[dict[str, Any]], has_prompt: bool) -> None:
    """Rows whose prompt is empty (an empty `prompt`, or no `prompt` column and chosen/rejected sharing no
    beginning) train on an empty prompt: said with the count, refused when every row is one."""
    empty = [row for row in rows if _is_empty(row["prompt"])]
    if not empty:
        return
    why = (
        "their prompt is empty" if has_prompt
        else "there is no 'prompt' column and their chosen and rejected share no beginning (implicit prompt)"
    )  # fmt: skip
    message = (
        f"{_sources(rows)}: {len(empty)} of {len(rows)} preference rows have no prompt ({why}), first at "
        f"{where(empty[0])}; they train on an empty prompt"
    )
    if len(empty) == len(rows):
        raise DataError(
            f"{message}, which is every row. Add a 'prompt' column (data.columns can rename yours), or give "
            "chosen and rejected the prompt they answer as a shared beginning."
        )
    logger.warning("%s.", message)


def _preference_row(record: dict[str, Any], has_prompt: bool, has_margin: bool) -> dict[str, Any]:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if has_prompt:
        prompt = _text(record, "prompt")
    else:
        if isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(
                f"{where(record)}: chosen and rejected must both be strings or both message lists "
                "to find their shared prompt."
            )
        _require_different(record, chosen, rejected)
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    if any(is_conversation(value) for value in (prompt, chosen, rejected)):
        prompt = _as_prompt_messages(prompt)
        chosen, rejected = _as_completion_messages(chosen), _as_completion_messages(rejected)
    _require_completion(record, "chosen", chosen)
    _require_completion(record, "rejected", rejected)
    _require_different(record, chosen, rejected)
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if has_margin:
        row["margin"] = _margin(record)
    row[SOURCE_COLUMN], row[ROW_COLUMN] = record[SOURCE_COLUMN], record[ROW_COLUMN]
    return row


def _require_different(record: dict[str, Any], chosen: Text, rejected: Text) -> None:
    if chosen == rejected:
        raise DataError(
            f"{where(record, 'rejected')}: chosen and rejected are identical, so the pair says nothing "
            "about preference; drop the row or fix the data."
        )


# ----------------------------------------------------------------------------- SFT


def normalize_sft(rows: Rows) -> list[dict[str, Any]]:
    """Checked SFT rows: {prompt, completion, __source__, __row__}.

    From `prompt` + `completion` columns, or from a `messages` column holding a whole conversation
    (prompt = every message but the last, which must be an assistant turn).
    """
    records, present = _records(rows)
    if "messages" in present and not ("prompt" in present and "completion" in present):
        return [_sft_from_messages(_with_origin(record, index)) for index, record in enumerate(records)]
    require_columns(
        present, ["prompt", "completion"], "SFT", records, "{question: prompt, answer: completion}"
    )
    return [_sft_row(_with_origin(record, index)) for index, record in enumerate(records)]


def _sft_row(record: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = _text(record, "prompt"), _text(record, "completion")
    if is_conversation(prompt) or is_conversation(completion):
        prompt, completion = _as_prompt_messages(prompt), _as_completion_messages(completion)
    _require_completion(record, "completion", completion)
    return {
        "prompt": prompt,
        "completion": completion,
        SOURCE_COLUMN: record[SOURCE_COLUMN],
        ROW_COLUMN: record[ROW_COLUMN],
    }


def _sft_from_messages(record: dict[str, Any]) -> dict[str, Any]:
    messages = _text(record, "messages")
    if not isinstance(messages, list) or not messages or messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where(record, 'messages')}: expected a conversation that ends with an assistant turn "
            "(the completion to learn)."
        )
    _require_completion(record, "messages", messages[-1:])
    return {
        "prompt": messages[:-1],
        "completion": messages[-1:],
        SOURCE_COLUMN: record[SOURCE_COLUMN],
        ROW_COLUMN: record[ROW_COLUMN],
    }


# ----------------------------------------------------------------------------- prompt-only


def normalize_prompts(rows: Rows) -> list[dict[str, Any]]:
    """Checked prompt-only rows: {prompt, <every other column as is>, __source__, __row__}.

    The extra columns (e.g. `answer`) are what reward functions receive by name.
    """
    records, present = _records(rows)
    require_columns(present, ["prompt"], "prompt-only", records, "{question: prompt}")
    normalized = []
    for index, record in enumerate(records):
        record = _with_origin(record, index)
        record["prompt"] = _text(record, "prompt")
        if _is_empty(record["prompt"]):
            raise DataError(f"{where(record, 'prompt')}: empty prompt; fill it in or drop the row.")
        normalized.append(record)
    return normalized
