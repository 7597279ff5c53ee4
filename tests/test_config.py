"""The config system: YAML + overrides, type checks, suggestions, help for every key."""

from __future__ import annotations

import dataclasses

import pytest

from prefalign.algorithms.sft import SFTConfig
from prefalign.config import help_text, load_config
from prefalign.errors import ConfigError


def test_yaml_then_overrides_later_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  batch_size: 4\nmodel:\n  lora: true\n")
    config = load_config(SFTConfig, path, {"train.batch_size": "16", "lora_r": "4"}, from_string=True)
    assert config.train.learning_rate == 0.001
    assert config.train.batch_size == 16
    assert config.model.lora is True and config.model.lora_r == 4


def test_unknown_key_suggests_closest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.learnin_rate'.*did you mean 'train.learning_rate'"
    ):
        load_config(SFTConfig, overrides={"train.learnin_rate": "1"}, from_string=True)


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"'train.bach_size'.*did you mean 'train.batch_size'"):
        load_config(SFTConfig, path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.batch_size", "eight", r"'train.batch_size' must be an integer, got 'eight'"),
        ("train.learning_rate", "fast", r"'train.learning_rate' must be a number"),
        ("model.lora", "maybe", r"'model.lora' must be true or false"),
        ("model.dtype", "float33", r"'model.dtype' must be one of .*did you mean 'float32'"),
    ],
)
def test_wrong_type_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, overrides={key: value}, from_string=True)


def test_yaml_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match="'train.batch_size' must be an integer"):
        load_config(SFTConfig, path)


def test_lists_and_mappings_from_the_command_line():
    config = load_config(
        SFTConfig,
        overrides={"data.path": "a.jsonl,b.parquet", "data.columns": "{question: prompt}"},
        from_string=True,
    )
    assert config.data.path == ["a.jsonl", "b.parquet"]
    assert config.data.columns == {"question": "prompt"}


def test_every_field_has_help_and_help_lists_them():
    text = help_text(SFTConfig)
    for section in dataclasses.fields(SFTConfig):
        for field in dataclasses.fields(getattr(SFTConfig(), section.name)):
            assert field.metadata.get("help"), f"{section.name}.{field.name} has no help"
            assert f"--{section.name}.{field.name} " in text
