"""Row formats: preference, SFT and prompt-only rows checked and normalised (errors name the file, line and
column), and the implicit prompt split off chosen/rejected."""

from __future__ import annotations

import pytest

from prefalign.data.formats import (
    normalize_preference,
    normalize_prompts,
    normalize_sft,
    split_implicit_prompt,
)
from prefalign.data.sources import load_rows
from prefalign.errors import DataError
from tests.helpers import assistant, user, write_jsonl

PAIR = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}


def rows_from(tmp_path, rows, name="d.jsonl"):
    return load_rows([write_jsonl(tmp_path / name, rows)])


# ----------------------------------------------------------------------------- validation errors


def test_missing_column_lists_columns_and_suggests_mapping(tmp_path):
    rows = rows_from(tmp_path, [{"prompt": "p", "good": "g", "bad": "b"}])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl: preference data needs column\(s\) 'chosen', 'rejected', which are missing; "
        r"columns present: prompt, good, bad\. Rename yours with data\.columns",
    ):
        normalize_preference(rows)
    with pytest.raises(DataError, match=r"SFT data needs column\(s\) 'completion'"):
        normalize_sft(rows)


def test_wrong_type(tmp_path):
    rows = rows_from(tmp_path, [PAIR, {"prompt": "p", "chosen": None, "rejected": "r"}])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl, line 2, column 'chosen': expected a string or a list of \{role, content\} "
        r"messages, got null",
    ):
        normalize_preference(rows)
    rows = rows_from(tmp_path, [{"prompt": "p", "chosen": 5, "rejected": 6}], name="numbers.jsonl")
    with pytest.raises(DataError, match=r"numbers\.jsonl, line 1, column 'chosen': .*got int 5"):
        normalize_preference(rows)


def test_empty_completion(tmp_path):
    rows = rows_from(tmp_path, [PAIR, {"prompt": "p", "chosen": "c", "rejected": "  "}])
    with pytest.raises(DataError, match=r"d\.jsonl, line 2, column 'rejected': empty completion"):
        normalize_preference(rows)
    conversation = rows_from(tmp_path, [{"messages": [user("hi"), assistant("")]}], name="sft.jsonl")
    with pytest.raises(DataError, match=r"sft\.jsonl, line 1, column 'messages': empty completion"):
        normalize_sft(conversation)


def test_chosen_identical_to_rejected(tmp_path):
    rows = rows_from(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(
        DataError, match=r"d\.jsonl, line 1, column 'rejected': chosen and rejected are identical"
    ):
        normalize_preference(rows)
    implicit = [{"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]}]
    with pytest.raises(DataError, match=r"row 1, column 'rejected': chosen and rejected are identical"):
        normalize_preference(implicit)


def test_bad_role_and_missing_content(tmp_path):
    bad_role = rows_from(
        tmp_path, [{"prompt": [user("q"), {"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}]
    )
    with pytest.raises(
        DataError,
        match=r"d\.jsonl, line 1, column 'prompt', message 2: role 'bot' is not one of system, user, "
        r"assistant, tool",
    ):
        normalize_preference(bad_role)
    # Arrow fills the missing key with null; that still reads as missing content.
    no_content = rows_from(
        tmp_path,
        [{"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [{"role": "assistant"}]}],
        name="c.jsonl",
    )
    with pytest.raises(
        DataError, match=r"c\.jsonl, line 1, column 'rejected', message 1 \(assistant\): missing 'content'"
    ):
        normalize_preference(no_content)


def test_normalize_preference_mixed_forms_and_margin():
    rows = normalize_preference([{"prompt": "q", "chosen": [assistant("a")], "rejected": "b", "margin": 2}])
    assert rows == [
        {
            "prompt": [user("q")],
            "chosen": [assistant("a")],
            "rejected": [assistant("b")],
            "margin": 2.0,
            "__source__": "dataset",
            "__row__": 1,
        }
    ]
    with pytest.raises(DataError, match=r"row 1, column 'margin': expected a finite number, got 'big'"):
        normalize_preference([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}])


# ----------------------------------------------------------------------------- implicit prompt


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),  # cut before the last whitespace
        ("I like cats", "I like cars", ("I like", " cats", " cars")),  # never inside a word
        ("x=12", "x=15", ("x=1", "2", "5")),  # no whitespace: the whole common prefix
        ("abc", "xyz", ("", "abc", "xyz")),  # nothing shared: empty prompt
    ],
)
def test_implicit_prompt_strings(chosen, rejected, expected):
    assert split_implicit_prompt(chosen, rejected) == expected


def test_implicit_prompt_messages():
    chosen = [user("q"), assistant("a"), user("q2"), assistant("good")]
    rejected = [user("q"), assistant("a"), user("q2"), assistant("bad")]
    assert split_implicit_prompt(chosen, rejected) == (chosen[:3], chosen[3:], rejected[3:])
    # Differing at a user turn: back up so the completions start with the assistant speaking.
    other = [user("q"), assistant("a"), user("other"), assistant("x")]
    assert split_implicit_prompt(chosen, other) == (chosen[:1], chosen[1:], other[1:])


def test_normalize_preference_without_prompt_column(tmp_path):
    rows = rows_from(
        tmp_path, [{"chosen": [user("q"), assistant("yes")], "rejected": [user("q"), assistant("no")]}]
    )
    normalized = normalize_preference(rows)
    assert normalized[0]["prompt"] == [user("q")]
    assert normalized[0]["chosen"] == [assistant("yes")] and normalized[0]["rejected"] == [assistant("no")]


# ----------------------------------------------------------------------------- SFT and prompt-only


def test_sft_from_messages_and_columns():
    from_messages = normalize_sft(
        [{"messages": [{"role": "system", "content": "s"}, user("q"), assistant("a")]}]
    )
    assert from_messages[0]["prompt"] == [{"role": "system", "content": "s"}, user("q")]
    assert from_messages[0]["completion"] == [assistant("a")]
    assert normalize_sft([{"prompt": "q", "completion": "a"}])[0]["completion"] == "a"
    with pytest.raises(
        DataError, match=r"row 1, column 'messages': expected a conversation that ends with an assistant turn"
    ):
        normalize_sft([{"messages": [user("q")]}])


def test_prompt_only_keeps_extra_columns():
    rows = normalize_prompts([{"prompt": "2+2=", "answer": "4", "level": 1}])
    assert rows[0]["answer"] == "4" and rows[0]["level"] == 1
    with pytest.raises(
        DataError, match=r"prompt-only data needs column\(s\) 'prompt'.*columns present: question"
    ):
        normalize_prompts([{"question": "x"}])
    with pytest.raises(DataError, match=r"row 1, column 'prompt': empty prompt"):
        normalize_prompts([{"prompt": ""}])


def test_rows_without_a_prompt_or_a_shared_prefix_are_counted_and_refused_when_all(tmp_path, caplog):
    shared = {"chosen": "2+2= 4", "rejected": "2+2= 5"}
    unshared = {"chosen": "yes", "rejected": "no"}
    rows = rows_from(tmp_path, [shared, unshared, unshared], name="mixed.jsonl")
    with caplog.at_level("WARNING", logger="prefalign"):
        normalized = normalize_preference(rows)
    assert [row["prompt"] for row in normalized] == ["2+2=", "", ""]
    assert "2 of 3 preference rows have no prompt" in caplog.text and "mixed.jsonl, line 2" in caplog.text
    rows = rows_from(tmp_path, [unshared, unshared], name="none.jsonl")
    with pytest.raises(DataError, match="2 of 2 preference rows have no prompt.*every row"):
        normalize_preference(rows)
    rows = rows_from(tmp_path, [{"prompt": "", **unshared}], name="blank.jsonl")
    with pytest.raises(DataError, match="their prompt is empty"):
        normalize_preference(rows)
