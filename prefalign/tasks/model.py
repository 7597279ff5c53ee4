"""The built-in task's model: a small Llama over the char tokenizer (its definition only; training it is the
base-model recipe's job, prefalign.recipes.base_model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass
class TinyModelConfig:
    """The shape of the tiny model (the base-model recipe's BaseConfig carries the same fields)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    seed: int = 1


def new_model(config: TinyModelConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised Llama (seeded with config.seed) sized by `config` and `tokenizer`."""
    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(model_config)
