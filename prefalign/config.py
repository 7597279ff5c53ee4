"""One config system: a dataclass per command, YAML files, dotted command-line overrides.

Every field has a type, a default, a help string and, where it has one, its valid range (`option(...)`:
`low`/`high` inclusive, `above`/`below` exclusive, `check` for values a range cannot say, such as device
names); `--help` shows the range. Sections (`model`, `data`, `train`) are nested dataclasses shared by the
commands. A key is written in full (`train.learning_rate`) or by its last part when that is unambiguous
(`learning_rate`). Unknown keys and wrong types raise `ConfigError` naming the key and suggesting the closest
valid one.

`validate(config)` checks a whole config before any model or data is loaded: the type and range of every
field of every section (NaN and infinity are refused for floats unless the field allows them), then the
cross-field rules, which each config class declares as a method `check(self, prefix)` (`prefix` is where the
section sits, "train." or "", so messages name full keys). The commands layer calls it first for every
command; the algorithm functions call it too, for direct users.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from prefalign.errors import ConfigError
from prefalign.options import (
    check_device,
    coerce,
    describe_values,
    field_problem,
    option,
    type_name,
)

# A `check`: value -> why it is wrong (None when it is fine); its `__doc__` first line is shown by --help.












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
    device: str = option(
        "auto", "Where the model runs; auto = cuda when it is available, else cpu.", check=check_device,
    )
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
    lora_r: int = option(8, "LoRA rank.", low=1)
    lora_alpha: int = option(16, "LoRA scaling alpha.", low=1)
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.", low=0, below=1)
    lora_target_modules: list[str] = option(
        help="Module names that get adapters; `all-linear` = every linear layer but the output head.",
        factory=lambda: ["all-linear"],
    )
    merge_lora: bool = option(
        False, "Also save a merged full model (final/merged) next to the adapter (needs model.lora).",
    )

    def check(self, prefix: str = "") -> None:
        if self.merge_lora and not self.lora:
            raise ConfigError(
                f"{prefix}merge_lora is set but {prefix}lora is not: there is no adapter to merge (a full "
                f"fine-tune already saves the whole model); drop --{prefix}merge_lora, or train LoRA with "
                f"--{prefix}lora true"
            )
        if self.lora and not self.lora_target_modules:
            raise ConfigError(
                f"{prefix}lora_target_modules is empty, so LoRA would train nothing; name the modules, or "
                "use all-linear"
            )


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
        low=0, below=1,
    )
    max_samples: int | None = option(
        None, "Use at most this many training rows (after shuffling with the seed).", low=1,
    )
    max_eval_samples: int | None = option(None, "Use at most this many eval rows.", low=1)
    max_length: int = option(
        512, "Longest prompt+completion in tokens; completions are truncated to fit (counted and reported).",
        low=2,
    )
    max_prompt_length: int | None = option(
        None,
        "Longest prompt in tokens; longer prompts are cut from the left (counted). None = no separate limit.",
        low=1,
    )
    too_long_prompt: Literal["drop", "error"] = option(
        "drop", "A prompt that alone fills max_length: drop the row (counted) or stop with an error.",
    )
    seed: int = option(0, "Seed for shuffling before max_samples and for the eval split.", low=0)

    def check(self, prefix: str = "") -> None:
        if self.eval_path and self.eval_fraction:
            raise ConfigError(
                f"{prefix}eval_fraction = {self.eval_fraction} splits held-out rows off {prefix}path, but "
                f"{prefix}eval_path already names the held-out data, so it would do nothing; set one of them"
            )


@dataclass
class TrainConfig:
    output_dir: str = option("", "Run folder; empty = runs/<command>.")
    learning_rate: float = option(1e-5, "Peak learning rate of AdamW.", above=0)
    batch_size: int = option(8, "Examples per micro-batch.", low=1)
    grad_accum: int = option(
        1, "Micro-batches per optimizer step; the loss is normalised over the whole step.", low=1,
    )
    epochs: float = option(1.0, "Passes over the training data (ignored when max_steps > 0).", low=0)
    max_steps: int = option(0, "Optimizer steps to run; 0 = derive from epochs.", low=0)
    warmup_ratio: float = option(0.0, "Fraction of steps with linear warmup.", low=0, high=1)
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate decay after warmup.")
    min_lr_ratio: float = option(
        0.0, "Final learning rate as a fraction of the peak (cosine and linear).", low=0, high=1,
    )
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms).", low=0)
    adam_beta1: float = option(0.9, "AdamW beta1.", low=0, below=1)
    adam_beta2: float = option(0.999, "AdamW beta2.", low=0, below=1)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", above=0)
    fused_optimizer: bool = option(
        True,
        "torch's fused AdamW kernel where the parameters allow it: several times faster on CPU, numerically "
        "a little different from the per-tensor loop.",
    )
    max_grad_norm: float = option(
        1.0, "Clip the global gradient norm to this (0 = no clipping); the pre-clip norm is logged.", low=0,
    )
    seed: int = option(42, "Seed for initialisation, shuffling and sampling.", low=0)
    eval_every: int = option(0, "Evaluate every N optimizer steps (0 = only at the end).", low=0)
    save_every: int = option(
        0, "Checkpoint every N optimizer steps (0 = no intermediate checkpoints).", low=0,
    )
    keep_checkpoints: int = option(2, "Keep this many most recent checkpoints (0 = keep them all).", low=0)
    log_every: int = option(1, "Write metrics every N optimizer steps.", low=1)
    resume: bool = option(False, "Continue from the newest checkpoint in the run folder.")
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).", low=0)
    report_to: list[str] = option(
        help="Extra trackers through accelerate (tensorboard, wandb, ...).", factory=list,
    )
    progress: bool = option(True, "Show a progress bar with ETA.")
    overwrite: bool = option(False, "Allow writing into a run folder that already holds a finished run.")

    def check(self, prefix: str = "") -> None:
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError(
                f"{prefix}max_steps = 0 means 'derive the steps from {prefix}epochs', and {prefix}epochs is "
                f"0: nothing would train; set {prefix}max_steps to the steps to run or {prefix}epochs above 0"
            )


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp",
        "How several processes (torchrun, accelerate launch) share the model: ddp = a whole replica per "
        "process; fsdp = FSDP2 shards parameters, gradients and optimizer state (fp32 master weights). One "
        "process ignores it.",
    )
    cpu_offload: bool = option(
        False, "FSDP: keep the shards and optimizer state in CPU memory, moved to the GPU per layer.",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto",
        "FSDP: dtype of forwards and backwards over the fp32 shards (gradients reduced in fp32); "
        "auto = bfloat16 on CUDA, float32 on CPU.",
    )

    def check(self, prefix: str = "") -> None:
        if self.strategy != "fsdp" and (self.cpu_offload or self.compute_dtype != "auto"):
            which = f"{prefix}cpu_offload" if self.cpu_offload else f"{prefix}compute_dtype"
            raise ConfigError(
                f"{which} is an FSDP setting, but {prefix}strategy is {self.strategy}: set "
                f"--{prefix}strategy fsdp, or drop --{which}"
            )


def distributed_option():
    """The `distributed` section of a training command's config."""
    return option(help="How several processes train together (DDP or FSDP2).", factory=DistributedConfig)


# ----------------------------------------------------------------------------- (de)serialisation


def is_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data; a callable (a reward function given as a Python object) is written as its
    qualified name `module:qualname`, which is what `module:function` in a config imports back."""
    return _plain_data(dataclasses.asdict(config))


def callable_name(function: Any) -> str:
    """'module:qualname' of a function (or of a callable object's class)."""
    target = function if hasattr(function, "__qualname__") else type(function)
    module = getattr(target, "__module__", None) or "__main__"
    return f"{module}:{getattr(target, '__qualname__', type(function).__name__)}"


def _plain_data(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_data(item) for item in value)
    if callable(value) and not isinstance(value, type):
        return callable_name(value)
    return value


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
        except OSError as error:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {error.strerror}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        apply_overrides(config, data)
    if overrides:
        apply_overrides(config, overrides, from_string=from_string)
    return config




def help_text(cls: type) -> str:
    """Every option: dotted key, type, valid values, default and help."""
    lines = []

    def walk(section_cls: type, instance: Any, prefix: str) -> None:
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            hint = hints[f.name]
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(hint):
                walk(hint, value, f"{prefix}{f.name}.")
                continue
            values = describe_values(f, hint)
            type_text = type_name(hint) + (f", {values}" if values else "")
            lines.append(
                f"  --{prefix}{f.name} ({type_text}, default {value!r})\n      {f.metadata.get('help', '')}"
            )

    walk(cls, cls(), "")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation




def validate(config: Any) -> Any:
    """Check a whole config before any work starts; returns it (values normalised to their field types, e.g.
    a Path to a str, "1e-5" to a float, a tuple to a list), or raises ConfigError naming every key that is
    out of range, then the first broken cross-field rule.

    Ranges first, for every field of every section (all problems at once); then each config object's
    `check(prefix)` method, innermost sections first, the top-level config last."""
    if not is_config(config):
        raise ConfigError(f"expected a config dataclass instance, got {type(config).__name__}")
    problems: list[str] = []
    sections: list[tuple[Any, str]] = []

    def walk(section: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            key, hint, value = f"{prefix}{f.name}", hints[f.name], getattr(section, f.name)
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, hint):
                    problems.append(f"config key {key!r} must be a {hint.__name__}, got {value!r}")
                else:
                    walk(value, f"{key}.")
                continue
            try:
                value = coerce(key, value, hint)
            except ConfigError as error:
                problems.append(str(error))
                continue
            setattr(section, f.name, value)
            problem = field_problem(key, f, value)
            if problem:
                problems.append(problem)
        sections.append((section, prefix))

    walk(config, "")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            f"{len(problems)} config values are not valid:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    for section, prefix in sections:  # innermost first: walk appends a section after its own sections
        check = getattr(section, "check", None)
        if callable(check):
            check(prefix)
    return config
