"""Declaring config fields and reading their values (L0): `option(...)` with its valid range, the checks a
range cannot say (device names, model locations), how --help words them, and `coerce`, which turns YAML and
command-line strings into a field's type. prefalign.config builds the configs and `validate` on these."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from prefalign.errors import ConfigError

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (of each item of a list field): `low`/`high` inclusive,
    `above`/`below` exclusive, plus 0 with the meaning `zero` says ('off', 'auto', ...) when 0 is outside
    them; NaN and ±infinity only where allowed."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    below: float | None = None
    allow_nan: bool = False
    allow_inf: bool = False
    zero: str | None = None

    def bounded(self) -> bool:
        return any(bound is not None for bound in (self.low, self.high, self.above, self.below))

    def text(self, integer: bool = False) -> str:
        """'at least 1' (integers), '>= 0', '> 0', 'in [0, 1)', ... ('' when unbounded)."""
        low = self.low is not None and _number(self.low)
        above = self.above is not None and _number(self.above)
        high = self.high is not None and _number(self.high)
        below = self.below is not None and _number(self.below)
        if (low or above) and (high or below):
            text = f"in {'[' + low if low else '(' + above}, {high + ']' if high else below + ')'}"
        elif low:
            text = f"at least {low}" if integer else f">= {low}"
        elif above:
            text = f"> {above}"
        elif high:
            text = f"at most {high}" if integer else f"<= {high}"
        elif below:
            text = f"< {below}"
        else:
            return ""
        return text + (f" (or 0 = {self.zero})" if self.zero else "")

    def problem(self, value: float) -> str | None:
        """Why `value` (a number) is out of range, or None."""
        integer = isinstance(value, int)
        if not integer and math.isnan(value):
            if self.allow_nan:
                return None
            return f"must be {self.text(integer)}" if self.bounded() else "must be a number (not NaN)"
        if not integer and math.isinf(value) and not self.allow_inf:
            return f"must be finite{', ' + self.text(integer) if self.bounded() else ''}"
        if self.zero and value == 0:
            return None
        if (
            (self.low is not None and value < self.low) or (self.high is not None and value > self.high)
            or (self.above is not None and value <= self.above)
            or (self.below is not None and value >= self.below)
        ):
            return f"must be {self.text(integer)}"
        return None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def option(
    default: Any = None, help: str = "", *, factory: Any = None, low: float | None = None,
    high: float | None = None, above: float | None = None, below: float | None = None,
    zero: str | None = None, allow_nan: bool = False, allow_inf: bool = False, check: Check | None = None,
) -> Any:
    """A config field: its default (or a factory for lists/dicts), the help text `--help` prints, and its
    valid values: `low <= value <= high`, `above < value < below` (any subset), 0 as well when `zero` says
    what it means there, NaN/inf refused unless allowed, and `check(value)` returning a problem (or None)
    for what a range cannot say. None (for an optional field) is always valid; for a list the range applies
    to each item."""
    metadata = {
        "help": help, "range": Range(low, high, above, below, allow_nan, allow_inf, zero), "check": check,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(value: str) -> str | None:
    """auto, cpu, cuda[:N] or mps"""
    if value == "auto":
        return None
    import torch  # here, not at the top: `--help` and `prefalign env` stay fast

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return "is not a device name: use auto, cpu, cuda, cuda:N or mps"
    if device.type not in DEVICE_TYPES:
        return f"is a device type prefalign does not run on ({device.type}): use auto, cpu, cuda or mps"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                "needs CUDA, which is not available here (torch.cuda.is_available() is False: no GPU, or a "
                "CPU-only torch build); use auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"is not on this machine, which has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "needs MPS (an Apple GPU), which is not available here; use auto or cpu"
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "needs an Intel XPU, which is not available here; use auto or cpu"
    return None


# A hub name: `name` or `org/name`; anything else that does not exist cannot be a model.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model_location(value: str) -> str | None:
    """an existing folder or a hub name"""
    if value == "builtin" or Path(value).expanduser().exists():
        return None
    if _HUB_NAME.fullmatch(value) and ".." not in value:
        return None  # a hub name: only loading can tell whether it is there
    return (
        "is a folder that does not exist (and not a hub name such as org/model); point it at a model "
        "folder written by save_pretrained"
    )


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and getattr(hint, "__name__", None):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


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
            if value.strip().startswith("["):
                value = _parse_yaml(key, value, "a list like [a, b] or a,b", "[a, b]")
            else:
                value = [v for v in value.split(",") if v]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [coerce(key, item, args[0] if args else Any, from_string=from_string) for item in value]
    if origin is dict:
        if from_string and isinstance(value, str):
            value = _parse_yaml(key, value, "a mapping like {a: b, c: d}", "{a: b, c: d}") or {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping like {{a: b, c: d}}, got {value!r}")
        item_hint = args[1] if len(args) == 2 else Any
        return {str(k): coerce(f"{key}.{k}", v, item_hint) for k, v in value.items()}
    if hint is Any:
        return value
    if hint in (Callable, collections.abc.Callable) or origin is collections.abc.Callable:
        if callable(value):
            return value
        raise ConfigError(f"config key {key!r} must be a function, got {value!r}")
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
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported type {type_name(hint)}")


def _parse_yaml(key: str, text: str, form: str, example: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = " ".join(str(getattr(error, "problem", "") or "").split())
        raise ConfigError(
            f"config key {key!r} must be {form}; could not read {text!r}"
            + (f" ({problem})" if problem else "") + f". Quote it in the shell: --{key} '{example}'"
        ) from None


def describe_values(f: dataclasses.Field, hint: Any = None) -> str:
    """The valid values of a field as --help shows them ('at least 1', 'in [0, 1)', a check's summary), or
    ''."""
    parts = []
    value_range = f.metadata.get("range")
    if value_range is not None and value_range.bounded():
        parts.append(value_range.text(integer=int in (hint, *typing.get_args(hint))))
    check = f.metadata.get("check")
    if check is not None and check.__doc__:
        parts.append(check.__doc__.strip().splitlines()[0])
    return ", ".join(parts)


def field_problem(key: str, f: dataclasses.Field, value: Any) -> str | None:
    """Why a (type-checked) leaf value is not valid, or None: its range (each item of a list), its check."""
    items = value if isinstance(value, list) else [value]
    value_range = f.metadata.get("range")
    check = f.metadata.get("check")
    for item in items:
        if item is None:
            continue
        problem = None
        if value_range is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
            problem = value_range.problem(item)
        if problem is None and check is not None:
            problem = check(item)
        if problem is not None:
            help_line = f.metadata.get("help", "")
            if problem.startswith("must"):
                said = f"{key} {problem}, got {item!r}"
            else:
                said = f"{key} {item!r} {problem}"
            return said + (f" ({help_line})" if help_line else "")
    return None
