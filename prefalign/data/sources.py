"""Reading rows from files, saved datasets and the hub into one `datasets.Dataset`.

Every row remembers where it came from in two hidden columns, `__source__` (the path or name as the
user wrote it) and `__row__` (the 1-based line for JSON Lines, the 1-based record number otherwise),
so that a validation error deep in tokenization can still say "data.jsonl, line 17". The tokenizers
drop these columns from their output.

We parse JSON Lines / JSON / CSV / Parquet ourselves (json + pyarrow) instead of going through
`datasets.load_dataset("json", ...)`: it is faster for small files, writes nothing to the HF cache,
and lets a malformed line or a row whose type differs from the others be reported by line number.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
from datasets.table import InMemoryTable

from prefalign.config import DataConfig
from prefalign.errors import ConfigError, DataError

SOURCE_COLUMN = "__source__"
ROW_COLUMN = "__row__"
HIDDEN_COLUMNS = (SOURCE_COLUMN, ROW_COLUMN)

JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
DATA_SUFFIXES = JSON_LINES_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES
SUPPORTED_TEXT = (
    "JSON Lines (.jsonl, .jsonl.gz), JSON (.json), Parquet (.parquet), CSV (.csv) or a "
    "datasets.save_to_disk folder"
)


# ----------------------------------------------------------------------------- locations


def row_location(source: str, row: int) -> str:
    """'data.jsonl, line 3' for JSON Lines (the line a user opens in an editor), else 'data.csv, row 3'."""
    unit = "line" if str(source).endswith(JSON_LINES_SUFFIXES) else "row"
    return f"{source}, {unit} {row}"


def with_row_origin(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Add the hidden origin columns to a dataset that lacks them (in-memory or hub data)."""
    if SOURCE_COLUMN in dataset.column_names and ROW_COLUMN in dataset.column_names:
        return dataset
    dataset = dataset.add_column(SOURCE_COLUMN, [source] * len(dataset))
    return dataset.add_column(ROW_COLUMN, list(range(1, len(dataset) + 1)))


def visible_columns(dataset: datasets.Dataset) -> list[str]:
    return [name for name in dataset.column_names if name not in HIDDEN_COLUMNS]


# ----------------------------------------------------------------------------- records -> table


def _records_to_dataset(records: list[dict[str, Any]], rows: list[int], source: str) -> datasets.Dataset:
    """Build a dataset from parsed JSON records; a column whose type changes between rows is a DataError."""
    names = list(dict.fromkeys(name for record in records for name in record))
    arrays = {}
    for name in names:
        values = [record.get(name) for record in records]
        arrays[name] = _column_array(values, name, rows, source)
    arrays[SOURCE_COLUMN] = pa.array([source] * len(records), type=pa.string())
    arrays[ROW_COLUMN] = pa.array(rows, type=pa.int64())
    return datasets.Dataset(InMemoryTable(pa.table(arrays)))


def _column_array(values: list[Any], name: str, rows: list[int], source: str) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        # Arrow needs one type per column. Find the first row that cannot join the rows before it:
        # a prefix that fails stays failing when it grows, so a binary search finds it.
        low, high = 1, len(values)
        while low < high:
            middle = (low + high) // 2
            try:
                pa.array(values[:middle])
                low = middle + 1
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                high = middle
        bad = low - 1
        raise DataError(
            f"{row_location(source, rows[bad])}, column {name!r}: value {_short(values[bad])} does not have "
            f"the same type as in the rows before it ({error}). Every row must use one form per column "
            "(for example all strings, or all lists of {role, content} messages)."
        ) from error


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- readers per format


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json_lines(path: str, source: str) -> datasets.Dataset:
    records, rows = [], []
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{source}, line {line_number}: not valid JSON ({error.msg} at column {error.colno}). "
                    "A JSON Lines file holds one JSON object per line."
                ) from error
            if not isinstance(record, dict):
                raise DataError(
                    f'{source}, line {line_number}: expected a JSON object like {{"prompt": ...}}, '
                    f"got {type(record).__name__}."
                )
            records.append(record)
            rows.append(line_number)
    return _records_to_dataset(records, rows, source)


def _read_json(path: str, source: str, split: str) -> datasets.Dataset:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            # `Dataset.to_json` writes JSON Lines even into a .json file.
            return _read_json_lines_text(text, source)
        raise DataError(
            f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
        ) from error
    records = _json_records(content, source, split)
    return _records_to_dataset(records, list(range(1, len(records) + 1)), source)


def _read_json_lines_text(text: str, source: str) -> datasets.Dataset:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{source}, line {line_number}: not valid JSON ({error.msg}).") from error
    if not all(isinstance(record, dict) for record in records):
        raise DataError(f'{source}: every line must be a JSON object like {{"prompt": ...}}.')
    return _records_to_dataset(records, list(range(1, len(records) + 1)), source)


def _json_records(content: Any, source: str, split: str) -> list[dict[str, Any]]:
    """Accept a list of objects, {split|data: [objects]}, or a column mapping {column: [values]}."""
    if isinstance(content, list) and all(isinstance(item, dict) for item in content):
        return content
    if isinstance(content, dict):
        for key in (split, "data", "rows"):
            value = content.get(key)
            if isinstance(value, list) and all(isinstance(item, dict) for item in value):
                return value
        lengths = {len(value) for value in content.values() if isinstance(value, list)}
        if content and len(lengths) == 1 and all(isinstance(value, list) for value in content.values()):
            length = lengths.pop()
            return [{name: values[index] for name, values in content.items()} for index in range(length)]
    raise DataError(
        f'{source}: expected a JSON list of objects ([{{"prompt": ...}}, ...]), an object holding one '
        f"under {split!r} or 'data', or columns {{\"prompt\": [...], ...}}; got {type(content).__name__}."
    )


def _read_csv(path: str, source: str) -> datasets.Dataset:
    try:
        table = pa_csv.read_csv(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"{source}: not a readable CSV file ({error}).") from error
    return _table_to_dataset(table, source)


def _read_parquet(path: str, source: str) -> datasets.Dataset:
    try:
        table = pa_parquet.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{source}: not a readable Parquet file ({error}).") from error
    return _table_to_dataset(table, source)


def _table_to_dataset(table: pa.Table, source: str) -> datasets.Dataset:
    table = table.append_column(SOURCE_COLUMN, pa.array([source] * table.num_rows, type=pa.string()))
    table = table.append_column(ROW_COLUMN, pa.array(np.arange(1, table.num_rows + 1), type=pa.int64()))
    return datasets.Dataset(InMemoryTable(table))


def _read_saved_folder(path: str, source: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # any failure here means "not a usable saved dataset"
        raise DataError(f"{source}: could not read this datasets.save_to_disk folder ({error}).") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{source}: this saved DatasetDict has no split {split!r}; it has {', '.join(loaded)}. "
                "Set data.split to one of them."
            )
        loaded = loaded[split]
    return with_row_origin(loaded, source)


def _read_hub(name: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, auth and "not found" all end up here
        raise DataError(
            f"{name!r} is not an existing file or folder, and loading it as a Hugging Face hub dataset "
            f"(split {split!r}) failed: {type(error).__name__}: {error}. If you meant a local file, check "
            "the path; hub datasets need network access (they cannot be downloaded offline, e.g. with "
            "HF_HUB_OFFLINE=1) unless they are already in the local cache."
        ) from error
    return with_row_origin(loaded, name)


# ----------------------------------------------------------------------------- one source


def _looks_like_path(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES) or name.startswith(("/", "./", "../", "~"))


def _expand(paths: Iterable[str]) -> list[str]:
    """Expand ~ and glob patterns; a pattern matching nothing is an error, not an empty dataset."""
    expanded = []
    for path in paths:
        path = os.path.expanduser(str(path))
        if any(character in path for character in "*?["):
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError(f"data pattern {path!r} matches no file. Check the folder and the pattern.")
            expanded.extend(matches)
        else:
            expanded.append(path)
    return expanded


def load_source(path: str, *, split: str = "train") -> datasets.Dataset:
    """Read one source (file, saved folder or hub name) with its origin columns."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")):
            return _read_saved_folder(path, path, split)
        files = sorted(name for name in os.listdir(path) if name.endswith(DATA_SUFFIXES))
        hint = (
            f" It holds {', '.join(files[:5])}: pass those files (or a pattern like {path}/*.jsonl)."
            if files
            else ""
        )
        raise DataError(f"{path}: this folder was not written by datasets.save_to_disk.{hint}")
    if not os.path.exists(path):
        if _looks_like_path(path):
            raise DataError(
                f"{path}: file not found (working folder {os.getcwd()}). Check the path in "
                "data.path / data.eval_path."
            )
        return _read_hub(path, split)
    if os.path.getsize(path) == 0:
        raise DataError(
            f"{path}: the file is empty (0 bytes); it holds no rows. Check data.path / data.eval_path."
        )
    try:
        return _read_file(path, split)
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DataError(
            f"{path}: cannot be read ({type(error).__name__}: {error}). Check that it is a {SUPPORTED_TEXT} "
            "file, readable by you and not truncated."
        ) from error


def _read_file(path: str, split: str) -> datasets.Dataset:
    if path.endswith(JSON_LINES_SUFFIXES):
        return _read_json_lines(path, path)
    if path.endswith(JSON_SUFFIXES):
        return _read_json(path, path, split)
    if path.endswith(CSV_SUFFIXES):
        return _read_csv(path, path)
    if path.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path, path)
    raise DataError(
        f"{path}: unsupported file type {Path(path).suffix or '(no suffix)'}; use {SUPPORTED_TEXT}."
    )


# ----------------------------------------------------------------------------- column mapping, concatenation


def apply_column_mapping(
    dataset: datasets.Dataset, columns: dict[str, str] | None, source: str
) -> datasets.Dataset:
    """Rename source columns to ours ({their_name: our_name}); a name found nowhere is a likely typo."""
    if not columns:
        return dataset
    present = set(dataset.column_names)
    renames = {}
    for their_name, our_name in columns.items():
        if their_name == our_name:
            continue
        if their_name not in present:
            if our_name in present:
                continue  # this source already uses our name; the mapping is for the other sources
            raise DataError(
                f"{source}: data.columns maps {their_name!r} -> {our_name!r}, but there is no column "
                f"{their_name!r}; columns present: {', '.join(visible_columns(dataset))}."
            )
        if our_name in present and our_name not in columns:
            raise DataError(
                f"{source}: data.columns renames {their_name!r} to {our_name!r}, but a column {our_name!r} "
                f"already exists. Map it away too (e.g. {our_name}: old_{our_name}) or drop one of them."
            )
        renames[their_name] = our_name
    return dataset.rename_columns(renames) if renames else dataset


def _concatenate(parts: list[datasets.Dataset], names: list[str]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    reference = parts[0].column_names
    for part, name in zip(parts[1:], names[1:], strict=True):
        if set(part.column_names) != set(reference):
            raise DataError(
                f"data sources have different columns: {names[0]} has "
                f"{', '.join(visible_columns(parts[0]))}; {name} has {', '.join(visible_columns(part))}. "
                "Give every source the same columns (data.columns can rename them)."
            )
    parts = [part.select_columns(reference) for part in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:
        pass
    # Types differ (int vs float margins, a column null in one file): let Arrow widen them.
    try:
        table = pa.concat_tables([part.data.table for part in parts], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        described = "; ".join(f"{name}: {part.features}" for part, name in zip(parts, names, strict=True))
        raise DataError(f"data sources have incompatible column types ({error}). {described}") from error
    return datasets.Dataset(InMemoryTable(table))


def load_rows(
    paths: Sequence[str], *, split: str = "train", columns: dict[str, str] | None = None
) -> datasets.Dataset:
    """Read and concatenate sources: JSON Lines, JSON, Parquet, CSV, save_to_disk folders or hub names.

    Returns one dataset with the (renamed) source columns plus the hidden origin columns
    `__source__` (str) and `__row__` (int, 1-based).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    expanded = _expand(paths)
    if not expanded:
        raise DataError("no data source given; set data.path to one or more files, folders or hub names.")
    parts = [apply_column_mapping(load_source(path, split=split), columns, path) for path in expanded]
    for part, path in zip(parts, expanded, strict=True):
        if len(part) == 0:
            kind = "file" if os.path.isfile(path) else "source"
            raise DataError(
                f"{path}: the {kind} is empty: it holds no rows. Check data.path / data.eval_path."
            )
    return _concatenate(parts, expanded)


# ----------------------------------------------------------------------------- train / eval splits


def _take(dataset: datasets.Dataset, limit: int | None, seed: int, key: str) -> datasets.Dataset:
    """Shuffle with the seed, then keep the first `limit` rows (a random but reproducible subset)."""
    if limit is None:
        return dataset
    if limit < 1:
        raise ConfigError(f"config key {key!r} must be at least 1 (or null for all rows), got {limit}")
    return dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))


def _split_off(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"config key 'data.eval_fraction' must be between 0 and 1 (exclusive), got {fraction}"
        )
    eval_size = max(1, round(fraction * len(dataset)))
    if eval_size >= len(dataset):
        raise DataError(
            f"data.eval_fraction={fraction} of {len(dataset)} rows leaves no training rows; "
            "use a smaller fraction, more data, or data.eval_path."
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    eval_indices = np.sort(order[:eval_size])
    train_indices = np.sort(order[eval_size:])
    return dataset.select(train_indices), dataset.select(eval_indices)


def load_splits(
    config: DataConfig, *, dataset: datasets.Dataset | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Training rows and evaluation rows (or None) as `config` describes.

    `dataset` (in memory, e.g. the built-in task) replaces `config.path`. Evaluation rows come from
    `config.eval_path`, else from a seeded `eval_fraction` split of the training rows, else none.
    The split happens before `max_samples`, so changing max_samples never moves rows into eval.
    """
    if dataset is not None:
        train = with_row_origin(apply_column_mapping(dataset, config.columns, "dataset"), "dataset")
    else:
        if "builtin" in config.path:
            raise DataError(
                "data.path 'builtin' names the built-in task, whose rows "
                "prefalign.commands.builtin.builtin_rows loads (the CLI and the functions `from prefalign "
                "import ...` do this); pass dataset=... here, or set data.path to your files."
            )
        train = load_rows(config.path, split=config.split, columns=config.columns)
    evaluation = None
    if config.eval_path:
        evaluation = load_rows(config.eval_path, split=config.split, columns=config.columns)
    elif config.eval_fraction:
        train, evaluation = _split_off(train, config.eval_fraction, config.seed)
    train = _take(train, config.max_samples, config.seed, "data.max_samples")
    if evaluation is not None:
        evaluation = _take(evaluation, config.max_eval_samples, config.seed, "data.max_eval_samples")
    return train, evaluation
