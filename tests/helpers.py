"""Tiny real models and data for tests: built from a config, saved as HF folders, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from prefalign.recipes.base_model import BaseConfig
from prefalign.tasks.model import new_model
from prefalign.tasks.tokenizer import build_char_tokenizer


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 1):
    """A random 1-layer Llama and the char tokenizer (fp32, CPU)."""
    tokenizer = build_char_tokenizer()
    config = BaseConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=2, intermediate_size=2 * hidden_size, seed=seed)
    return new_model(config, tokenizer), tokenizer


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_model(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_parameters(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name
