"""`prefalign base`: build (or reuse) the built-in task's tiny base model and print where it is and how good
it is."""

from __future__ import annotations

import json
from pathlib import Path

from prefalign.config import validate
from prefalign.recipes.base_model import BaseConfig, ensure_base_model


def base(config: BaseConfig) -> Path:
    """`prefalign base`: build (or reuse) the base model and print where it is and how good it is."""
    path = ensure_base_model(validate(config))
    summary = json.loads((path / "prefalign_base.json").read_text())
    print(f"base model: {path}")
    for key in ("parameters", "greedy_accuracy", "pass@8_t1", "train_seconds"):
        print(f"  {key}: {summary[key]}")
    return path
