"""Every example config a user copies loads into its command's config, every key known and every value valid
(the strict-layers move kept them working: `prefalign dpo --config examples/dpo.yaml --rounds 2` included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefalign.cli import COMMANDS
from prefalign.config import load_config, validate

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert {path.stem for path in EXAMPLES} >= {"sft", "dpo", "grpo", "reward"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_example_loads_into_its_commands_config(path):
    _, config_class = COMMANDS[path.stem].load()
    config = load_config(config_class, path)
    assert type(config) is config_class
    validate(config)
    if path.stem == "dpo":
        iterative = load_config(config_class, path, {"rounds": "2"}, from_string=True)
        assert iterative.rounds == 2 and iterative.sampling.strategy == "best_vs_worst"
        validate(iterative)
