"""Fixtures of the algorithm tests: a tiny policy saved as a Hugging Face folder (32 positions)."""

from __future__ import annotations

import pytest

from prefalign.tasks.model import TinyModelConfig, new_model
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.algorithms.grpo_support import TINY


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-policy")
    new_model(TinyModelConfig(**TINY, max_position_embeddings=32), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
