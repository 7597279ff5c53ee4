"""The data layer: loading sources, checking formats, tokenizing with chat templates, collating batches.

rows_train, rows_eval = load_splits(config.data, dataset=builtin_or_None)
train, stats = tokenize_preference(rows_train, tokenizer, config.data)   # log stats.summary()
batch = collate_preference([train[i] for i in range(8)], tokenizer.pad_token_id)
"""

from prefalign.data.collate import collate_preference, collate_prompts, collate_sft, pad_sequences
from prefalign.data.formats import (
    ROLES,
    is_conversation,
    normalize_preference,
    normalize_prompts,
    normalize_sft,
    split_implicit_prompt,
)
from prefalign.data.sources import (
    HIDDEN_COLUMNS,
    ROW_COLUMN,
    SOURCE_COLUMN,
    apply_column_mapping,
    load_rows,
    load_source,
    load_splits,
    row_location,
    with_row_origin,
)
from prefalign.data.tokenize import Render, TokenizeStats, tokenize_preference, tokenize_prompts, tokenize_sft

__all__ = [
    "HIDDEN_COLUMNS",
    "ROLES",
    "ROW_COLUMN",
    "SOURCE_COLUMN",
    "Render",
    "TokenizeStats",
    "apply_column_mapping",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "is_conversation",
    "load_rows",
    "load_source",
    "load_splits",
    "normalize_preference",
    "normalize_prompts",
    "normalize_sft",
    "pad_sequences",
    "row_location",
    "split_implicit_prompt",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
    "with_row_origin",
]
