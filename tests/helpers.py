"""Tiny real models and data for tests: built from a config, saved as HF folders, nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefalign.tasks.model import TinyModelConfig, new_model
from prefalign.tasks.tokenizer import build_char_tokenizer


def tiny_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 1):
    """A random 1-layer Llama and the char tokenizer (fp32, CPU)."""
    tokenizer = build_char_tokenizer()
    config = TinyModelConfig(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=2, intermediate_size=2 * hidden_size,
        seed=seed,
    )
    return new_model(config, tokenizer), tokenizer


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_model(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_same_parameters(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict], blank_line_after_first: bool = False) -> str:
    """Rows as a JSON Lines file (optionally with a blank line 2, which readers skip); returns the path."""
    lines = [json.dumps(row) for row in rows]
    if blank_line_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def saved_classifier(folder: Path, *, pad_is_eos: bool = False, num_labels: int = 1) -> Path:
    """A random one-layer Llama sequence classifier (a stand-in reward model) with the char tokenizer, saved.
    Its score head is drawn wide, so every position gives a visibly different score."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_char_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=num_labels,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def addition_pairs(count: int):
    """Conversational preference rows: `a+b` answered right (chosen) and off by one (rejected)."""
    import datasets

    rows = []
    for index in range(count):
        a, b = index % 10, (3 * index) % 10
        chosen, rejected = [assistant(str(a + b))], [assistant(str(a + b + 1))]
        rows.append({"prompt": [user(f"{a}+{b}")], "chosen": chosen, "rejected": rejected})
    return datasets.Dataset.from_list(rows)
