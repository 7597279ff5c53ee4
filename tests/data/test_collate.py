"""Collation into padded tensors, checked literally on rows tokenized by the real char tokenizer (ids: pad 0,
bos 1, end/eos 2, then printable characters: ord(c) - 24, e.g. '0' 24, '=' 37)."""

from __future__ import annotations

import datasets
import pytest
import torch

from prefalign.config import DataConfig
from prefalign.data.collate import collate_prompts, collate_sft
from prefalign.data.tokenize import tokenize_prompts, tokenize_sft
from prefalign.errors import ModelError
from prefalign.tasks.tokenizer import build_char_tokenizer

PAD = 0


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def test_sft_batch(tokenizer):
    rows = [{"prompt": "2*3=", "completion": "6"}, {"prompt": "1=", "completion": "1<|end|>"}]
    dataset, _ = tokenize_sft(rows, tokenizer, DataConfig())
    batch = collate_sft(dataset.to_list(), PAD)
    assert torch.equal(
        batch["input_ids"], torch.tensor([[1, 26, 18, 27, 37, 30, 2], [1, 25, 37, 25, 2, 0, 0]])
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]))
    assert torch.equal(batch["completion_mask"], torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0]]))


def test_prompt_batch_left_padded_with_extra_columns(tokenizer):
    rows = datasets.Dataset.from_list([{"prompt": "2*3=", "answer": "6"}, {"prompt": "1=", "answer": "1"}])
    dataset, _ = tokenize_prompts(rows, tokenizer, DataConfig())
    assert dataset.column_names == ["prompt", "answer", "prompt_ids"]
    batch = collate_prompts(dataset.to_list(), PAD)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 26, 18, 27, 37], [0, 0, 1, 25, 37]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    assert batch["answer"] == ["6", "1"] and batch["prompt"] == ["2*3=", "1="]
    right = collate_prompts(dataset.to_list(), PAD, padding_side="right")
    assert torch.equal(right["input_ids"], torch.tensor([[1, 26, 18, 27, 37], [1, 25, 37, 0, 0]]))


def test_collate_needs_a_pad_token():
    with pytest.raises(ModelError, match=r"no pad token"):
        collate_sft([{"prompt_ids": [1], "completion_ids": [2]}], None)
