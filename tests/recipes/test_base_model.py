"""The built-in base model: built once into the cache (keyed by its builder config), with its calibration
numbers recorded, and deterministic for a seed."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.recipes.base_model import BaseConfig, ensure_base_model

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=8)


def test_base_builder_caches_and_records_its_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    config = BaseConfig(**TINY, steps=4, eval_prompts=8)
    path = ensure_base_model(config)
    assert path.parent == tmp_path / "cache" and path.name.startswith("base-")
    summary = json.loads((path / "prefalign_base.json").read_text())
    assert summary["sft_steps"] == 4 and 0.0 <= summary["greedy_accuracy"] <= summary["pass@8_t1"] <= 1.0
    card = (path / "README.md").read_text()
    assert f"held-out greedy accuracy**: {summary['greedy_accuracy']:.3f}" in card and "pass@8" in card
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(config) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # The cache key covers the builder config: another number of steps is another model, in its own folder.
    other = ensure_base_model(dataclasses.replace(config, steps=5))
    assert other.parent == path.parent and other != path
    assert json.loads((other / "prefalign_base.json").read_text())["sft_steps"] == 5


def test_base_build_is_deterministic_for_a_seed(tmp_path):
    config = dict(TINY, steps=3, eval_prompts=4)
    first = ensure_base_model(BaseConfig(**config, output_dir=str(tmp_path / "a")))
    second = ensure_base_model(BaseConfig(**config, output_dir=str(tmp_path / "b")))
    other_seed = ensure_base_model(BaseConfig(**config, seed=7, output_dir=str(tmp_path / "c")))
    weights = [load_file(str(path / "model.safetensors")) for path in (first, second, other_seed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
