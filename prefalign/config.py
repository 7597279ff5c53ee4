"""One config system: a dataclass per command, YAML files, dotted command-line overrides.

Every field has a type, a default and a help string (`option(...)`). Sections (`model`, `data`, `train`)
are nested dataclasses shared by the commands. A key is written in full (`train.learning_rate`) or by its
last part when that is unambiguous (`learning_rate`). Unknown keys and wrong types raise `ConfigError`
naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from prefalign.errors import ConfigError


def option(default: Any = None, help: str = "", *, factory: Any = None) -> Any:
    """A config field: its default (or a factory for lists/dicts) and the help text `--help` prints."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "builtin",
        "Hugging Face model folder or hub name; `builtin` = the tiny base model of the built-in "
        "task (built on first use).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Weights dtype; auto = float32 on CPU, bfloat16 on CUDA.",
    )
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = option(
        False, "Allow code shipped with the model to run. Off unless you trust the source.",
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    attn_implementation: str | None = option(
        None,
        "Attention kernel passed to transformers (sdpa, eager, flash_attention_2); "
        "None = transformers' choice.",
    )
    lora: bool = option(False, "Train LoRA adapters instead of all weights (through peft).")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA scaling alpha.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.")
    lora_target_modules: list[str] = option(
        help="Module names that get adapters; `all-linear` = every linear layer but the output head.",
        factory=lambda: ["all-linear"],
    )
    merge_lora: bool = option(False, "Also save a merged full model (final/merged) next to the adapter.")


@dataclass
class DataConfig:
    path: list[str] = option(
        help="Training data: JSONL/JSON/Parquet/CSV files, save_to_disk folders or hub names; several are "
             "concatenated. `builtin` = the built-in task.",
        factory=lambda: ["builtin"],
    )
    eval_path: list[str] = option(
        help="Held-out data in the same forms; empty = split from `path` with eval_fraction.", factory=list,
    )
    split: str = option("train", "Split to read from a hub dataset or a DatasetDict folder.")
    columns: dict[str, str] = option(
        help="Rename source columns to ours, e.g. {question: prompt, best: chosen}.", factory=dict,
    )
    eval_fraction: float = option(
        0.0, "Fraction of the training source held out for evaluation when eval_path is empty.",
    )
    max_samples: int | None = option(
        None, "Use at most this many training rows (after shuffling with the seed).",
    )
    max_eval_samples: int | None = option(None, "Use at most this many eval rows.")
    max_length: int = option(
        512, "Longest prompt+completion in tokens; completions are truncated to fit (counted and reported).",
    )
    max_prompt_length: int | None = option(
        None,
        "Longest prompt in tokens; longer prompts are cut from the left (counted). None = no separate limit.",
    )
    too_long_prompt: Literal["drop", "error"] = option(
        "drop", "A prompt that alone fills max_length: drop the row (counted) or stop with an error.",
    )
    seed: int = option(0, "Seed for shuffling before max_samples and for the eval split.")


@dataclass
class TrainConfig:
    output_dir: str = option("", "Run folder; empty = runs/<command>.")
    learning_rate: float = option(1e-5, "Peak learning rate of AdamW.")
    batch_size: int = option(8, "Examples per micro-batch.")
    grad_accum: int = option(
        1, "Micro-batches per optimizer step; the loss is normalised over the whole step.",
    )
    epochs: float = option(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = option(0, "Optimizer steps to run; 0 = derive from epochs.")
    warmup_ratio: float = option(0.0, "Fraction of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate decay after warmup.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak (cosine and linear).")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    fused_optimizer: bool = option(
        True,
        "torch's fused AdamW kernel where the parameters allow it: several times faster on CPU, numerically "
        "a little different from the per-tensor loop.",
    )
    max_grad_norm: float = option(
        1.0, "Clip the global gradient norm to this (0 = no clipping); the pre-clip norm is logged.",
    )
    seed: int = option(42, "Seed for initialisation, shuffling and sampling.")
    eval_every: int = option(0, "Evaluate every N optimizer steps (0 = only at the end).")
    save_every: int = option(0, "Checkpoint every N optimizer steps (0 = no intermediate checkpoints).")
    keep_checkpoints: int = option(2, "Keep this many most recent checkpoints.")
    log_every: int = option(1, "Write metrics every N optimizer steps.")
    resume: bool = option(False, "Continue from the newest checkpoint in the run folder.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).")
    report_to: list[str] = option(
        help="Extra trackers through accelerate (tensorboard, wandb, ...).", factory=list,
    )
    progress: bool = option(True, "Show a progress bar with ETA.")
    overwrite: bool = option(False, "Allow writing into a run folder that already holds a finished run.")


# ----------------------------------------------------------------------------- (de)serialisation


def is_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _leaf_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Full dotted key -> resolved type, for every leaf field of a config class."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(_leaf_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def _resolve_key(cls: type, key: str) -> str:
    key = key.replace("-", "_")
    keys = _leaf_keys(cls)
    if key in keys:
        return key
    by_leaf = [full for full in keys if full.rsplit(".", 1)[-1] == key]
    if len(by_leaf) == 1:
        return by_leaf[0]
    if len(by_leaf) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: write one of {', '.join(by_leaf)}")
    candidates = list(keys) + [full.rsplit(".", 1)[-1] for full in keys]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} for {cls.__name__}{hint} (`--help` lists every key)")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def coerce(key: str, value: Any, hint: Any, *, from_string: bool = False) -> Any:
    """Check (and gently convert) `value` against the field type `hint`, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (from_string and str(value).lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg, from_string=from_string)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: invalid value {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}{hint_text}")
    if origin in (list, tuple):
        if from_string and isinstance(value, str):
            parsed = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
            value = parsed
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [coerce(key, item, args[0] if args else Any, from_string=from_string) for item in value]
    if origin is dict:
        if from_string and isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping like {{a: b}}, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported type {_type_name(hint)}")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and not key.endswith("columns"):
            # Nested sections; a dict-typed leaf (columns) stays a value.
            nested = _flatten(value, f"{prefix}{key}.")
            flat.update(nested if nested else {f"{prefix}{key}": value})
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set(config: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


def apply_overrides(config: Any, overrides: dict[str, Any], *, from_string: bool = False) -> Any:
    """Set dotted keys on a config instance (in place) with type checking; returns it."""
    cls = type(config)
    keys = _leaf_keys(cls)
    for key, value in _flatten(overrides).items():
        full = _resolve_key(cls, key)
        _set(config, full, coerce(full, value, keys[full], from_string=from_string))
    return config


def load_config(
    cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
    from_string: bool = False,
) -> Any:
    """Build a config: defaults, then a YAML file, then overrides (later wins)."""
    config = cls()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as error:
            raise ConfigError(f"config file {str(path)!r} does not exist") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        apply_overrides(config, data)
    if overrides:
        apply_overrides(config, overrides, from_string=from_string)
    return config


def help_text(cls: type) -> str:
    """Every option: dotted key, type, default and help."""
    lines = []

    def walk(section_cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            hint = hints[f.name]
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(hint):
                walk(hint, value, f"{prefix}{f.name}.")
                continue
            type_text = _type_name(hint)
            lines.append(
                f"  --{prefix}{f.name} ({type_text}, default {value!r})\n      {f.metadata.get('help', '')}"
            )

    walk(cls, cls(), "")
    return "\n".join(lines)
