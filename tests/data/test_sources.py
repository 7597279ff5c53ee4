"""Data sources: JSON Lines (plain and gzipped), JSON, Parquet, CSV, save_to_disk folders and hub names, with
each row's source and line kept, column mapping, clear errors; then train/eval splits of them."""

from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pa_parquet
import pytest

from prefalign.config import DataConfig
from prefalign.data.sources import load_rows, load_splits
from prefalign.errors import ConfigError, DataError
from tests.helpers import write_jsonl

PAIRS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "3+3=", "chosen": "6", "rejected": "7"},
]


def visible(dataset):
    return dataset.remove_columns(["__source__", "__row__"]).to_list()


def test_jsonl_keeps_source_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", PAIRS[:2], blank_line_after_first=True)
    rows = load_rows([path])
    assert visible(rows) == PAIRS[:2]
    assert rows["__source__"] == [path, path]
    assert rows["__row__"] == [1, 3]  # the blank line 2 is skipped, line numbers are not


def test_jsonl_gz(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps(row) for row in PAIRS))
    assert visible(load_rows([str(path)])) == PAIRS


@pytest.mark.parametrize(
    "content",
    [
        PAIRS,
        {"train": PAIRS},
        {"data": PAIRS},
        {name: [row[name] for row in PAIRS] for name in ("prompt", "chosen", "rejected")},
    ],
    ids=["list", "split-key", "data-key", "columns"],
)
def test_json_forms(tmp_path, content):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(content))
    assert visible(load_rows([str(path)])) == PAIRS


def test_json_written_by_datasets_to_json(tmp_path):
    path = tmp_path / "hf.json"
    datasets.Dataset.from_list(PAIRS).to_json(str(path))  # JSON Lines inside a .json file
    assert visible(load_rows([str(path)])) == PAIRS


def test_parquet_and_csv(tmp_path):
    parquet = tmp_path / "a.parquet"
    pa_parquet.write_table(pa.Table.from_pylist(PAIRS), parquet)
    csv = tmp_path / "a.csv"
    csv.write_text(
        "prompt,chosen,rejected\n" + "\n".join(f"{r['prompt']},{r['chosen']},{r['rejected']}" for r in PAIRS)
    )
    assert visible(load_rows([str(parquet)])) == PAIRS
    rows = load_rows([str(csv)], columns={})
    assert rows["prompt"] == [row["prompt"] for row in PAIRS]
    assert rows["__row__"] == [1, 2, 3]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS[:1]), "test": datasets.Dataset.from_list(PAIRS[1:])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert visible(load_rows([str(tmp_path / "single")])) == PAIRS
    assert visible(load_rows([str(tmp_path / "dict")], split="test")) == PAIRS[1:]
    with pytest.raises(DataError, match=r"no split 'validation'; it has train, test"):
        load_rows([str(tmp_path / "dict")], split="validation")


def test_several_sources_concatenate_and_remember_origin(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{**PAIRS[0], "margin": 1}])
    parquet = tmp_path / "b.parquet"
    pa_parquet.write_table(pa.Table.from_pylist([{**PAIRS[1], "margin": 0.5}]), parquet)
    rows = load_rows([jsonl, str(parquet)])
    assert rows["margin"] == [1.0, 0.5]  # int and float columns widen to float
    assert list(zip(rows["__source__"], rows["__row__"], strict=True)) == [(jsonl, 1), (str(parquet), 1)]


def test_sources_with_different_columns_are_an_error(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", PAIRS[:1])
    second = write_jsonl(tmp_path / "b.jsonl", [{"question": "x", "chosen": "y", "rejected": "z"}])
    with pytest.raises(
        DataError,
        match=r"different columns: .*a\.jsonl has prompt, chosen, rejected; .*b\.jsonl has question",
    ):
        load_rows([first, second])


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "good": "g", "bad": "b"}])
    rows = load_rows([path], columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert visible(rows) == [{"prompt": "q", "chosen": "g", "rejected": "b"}]
    with pytest.raises(
        DataError,
        match=r"a\.jsonl: data\.columns maps 'questoin' -> 'prompt', but there is no column 'questoin'; "
        r"columns present: question, good, bad",
    ):
        load_rows([path], columns={"questoin": "prompt"})


def test_missing_file_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found .*data\.path"):
        load_rows([str(tmp_path / "missing.jsonl")])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_rows([str(bad_json)])
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_rows([str(bad_parquet)])
    bad_gzip = tmp_path / "bad.jsonl.gz"
    bad_gzip.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: cannot be read \(BadGzipFile"):
        load_rows([str(bad_gzip)])
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: this folder was not written by datasets\.save_to_disk"):
        load_rows([str(tmp_path / "folder")])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type \.txt"):
        load_rows([str(text)])


def test_row_whose_type_differs_from_earlier_rows(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [PAIRS[0], PAIRS[1], {**PAIRS[2], "chosen": ["x"]}])
    with pytest.raises(
        DataError, match=r"a\.jsonl, line 3, column 'chosen': value \['x'\] does not have the same type"
    ):
        load_rows([path])


def test_hub_name_failure_says_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"'someone/prefs' is not an existing file or folder.*ConnectionError.*network access"
    ):
        load_rows(["someone/prefs"])


def test_hub_name_loads_with_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(["someone/prefs"], split="test")
    assert calls == [("someone/prefs", "test")]
    assert rows["__source__"][0] == "someone/prefs" and rows["__row__"] == [1, 2, 3]


# ----------------------------------------------------------------------------- splits


def numbered(count):
    return [{"prompt": f"q{index}", "chosen": "a", "rejected": "b"} for index in range(count)]


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered(20))
    config = DataConfig(path=[path], eval_fraction=0.25, seed=3)
    train, evaluation = load_splits(config)
    again_train, again_eval = load_splits(config)
    assert len(train) == 15 and len(evaluation) == 5
    assert evaluation["prompt"] == again_eval["prompt"] and train["prompt"] == again_train["prompt"]
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    _, other_seed_eval = load_splits(DataConfig(path=[path], eval_fraction=0.25, seed=4))
    assert other_seed_eval["prompt"] != evaluation["prompt"]


def test_eval_path_and_max_samples(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", numbered(10))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", numbered(6))
    config = DataConfig(path=[train_path], eval_path=[eval_path], max_samples=4, max_eval_samples=2, seed=1)
    train, evaluation = load_splits(config)
    assert len(train) == 4 and len(evaluation) == 2
    assert train["prompt"] == load_splits(config)[0]["prompt"]  # same seed, same subset
    assert train["prompt"] != [f"q{index}" for index in range(4)]  # shuffled before taking
    train_all, no_eval = load_splits(DataConfig(path=[train_path]))
    assert train_all["prompt"] == [f"q{index}" for index in range(10)] and no_eval is None


def test_in_memory_dataset_and_builtin(tmp_path):
    dataset = datasets.Dataset.from_list(
        [{"q": row["prompt"], "chosen": "a", "rejected": "b"} for row in PAIRS]
    )
    train, evaluation = load_splits(DataConfig(columns={"q": "prompt"}), dataset=dataset)
    assert train["prompt"] == ["1+1=", "2+2=", "3+3="] and evaluation is None
    assert train["__source__"] == ["dataset"] * 3
    with pytest.raises(DataError, match=r"'builtin' names the built-in task"):
        load_splits(DataConfig())


def test_split_config_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", numbered(2))
    with pytest.raises(ConfigError, match=r"eval_fraction"):
        load_splits(DataConfig(path=[path], eval_fraction=1.5))
    with pytest.raises(DataError, match=r"leaves no training rows"):
        load_splits(DataConfig(path=[path], eval_fraction=0.9))
    with pytest.raises(ConfigError, match=r"max_samples"):
        load_splits(DataConfig(path=[path], max_samples=0))


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.parquet", "empty.json"])
def test_an_empty_file_is_named_and_said_to_be_empty(tmp_path, name):
    (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=rf"{name}: the file is empty"):
        load_rows([str(tmp_path / name)])


def test_a_file_of_blank_lines_holds_no_rows(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "list.json").write_text("[]")
    for name in ("blank.jsonl", "list.json"):
        with pytest.raises(DataError, match=rf"{name}: the file is empty: it holds no rows"):
            load_rows([str(tmp_path / name)])
