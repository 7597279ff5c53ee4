"""Rejection sampling: pair strategies on hand-made scores, drops counted, rows the trainers read."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

from prefalign.algorithms.rejection_sampling import (
    RejectionSamplingConfig,
    SampleConfig,
    SampleStats,
    choose_pairs,
    rejection_sample,
    rows_for_prompt,
    sample,
)
from prefalign.config import DataConfig, ModelConfig
from prefalign.data import load_rows, tokenize_preference, tokenize_prompts, tokenize_sft
from prefalign.errors import ConfigError, DataError
from prefalign.rewards import WeightedRewards
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.helpers import save_tiny_model, tiny_model

DIGIT_COUNT = "tests.algorithms.test_rejection_sampling:digit_count"


def digit_count(prompts, completions, **_):
    """A deterministic score of the text: how many digits it holds."""
    return [float(sum(character.isdigit() for character in completion)) for completion in completions]


def fails_for_bad_prompt(prompts, completions, **_):
    if any("bad" in prompt for prompt in prompts):
        raise ValueError("this scorer cannot handle 'bad'")
    return [1.0] * len(completions)


def _prompts(tokenizer, texts):
    rows = datasets.Dataset.from_list(
        [{"prompt": text, "answer": str(index)} for index, text in enumerate(texts)]
    )
    prompts, _ = tokenize_prompts(rows, tokenizer, DataConfig())
    return prompts


# ----------------------------------------------------------------------------- strategies on literal scores


def test_best_vs_worst_takes_first_of_ties():
    pairs, reason, ties = choose_pairs([0.2, 0.9, 0.5, 0.9, 0.2], "best_vs_worst", 0.0, random.Random(0))
    assert pairs == [(1, 0)] and reason is None and ties == 0


def test_all_equal_and_margin_drop_the_group():
    assert choose_pairs([1.0, 1.0, 1.0], "best_vs_worst", 0.0, random.Random(0))[:2] == ([], "all_equal")
    assert choose_pairs([1.0, 1.0], "all_pairs", 0.0, random.Random(0))[:2] == ([], "all_equal")
    # gap 0.3 < margin 0.5
    assert choose_pairs([0.0, 0.3], "best_vs_worst", 0.5, random.Random(0))[:2] == ([], "below_margin")
    assert choose_pairs([0.0, 0.3], "best_vs_random", 0.5, random.Random(0))[:2] == ([], "below_margin")
    # A gap equal to the margin clears it, float rounding included (0.3 - 0.1 = 0.19999999999999998).
    assert choose_pairs([0.1, 0.3], "best_vs_worst", 0.2, random.Random(0))[:2] == ([(1, 0)], None)
    assert choose_pairs([0.1, 0.3], "all_pairs", 0.2, random.Random(0))[:2] == ([(1, 0)], None)
    assert choose_pairs([0.1, 0.3], "best_vs_worst", 0.2000001, random.Random(0))[:2] == ([], "below_margin")


def test_best_vs_random_only_draws_below_the_margin():
    # best 1.0 at index 0; with margin 0.6 only index 1 (gap 1.0) qualifies: 0.5 (gap 0.5) and the tie do not.
    for seed in range(5):
        pairs, reason, _ = choose_pairs([1.0, 0.0, 0.5, 1.0], "best_vs_random", 0.6, random.Random(seed))
        assert pairs == [(0, 1)] and reason is None
    # Without a margin the rejected side is drawn from {1, 2}: both appear over a few seeds.
    drawn = {
        choose_pairs([1.0, 0.0, 0.5, 1.0], "best_vs_random", 0.0, random.Random(seed))[0][0][1]
        for seed in range(20)
    }
    assert drawn == {1, 2}


def test_all_pairs_counts_ties_and_respects_the_margin():
    scores = [1.0, 0.0, 1.0, 0.5]
    pairs, reason, ties = choose_pairs(scores, "all_pairs", 0.0, random.Random(0))
    # 6 index pairs; (0, 2) is a tie; the others oriented high -> low.
    assert sorted(pairs) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]
    assert ties == 1 and reason is None
    pairs, _, _ = choose_pairs(scores, "all_pairs", 0.6, random.Random(0))
    assert sorted(pairs) == [(0, 1), (2, 1)]


def _group(*entries):
    return [
        {"text": text, "score": score, "reward_failed": failed, "finish_reason": reason}
        for text, score, failed, reason in entries
    ]


def test_rows_for_prompt_drops_failed_unscored_empty_and_counts_them():
    settings = RejectionSamplingConfig(strategy="best_vs_worst")
    stats = SampleStats()
    group = _group(
        ("12", 2.0, False, "eos"),
        ("oops", None, True, "eos"),  # a scorer raised: dropped, even though its score would be lowest
        ("n/a", None, False, "eos"),  # every scorer said not applicable
        ("  ", 0.0, False, "eos"),  # empty: the data layer refuses it as a completion
        ("1", 1.0, False, "length"),
    )
    prompt_row = {"prompt": "p", "prompt_ids": [1], "answer": "12"}
    rows = rows_for_prompt(prompt_row, group, settings, random.Random(0), stats)
    assert rows == [{
        "prompt": "p", "chosen": "12", "rejected": "1", "chosen_score": 2.0, "rejected_score": 1.0,
        "answer": "12",
    }]
    assert (stats.reward_failures, stats.unscored_samples, stats.empty_samples) == (1, 1, 1)
    stats = SampleStats()
    dropped = RejectionSamplingConfig(drop_truncated=True)
    assert rows_for_prompt({"prompt": "p"}, group, dropped, random.Random(0), stats) == []
    assert stats.groups_too_few_scored == 1


def test_best_of_n_and_min_best_score_and_conversations():
    settings = RejectionSamplingConfig(strategy="best_of_n", min_best_score=1.0)
    prompt = [{"role": "user", "content": "1+1"}]
    stats = SampleStats()
    group = _group(("3", 0.0, False, "eos"), ("2", 1.0, False, "eos"))
    rows = rows_for_prompt({"prompt": prompt}, group, settings, random.Random(0), stats)
    assert rows == [{"prompt": prompt, "completion": [{"role": "assistant", "content": "2"}], "score": 1.0}]
    group = _group(("3", 0.0, False, "eos"), ("4", 0.5, False, "eos"))
    rows = rows_for_prompt({"prompt": prompt}, group, settings, random.Random(0), stats)
    assert rows == [] and stats.groups_below_min_score == 1


def test_all_pairs_writes_a_repeated_pair_once():
    stats = SampleStats()
    group = _group(
        ("2", 1.0, False, "eos"), ("3", 0.0, False, "eos"), ("2", 1.0, False, "eos"), ("3", 0.0, False, "eos")
    )
    settings = RejectionSamplingConfig(strategy="all_pairs")
    rows = rows_for_prompt({"prompt": "1+1"}, group, settings, random.Random(0), stats)
    # 4 ordered pairs of ("2", "3") collapse to one row; the two ties are counted.
    assert [(row["chosen"], row["rejected"]) for row in rows] == [("2", "3")]
    assert stats.duplicate_pairs == 3 and stats.tied_pairs == 2


# ----------------------------------------------------------------------------- with a model


def test_rejection_sample_end_to_end_is_deterministic_and_trainable():
    model, tokenizer = tiny_model()
    prompts = _prompts(tokenizer, ["12+3", "4+56", "7+8"])
    settings = RejectionSamplingConfig(n=6, max_new_tokens=5, temperature=1.5)
    rewards = WeightedRewards([digit_count])
    first = rejection_sample(model, tokenizer, prompts, rewards, settings, seed=3)
    again = rejection_sample(model, tokenizer, prompts, rewards, settings, seed=3)
    assert first.rows == again.rows and first.rows
    assert first.stats.samples == 18 and len(first.samples) == 18
    for row in first.rows:
        assert row["chosen_score"] > row["rejected_score"]
        assert row["chosen_score"] == sum(c.isdigit() for c in row["chosen"])
        assert row["answer"] == str(row["prompt_index"])  # extra columns follow their prompt
    data, _ = tokenize_preference(first.rows, tokenizer, DataConfig())
    assert len(data) == len(first.rows)


def test_failing_scorer_is_dropped_with_its_prompt_index(caplog):
    model, tokenizer = tiny_model()
    prompts = _prompts(tokenizer, ["good one", "bad one", "good two"])
    settings = RejectionSamplingConfig(n=3, max_new_tokens=3, strategy="best_of_n")
    rewards = WeightedRewards([fails_for_bad_prompt])
    output = rejection_sample(model, tokenizer, prompts, rewards, settings, seed=0)
    assert output.stats.reward_failures == 3  # all three samples of prompt 1
    assert sorted(row["prompt_index"] for row in output.rows) == [0, 2]
    assert [s["reward_failed"] for s in output.samples if s["prompt_index"] == 1] == [True, True, True]
    assert "on prompt 1, sample 0" in caplog.text
    assert output.stats.failure_examples[0].startswith(
        "reward function 'fails_for_bad_prompt' on prompt 1, sample 0: raised ValueError"
    )


def test_n_below_two_with_a_pair_strategy_is_a_config_error():
    model, tokenizer = tiny_model()
    with pytest.raises(ConfigError, match="needs at least 2 samples"):
        rejection_sample(
            model, tokenizer, _prompts(tokenizer, ["1+1"]), WeightedRewards([digit_count]),
            RejectionSamplingConfig(n=1), seed=0,
        )


def test_prompt_longer_than_the_context_is_dropped_or_an_error():
    model, tokenizer = tiny_model()  # context: 128 positions
    prompts = _prompts(tokenizer, ["1+1", "9" * 126])  # 126 + BOS = 127 tokens, + 4 new tokens > 128
    settings = RejectionSamplingConfig(n=2, max_new_tokens=4)
    output = rejection_sample(model, tokenizer, prompts, WeightedRewards([digit_count]), settings, seed=0)
    assert output.stats.dropped_over_context == 1 and output.stats.samples == 2
    with pytest.raises(DataError, match="exceeds the model's context of 128 tokens"):
        rejection_sample(
            model, tokenizer, prompts, WeightedRewards([digit_count]), settings, seed=0,
            too_long_prompt="error",
        )


# ----------------------------------------------------------------------------- the command


def _config(tmp_path, model_dir, **sampling) -> SampleConfig:
    return SampleConfig(
        model=ModelConfig(name_or_path=str(model_dir), device="cpu"),
        data=DataConfig(path=[str(tmp_path / "prompts.jsonl")]),
        sampling=RejectionSamplingConfig(
            n=4, max_new_tokens=4, temperature=1.5, reward_functions=[DIGIT_COUNT], **sampling
        ),
        output_dir=str(tmp_path / "out"),
    )


def _write_prompts(tmp_path, prompts):
    with (tmp_path / "prompts.jsonl").open("w") as handle:
        for prompt in prompts:
            handle.write(json.dumps({"prompt": prompt}) + "\n")


@pytest.mark.parametrize("output_format", ["jsonl", "parquet", "hf"])
def test_sample_command_writes_rows_the_dpo_data_layer_reads(tmp_path, output_format):
    model_dir = save_tiny_model(tmp_path / "model")
    _write_prompts(tmp_path, [f"{a}+{a + 1}" for a in range(6)])
    config = _config(tmp_path, model_dir)
    config.output_format = output_format
    output = sample(config)
    name = {"jsonl": "pairs.jsonl", "parquet": "pairs.parquet", "hf": "pairs"}[output_format]
    rows_path = tmp_path / "out" / name
    rows = load_rows([str(rows_path)])
    assert len(rows) == output.stats.rows > 0
    tokenize_preference(rows, build_char_tokenizer(), DataConfig())
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["sampling"]["n"] == 4
    assert provenance["model"] == str(model_dir)
    assert provenance["stats"]["rows"] == output.stats.rows
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 24
    with pytest.raises(ConfigError, match="already exists"):
        sample(config)


def test_best_of_n_command_writes_sft_rows(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    _write_prompts(tmp_path, ["1+2", "3+4"])
    output = sample(_config(tmp_path, model_dir, strategy="best_of_n"))
    rows = load_rows([str(tmp_path / "out" / "best_of_n.jsonl")])
    data, _ = tokenize_sft(rows, build_char_tokenizer(), DataConfig())
    assert len(data) == output.stats.rows == 2


def test_empty_prompt_is_a_data_error_naming_the_row(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    _write_prompts(tmp_path, ["1+2", "  "])
    with pytest.raises(DataError, match="line 2.*empty prompt"):
        sample(_config(tmp_path, model_dir))


def _saved_reward_model(folder):
    """A random one-label Llama sequence classifier with the char tokenizer: a stand-in reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scores_next_to_reward_functions(tmp_path):
    pytest.importorskip("prefalign.rewards.scorer", reason="the reward-model scorer is not in this checkout")
    from prefalign.algorithms.rejection_sampling import build_rewards

    folder = _saved_reward_model(tmp_path / "rm")
    settings = RejectionSamplingConfig(
        n=3, max_new_tokens=4, temperature=1.5, reward_functions=[DIGIT_COUNT],
        reward_weights=[0.0], reward_model=str(folder), reward_model_weight=2.0,
    )  # fmt: skip
    rewards = build_rewards(settings, device="cpu")
    assert len(rewards.names) == 2 and rewards.weights == [0.0, 2.0]
    model, tokenizer = tiny_model()
    prompts = _prompts(tokenizer, ["1+2", "3+4"])
    output = rejection_sample(model, tokenizer, prompts, rewards, settings, seed=0)
    model_scores = [s[f"score/{rewards.names[1]}"] for s in output.samples]
    assert all(isinstance(value, float) for value in model_scores)
    # digit_count has weight 0, so each total is exactly twice the reward model's score.
    assert [s["score"] for s in output.samples] == pytest.approx([2.0 * value for value in model_scores])
    assert len(set(model_scores)) > 1  # distinct completions get distinct scores: pairs can form


def test_prompt_index_points_into_the_given_prompts_after_context_drops(caplog):
    model, tokenizer = tiny_model()  # context: 128 positions
    # Prompt 0 is dropped (over the context); the others keep their own positions 1 and 2, in rows, samples
    # and failure reports (renumbered 0 and 1 they would name the wrong prompt of the user's data).
    prompts = _prompts(tokenizer, ["9" * 126, "good 1+1", "bad 2+2"])
    settings = RejectionSamplingConfig(n=2, max_new_tokens=4, strategy="best_of_n")
    rewards = WeightedRewards([fails_for_bad_prompt])
    output = rejection_sample(model, tokenizer, prompts, rewards, settings, seed=0)
    assert output.stats.dropped_over_context == 1
    assert [row["prompt_index"] for row in output.rows] == [1]
    assert output.rows[0]["answer"] == "1"  # _prompts writes each prompt's position as its `answer`
    assert sorted({sample["prompt_index"] for sample in output.samples}) == [1, 2]
    assert output.stats.failure_examples[0].startswith(
        "reward function 'fails_for_bad_prompt' on prompt 2, sample 0"
    )


def test_sampled_texts_win_over_same_named_prompt_columns():
    # Prompts taken from a preference or SFT file still carry its chosen/rejected/completion columns: the rows
    # must hold the sampled answers and their scores, not the file's static ones.
    group = _group(("12", 2.0, False, "eos"), ("1", 1.0, False, "eos"))
    # The file's margin belongs to its static pair: carried over, reward training would subtract it on the
    # sampled one.
    prompt_row = {
        "prompt": "p", "prompt_ids": [1], "chosen": "static good", "rejected": "static bad", "margin": 3.0,
        "score": 9.0, "answer": "12",
    }
    rows = rows_for_prompt(prompt_row, group, RejectionSamplingConfig(), random.Random(0), SampleStats())
    assert rows == [{
        "prompt": "p", "chosen": "12", "rejected": "1", "chosen_score": 2.0, "rejected_score": 1.0,
        "score": 9.0, "answer": "12",
    }]
    sft_row = {"prompt": "p", "completion": "static answer", "score": 9.0}
    best_of_n = RejectionSamplingConfig(strategy="best_of_n")
    rows = rows_for_prompt(sft_row, group, best_of_n, random.Random(0), SampleStats())
    assert rows == [{"prompt": "p", "completion": "12", "score": 2.0}]
    rows = rows_for_prompt(sft_row, group, RejectionSamplingConfig(), random.Random(0), SampleStats())
    # a pair row with a stray static completion would read as another format
    assert "completion" not in rows[0]


def token_count(prompts, completions, completion_ids, **_):
    """A TRL-style reward on the sampled token ids (GRPO passes them; so must rejection sampling)."""
    return [float(len(ids)) for ids in completion_ids]


def test_reward_functions_receive_completion_ids_as_in_grpo():
    model, tokenizer = tiny_model()
    settings = RejectionSamplingConfig(n=3, max_new_tokens=5, temperature=1.5)
    prompts = _prompts(tokenizer, ["1+2", "3+4"])
    output = rejection_sample(model, tokenizer, prompts, WeightedRewards([token_count]), settings, seed=0)
    assert output.stats.reward_failures == 0  # it failed on every sample: completion_ids was never passed
    scores = [sample["score"] for sample in output.samples]
    assert scores == [float(sample["num_tokens"]) for sample in output.samples]


def never_applies(prompts, completions, **_):
    return [None] * len(completions)


def always_raises(prompts, completions, **_):
    raise KeyError("answer")


@pytest.mark.parametrize(
    ("function", "cause"),
    [
        (never_applies, r"reward function\(s\) 'never_applies' returned None for every sample"),
        (always_raises, "the reward failed on 8 of 8 samples.*always_raises.*KeyError"),
    ],
)
def test_when_no_sample_is_scored_the_error_names_the_reward_not_more_sampling(tmp_path, function, cause):
    model_dir = save_tiny_model(tmp_path / "model")
    _write_prompts(tmp_path, ["1+2", "3+4"])
    config = _config(tmp_path, model_dir)
    config.sampling.reward_functions = [function]
    with pytest.raises(DataError, match=f"no sample got a score: {cause}") as error:
        sample(config)
    assert "Sample more" not in str(error.value) and "sampling more would not help" in str(error.value)
