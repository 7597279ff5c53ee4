"""Tokenization (then collation) through the real char tokenizer (ids: pad 0, bos 1, end/eos 2,
<|system|> 4, <|user|> 5, <|assistant|> 6, then printable characters: ord(c) - 24, e.g. '0' 24, 'a' 73)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from tokenizers import processors

from prefalign.config import DataConfig
from prefalign.data.collate import collate_preference
from prefalign.data.sources import load_rows, load_splits
from prefalign.data.tokenize import tokenize_preference, tokenize_prompts, tokenize_sft
from prefalign.errors import DataError
from prefalign.tasks.tokenizer import CHAT_TEMPLATE, build_char_tokenizer
from tests.helpers import assistant, user

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT = 0, 1, 2, 4, 5, 6


def ids(text):
    return [ord(character) - 24 for character in text]


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


def jsonl_rows(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_rows([str(path)])


# ----------------------------------------------------------------------------- preference, literal tensors


def test_plain_text_preference_batch(tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "33", "margin": 1.5},
        {"prompt": "2*3=", "chosen": "6", "rejected": "5", "margin": 0.5},
    ]
    dataset, stats = tokenize_preference(rows, tokenizer, DataConfig())
    assert dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "margin"]
    assert dataset[0] == {
        "prompt_ids": [1, 25, 19, 25, 37],
        "chosen_ids": [26, 2],
        "rejected_ids": [27, 27, 2],
        "margin": 1.5,
    }
    batch = collate_preference(dataset.to_list(), tokenizer.pad_token_id)
    # rows 0-1 chosen, rows 2-3 rejected
    expected_input_ids = torch.tensor(
        [
            [1, 25, 19, 25, 37, 26, 2, 0],
            [1, 26, 18, 27, 37, 30, 2, 0],
            [1, 25, 19, 25, 37, 27, 27, 2],
            [1, 26, 18, 27, 37, 29, 2, 0],
        ]
    )
    expected_attention_mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1, 0],
        ]
    )
    expected_completion_mask = torch.tensor(
        [
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 1, 1, 0],
        ]
    )
    assert torch.equal(batch["input_ids"], expected_input_ids)
    assert torch.equal(batch["attention_mask"], expected_attention_mask)
    assert torch.equal(batch["completion_mask"], expected_completion_mask)
    assert (
        batch["input_ids"].dtype
        == batch["attention_mask"].dtype
        == batch["completion_mask"].dtype
        == torch.long
    )
    assert torch.equal(batch["margin"], torch.tensor([1.5, 0.5]))
    assert stats.as_dict() == {
        "rows": 2,
        "dropped_too_long_prompt": 0,
        "truncated_prompts": 0,
        "truncated_completions": 0,
        "kept": 2,
    }


def test_conversational_preference_batch_through_the_chat_template(tokenizer):
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("yo")], "rejected": [assistant("no")]},
        {
            "prompt": [{"role": "system", "content": "be"}, user("ok")],
            "chosen": [assistant("k")],
            "rejected": [assistant("nah")],
        },
    ]
    dataset, _ = tokenize_preference(rows, tokenizer, DataConfig())
    # <|bos|><|user|>hi<|end|><|assistant|> | yo<|end|>
    assert dataset[0] == {
        "prompt_ids": [1, 5, 80, 81, 2, 6],
        "chosen_ids": [97, 87, 2],
        "rejected_ids": [86, 87, 2],
    }
    batch = collate_preference(dataset.to_list(), PAD, pad_to_multiple_of=8)
    expected_input_ids = torch.tensor(
        [
            [1, 5, 80, 81, 2, 6, 97, 87, 2, 0, 0, 0, 0, 0, 0, 0],
            [1, 4, 74, 77, 2, 5, 87, 83, 2, 6, 83, 2, 0, 0, 0, 0],
            [1, 5, 80, 81, 2, 6, 86, 87, 2, 0, 0, 0, 0, 0, 0, 0],
            [1, 4, 74, 77, 2, 5, 87, 83, 2, 6, 86, 73, 80, 2, 0, 0],
        ]
    )
    expected_attention_mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        ]
    )
    expected_completion_mask = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
        ]
    )
    assert torch.equal(batch["input_ids"], expected_input_ids)
    assert torch.equal(batch["attention_mask"], expected_attention_mask)
    assert torch.equal(batch["completion_mask"], expected_completion_mask)
    assert "margin" not in batch


def test_implicit_prompt_conversation_tokenizes_like_explicit(tokenizer, tmp_path):
    implicit = jsonl_rows(
        tmp_path, [{"chosen": [user("hi"), assistant("yo")], "rejected": [user("hi"), assistant("no")]}]
    )
    dataset, _ = tokenize_preference(implicit, tokenizer, DataConfig())
    assert dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]  # no hidden columns
    assert dataset[0] == {
        "prompt_ids": [1, 5, 80, 81, 2, 6],
        "chosen_ids": [97, 87, 2],
        "rejected_ids": [86, 87, 2],
    }


# ----------------------------------------------------------------------------- BOS and EOS


def test_bos_never_twice(tokenizer):
    plain, _ = tokenize_preference(
        [{"prompt": "<|bos|>1=", "chosen": "1", "rejected": "2"}], tokenizer, DataConfig()
    )
    assert plain[0]["prompt_ids"] == [BOS, 25, 37]
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE  # a template that writes BOS twice
    rows = [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    doubled, _ = tokenize_preference(rows, tokenizer, DataConfig())
    assert doubled[0]["prompt_ids"] == [BOS, USER, 80, 81, EOS, ASSISTANT]


def test_bos_added_once_when_the_template_has_none(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    rows = [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    dataset, _ = tokenize_preference(rows, tokenizer, DataConfig())
    assert dataset[0]["prompt_ids"] == [BOS, USER, 80, 81, EOS, ASSISTANT]


def test_no_bos_when_the_tokenizer_adds_none(tokenizer):
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tokenizer("1")["input_ids"] == [25]
    dataset, _ = tokenize_sft([{"prompt": "1=", "completion": "1"}], tokenizer, DataConfig())
    assert dataset[0] == {"prompt_ids": [25, 37], "completion_ids": [25, EOS]}


def test_eos_exactly_once(tokenizer):
    rows = [{"prompt": "1=", "chosen": "1<|end|>", "rejected": "2"}]
    dataset, _ = tokenize_preference(rows, tokenizer, DataConfig())
    assert dataset[0]["chosen_ids"] == [25, EOS] and dataset[0]["rejected_ids"] == [26, EOS]


# ----------------------------------------------------------------------------- chat template problems


def test_prompt_not_a_prefix_of_the_whole(tokenizer, tmp_path):
    # Writes the number of messages first, so the prompt alone renders "1..." and the whole "2...".
    tokenizer.chat_template = "{{ messages|length }}" + CHAT_TEMPLATE
    rows = jsonl_rows(
        tmp_path, [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    )
    with pytest.raises(
        DataError,
        match=r"d\.jsonl, line 1, column 'chosen': the chat template renders the prompt \(with the "
        r"generation prompt\) as text that is not a prefix of the rendered prompt \+ completion; they differ "
        r"at character 0",
    ):
        tokenize_preference(rows, tokenizer, DataConfig())


def test_conversation_without_chat_template(tokenizer):
    tokenizer.chat_template = None
    rows = [{"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}]
    with pytest.raises(
        DataError, match=r"row 1: the data is conversational but the tokenizer has no chat template"
    ):
        tokenize_preference(rows, tokenizer, DataConfig())


def test_caller_render_replaces_the_template(tokenizer):
    tokenizer.chat_template = None

    def render(messages, add_generation_prompt):
        text = "".join(f"{message['role'][0]}:{message['content']}\n" for message in messages)
        return text + ("a:" if add_generation_prompt else "")

    rows = [{"prompt": [user("hi")], "completion": [assistant("yo")]}]
    dataset, _ = tokenize_sft(rows, tokenizer, DataConfig(), render=render)
    assert dataset[0] == {
        "prompt_ids": [BOS, *ids("u:hi"), 7, *ids("a:")],
        "completion_ids": [*ids("yo"), 7, EOS],
    }


def test_template_error_names_the_row(tokenizer):
    rows = [{"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match=r"row 1: the chat template failed on this row: unknown role: tool"):
        tokenize_preference(rows, tokenizer, DataConfig())


# ----------------------------------------------------------------------------- length policy


def test_too_long_prompt_error_policy(tokenizer, tmp_path):
    rows = jsonl_rows(tmp_path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl, line 1, column 'prompt': the prompt is 5 tokens, which leaves no room for a "
        r"completion within data\.max_length=5",
    ):
        tokenize_preference(rows, tokenizer, DataConfig(max_length=5, too_long_prompt="error"))


def test_too_long_prompt_drop_policy_counts(tokenizer):
    rows = [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "1=", "chosen": "1", "rejected": "2"},
        {"prompt": "22+22=", "chosen": "44", "rejected": "4"},
    ]
    dataset, stats = tokenize_preference(rows, tokenizer, DataConfig(max_length=5))
    assert dataset["prompt_ids"] == [[BOS, 25, 37]]
    assert (stats.rows, stats.kept, stats.dropped_too_long_prompt) == (3, 1, 2)
    assert stats.summary() == (
        "3 rows, 1 kept: 2 dropped (prompt fills max_length), 0 prompts cut from the left "
        "(max_prompt_length), 0 completions cut on the right (max_length)"
    )
    with pytest.raises(DataError, match=r"every one of the 1 rows was dropped"):
        tokenize_preference(rows[:1], tokenizer, DataConfig(max_length=5))


def test_prompt_cut_from_the_left_keeps_bos(tokenizer):
    rows = [{"prompt": "abcdef", "completion": "x"}]
    dataset, stats = tokenize_sft(rows, tokenizer, DataConfig(max_prompt_length=4))
    assert dataset[0]["prompt_ids"] == [BOS, *ids("def")]
    assert stats.truncated_prompts == 1


def test_completion_cut_on_the_right(tokenizer):
    rows = [{"prompt": "1+1=", "chosen": "222", "rejected": "3"}]
    dataset, stats = tokenize_preference(rows, tokenizer, DataConfig(max_length=7))
    assert dataset[0]["chosen_ids"] == [26, 26] and dataset[0]["rejected_ids"] == [27, EOS]
    assert stats.truncated_completions == 1 and stats.truncated_prompts == 0


# ----------------------------------------------------------------------------- SFT and prompt-only rows


def test_sft_from_messages(tokenizer):
    rows = [{"messages": [user("hi"), assistant("yo")]}]
    dataset, _ = tokenize_sft(rows, tokenizer, DataConfig())
    assert dataset[0] == {"prompt_ids": [1, 5, 80, 81, 2, 6], "completion_ids": [97, 87, 2]}


def test_conversational_prompt_ends_with_generation_prompt(tokenizer, tmp_path):
    rows = jsonl_rows(tmp_path, [{"prompt": [user("hi")], "answer": "x"}])
    dataset, _ = tokenize_prompts(rows, tokenizer, DataConfig())
    assert dataset.column_names == ["prompt", "answer", "prompt_ids"]
    assert dataset[0]["prompt_ids"] == [1, 5, 80, 81, 2, 6]


def test_prompts_from_a_shuffled_subset_keep_row_alignment_and_feature_types(tokenizer):
    rows = datasets.Dataset.from_list([{"prompt": f"q{index}", "answer": index % 2} for index in range(20)])
    rows = rows.cast_column("answer", datasets.ClassLabel(names=["even", "odd"]))
    train, _ = load_splits(DataConfig(max_samples=5, seed=2), dataset=rows)
    dataset, _ = tokenize_prompts(train, tokenizer, DataConfig())
    assert dataset.features["answer"] == datasets.ClassLabel(names=["even", "odd"])
    for example in dataset:
        number = int(example["prompt"][1:])
        assert example["answer"] == number % 2
        assert example["prompt_ids"] == [BOS, *ids(example["prompt"])]
