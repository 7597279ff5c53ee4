"""The config system: YAML + overrides, type checks, suggestions, help for every key, ranges and validate."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass

import pytest

from prefalign.algorithms.dpo import DPOConfig
from prefalign.algorithms.grpo_config import GRPOConfig
from prefalign.algorithms.sft import SFTConfig
from prefalign.config import help_text, load_config, save_config, to_dict, validate
from prefalign.errors import ConfigError
from prefalign.options import Range, check_device, check_model_location, option


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


# ----------------------------------------------------------------------------- ranges, help, validate


def test_range_text_and_problems():
    assert Range(low=1).text(integer=True) == "at least 1"
    assert Range(low=0).text() == ">= 0"
    assert Range(above=0).text() == "> 0"
    assert Range(low=0, below=1).text() == "in [0, 1)"
    assert Range(above=0, high=1).text() == "in (0, 1]"
    assert Range(low=1, zero="auto").text(integer=True) == "at least 1 (or 0 = auto)"
    assert Range(low=1).problem(0) == "must be at least 1"
    assert Range(low=1).problem(1) is None
    assert Range(above=0).problem(0.0) == "must be > 0"
    assert Range(low=1, zero="auto").problem(0) is None
    assert Range(low=0, below=1).problem(1.0) == "must be in [0, 1)"
    assert Range().problem(math.nan) == "must be a number (not NaN)"
    assert Range(above=0).problem(math.nan) == "must be > 0"
    assert Range(allow_nan=True).problem(math.nan) is None
    assert Range().problem(math.inf) == "must be finite"
    assert Range(allow_inf=True).problem(-math.inf) is None


def test_help_shows_each_range_and_check():
    text = help_text(SFTConfig)
    for line in (
        "--train.learning_rate (float, > 0, default 2e-05)",
        "--train.log_every (int, at least 1, default 1)",
        "--train.adam_beta1 (float, in [0, 1), default 0.9)",
        "--train.warmup_ratio (float, in [0, 1], default 0.0)",
        "--data.max_samples (int | None, at least 1, default None)",
        "--model.device (str, auto, cpu, cuda[:N] or mps, default 'auto')",
        "--model.dtype (Literal['auto', 'float32', 'bfloat16', 'float16'], default 'auto')",
        "--data.columns (dict[str, str], default {})",
    ):
        assert line in text, line
    grpo_help = help_text(GRPOConfig)
    assert "--max_new_tokens (int, at least 1 (or 0 = fit the model's context), default 0)" in grpo_help
    assert "--top_p (float, in (0, 1], default 1.0)" in grpo_help


@dataclass
class _Section:
    rate: float = option(0.5, "A rate.", low=0, high=1)
    score: float = option(0.0, "May be NaN.", allow_nan=True)
    weights: list[float] = option(help="Weights.", factory=list)
    steps: int | None = option(None, "Optional.", low=1)
    folder: str = option("", "A path.")

    def check(self, prefix: str = "") -> None:
        if self.steps == 13:
            raise ConfigError(f"{prefix}steps must not be 13")


@dataclass
class _Config:
    section: _Section = option(help="A section.", factory=_Section)
    count: int = option(1, "A count.", low=1)


def test_validate_checks_every_field_and_reports_them_together():
    config = _Config(section=_Section(rate=2.0, weights=[1.0, math.nan]), count=0)
    with pytest.raises(ConfigError) as caught:
        validate(config)
    message = str(caught.value)
    assert message.startswith("3 config values are not valid")
    assert "section.rate must be in [0, 1], got 2.0 (A rate.)" in message
    assert "section.weights must be a number (not NaN), got nan" in message
    assert "count must be at least 1, got 0" in message


def test_validate_allows_what_the_field_allows_and_normalises_types(tmp_path):
    config = _Config(section=_Section(rate=1, score=math.nan, folder=tmp_path, weights=(1, 2)))
    assert validate(config) is config
    assert config.section.rate == 1.0 and isinstance(config.section.rate, float)
    assert config.section.folder == str(tmp_path) and config.section.weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"'section.rate' must be a number, got 'fast'"):
        validate(_Config(section=_Section(rate="fast")))


def test_validate_runs_each_sections_check_with_its_prefix():
    with pytest.raises(ConfigError, match=r"^section.steps must not be 13$"):
        validate(_Config(section=_Section(steps=13)))
    # Ranges come first: a range problem is reported before any cross-field rule runs.
    with pytest.raises(ConfigError, match=r"count must be at least 1"):
        validate(_Config(section=_Section(steps=13), count=0))


def test_every_command_config_is_valid_as_it_comes(tmp_path):
    from prefalign.cli import COMMANDS
    from prefalign.recipes.iterative_dpo import IterativeDPOConfig

    classes = [command.load()[1] for command in COMMANDS.values()] + [IterativeDPOConfig, DPOConfig]
    for cls in classes:
        config = cls()
        if cls.__name__ == "EvalRewardConfig":
            config.model = str(tmp_path)  # its default is the folder `prefalign reward` writes
        validate(config)


# A numeric field without a range is a decision, listed here: each of these may be any finite number.
UNBOUNDED = {
    "reward_weights", "reward_model_weight", "loss_weights", "simpo_gamma", "success_threshold",
    "min_best_score",
}


def test_every_numeric_field_declares_its_range():
    from prefalign.cli import COMMANDS

    def numeric(hint) -> bool:
        return bool({int, float} & {hint, *typing.get_args(hint)}) or any(
            numeric(arg) for arg in typing.get_args(hint)
        )

    missing = set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif numeric(hints[f.name]) and not f.metadata["range"].bounded() and f.name not in UNBOUNDED:
                missing.add(f"{cls.__name__}.{f.name}")

    for command in COMMANDS.values():
        walk(command.load()[1], "")
    assert not missing, f"numeric fields without a range: {sorted(missing)}"


@pytest.mark.parametrize(
    ("key", "value", "form"),
    [
        ("data.columns", "{a: b", "must be a mapping like {a: b, c: d}; could not read '{a: b'"),
        ("data.path", "[a.jsonl, b", "must be a list like [a, b] or a,b; could not read"),
        ("data.columns", "[a]", "must be a mapping like {a: b, c: d}, got ['a']"),
        ("data.columns", "{a: [b]}", "'data.columns.a' must be a string"),
    ],
)
def test_unreadable_lists_and_mappings_name_the_key_and_the_form(key, value, form):
    with pytest.raises(ConfigError, match=re.escape(form)) as caught:
        load_config(SFTConfig, overrides={key: value}, from_string=True)
    assert key in str(caught.value)


def test_device_names(monkeypatch):
    import torch

    assert check_device("auto") is None and check_device("cpu") is None
    assert "is not a device name" in check_device("tpu9")
    assert "does not run on (meta)" in check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in check_device("cuda")
    assert "torch.cuda.is_available() is False" in check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") is None
    assert "cuda:0 to cuda:1" in check_device("cuda:2")
    config = SFTConfig()
    config.model.device = "tpu9"
    with pytest.raises(ConfigError, match=r"model.device 'tpu9' is not a device name"):
        validate(config)


def test_model_locations(tmp_path):
    assert check_model_location("builtin") is None
    assert check_model_location(str(tmp_path)) is None
    assert check_model_location("Qwen/Qwen2.5-0.5B") is None  # a hub name: loading decides
    assert "does not exist" in check_model_location(str(tmp_path / "missing"))
    assert "does not exist" in check_model_location("runs/reward/final-that-is-not-there")


def test_unreadable_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(SFTConfig, tmp_path)  # a folder, not a file


def shaped_reward(prompts, completions, **_):
    return [0.0] * len(completions)


def test_a_callable_reward_function_is_saved_as_its_qualified_name(tmp_path):
    config = GRPOConfig(reward_functions=["exact_match", shaped_reward])
    save_config(config, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "tests.test_config:shaped_reward" in saved
    assert to_dict(config)["reward_functions"] == ["exact_match", "tests.test_config:shaped_reward"]
    assert load_config(GRPOConfig, tmp_path / "config.yaml").reward_functions[1] == (
        "tests.test_config:shaped_reward"
    )  # and it imports back: module:function
