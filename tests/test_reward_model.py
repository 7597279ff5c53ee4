"""Reward-model training: collation of a conversational pair as exact tensors, left truncation and dropped
identical pairs, the loss wiring, held-out metrics against hand-computed numbers, save -> reload with plain
transformers (full and LoRA), `eval-reward`, and clear errors.

Char tokenizer ids: pad 0, bos 1, end/eos 2, <|user|> 5, <|assistant|> 6, newline 7, other printable
characters ord(c) - 24 (e.g. '1' 25, '+' 19, '2' 26, '3' 27, 'a' 73).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefalign.algorithms.reward_model import RewardConfig, make_reward_loss, train_reward_model
from prefalign.cli import main
from prefalign.config import DataConfig
from prefalign.errors import DataError, ModelError
from prefalign.evaluation.pairs import pair_metrics, pearson, roc_auc, wilson_interval
from prefalign.rewards import RewardModelScorer
from prefalign.rewards.scorer import RewardSettings, collate_pairs, encode_pairs
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.helpers import save_tiny_model

PAD, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 5, 6


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- data -> batches


def test_conversational_pair_collates_to_exact_tensors():
    tokenizer = build_char_tokenizer()
    rows = [{"prompt": [user("1+1")], "chosen": [assistant("2")], "rejected": [assistant("33")], "margin": 0.5}]
    examples, stats = encode_pairs(rows, tokenizer, RewardSettings(rendering="chat_template", max_length=64))
    # <bos><|user|>1+1<|end|><|assistant|> then the completion and its <|end|> (= EOS, written by the template)
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
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 25, 19, 25, 2, 6, 26, 2, 0], [1, 5, 25, 19, 25, 2, 6, 27, 27, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 10]))
    assert torch.equal(batch["margin"], torch.tensor([0.5]))
    assert batch["input_ids"].dtype == torch.long and (stats.kept, stats.truncated_sequences) == (1, 0)


def test_left_truncation_and_pairs_identical_after_it_are_dropped():
    tokenizer = build_char_tokenizer()
    rows = [
        # chosen <bos>xaab<eos>, rejected <bos>xab<eos>: the last 3 tokens after <bos> are 'a','b',<eos> on both sides
        {"prompt": "xa", "chosen": "ab", "rejected": "b"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    examples, stats = encode_pairs(rows, tokenizer, RewardSettings(rendering="plain", max_length=4), DataConfig())
    assert (stats.rows, stats.kept, stats.dropped_identical) == (2, 1, 1)
    assert stats.truncated_sequences == 4  # both sides of both pairs exceed 4 tokens
    assert examples[0]["chosen_ids"] == [BOS, 37, 26, EOS]  # <bos> kept, then '=', '2', <eos>: the final tokens
    assert examples[0]["rejected_ids"] == [BOS, 37, 27, EOS]


def test_missing_column_and_empty_completion_are_clear_errors():
    tokenizer = build_char_tokenizer()
    settings = RewardSettings(rendering="chat_template", max_length=64)
    with pytest.raises(DataError, match=r"needs column\(s\) 'rejected'.*data.columns"):
        encode_pairs([{"prompt": "a", "chosen": "b"}], tokenizer, settings)
    with pytest.raises(DataError, match=r"row 1, column 'rejected': empty completion"):
        encode_pairs([{"prompt": "a", "chosen": "b", "rejected": " "}], tokenizer, settings)


# ----------------------------------------------------------------------------- loss wiring and metrics


class FixedScores(torch.nn.Module):
    """Scores looked up by each row's second token, so a test knows r_w and r_l exactly."""

    def __init__(self, table: dict[int, float]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(100))
        with torch.no_grad():
            for token, value in table.items():
                self.weight[token] = value

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.weight[input_ids[:, 1]].unsqueeze(-1))


def test_reward_loss_sums_over_pairs_with_margin_and_metrics():
    model = FixedScores({10: 1.0, 11: 0.5, 12: 0.0, 13: 1.0})
    examples = [
        {"chosen_ids": [1, 10], "rejected_ids": [1, 12], "margin": 0.5},
        {"chosen_ids": [1, 11], "rejected_ids": [1, 13], "margin": 0.5},
    ]
    batch = collate_pairs(examples, 0)
    output = make_reward_loss(0.0, use_margin=True)(model, batch)
    # −log σ(1 − 0 − 0.5) = 0.474077; −log σ(0.5 − 1 − 0.5) = 1.313262; summed over the 2 pairs = 1.787339
    assert output.loss_sum.item() == pytest.approx(1.787339, abs=1e-6)
    plain = make_reward_loss(0.0, use_margin=False)(model, batch)
    assert plain.loss_sum.item() == pytest.approx(2 * 0.643669, abs=1e-6)  # (0.313262 + 0.974077)
    # metrics are sums over pairs (the runtime divides by the step's pairs): accuracy 0.5 → 1.0
    assert output.metrics["accuracy"] == pytest.approx(1.0)
    assert output.metrics["margin"] == pytest.approx(0.5)  # mean(1, −0.5) = 0.25, times 2
    # scores [1, 0.5, 0, 1]: mean 0.625, population std sqrt(0.6875 / 4) = 0.414578, min 0, max 1
    assert output.metrics["mean_reward"] == pytest.approx(1.25)
    assert output.metrics["std_reward"] == pytest.approx(0.829156, abs=1e-6)
    assert (output.metrics["min_reward"], output.metrics["max_reward"]) == pytest.approx((0.0, 2.0))
    assert output.tokens == 8
    output.loss_sum.backward()
    assert model.weight.grad[10].item() != 0


def test_wilson_interval_pearson_and_auc_by_hand():
    # 60 of 100: centre (0.6 + z²/200) / (1 + z²/100) = 0.596300, half-width 0.094298
    low, high = wilson_interval(60, 100)
    assert (low, high) == pytest.approx((0.502002, 0.690598), abs=1e-6)
    # cov 5, var_x 2, var_y 12.666667: 5 / sqrt(25.333333) = 0.993399
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0]) == pytest.approx(0.993399, abs=1e-6)
    assert pearson([1.0, 2.0], [3.0, 3.0]) is None
    # positives 0.9, 0.3 vs negatives 0.8, 0.3: win, win, loss, tie → 2.5 / 4
    assert roc_auc([0.9, 0.8, 0.3, 0.3], [True, False, True, False]) == pytest.approx(0.625)
    metrics = pair_metrics([2.0, 0.0], [1.0, 1.0], [3, 1], [2, 2])
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx(0.0)
    # rewards [2, 0, 1, 1] vs lengths [3, 1, 2, 2]: perfectly correlated
    assert metrics["length_correlation"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- training, saving, reloading


def _pairs(count: int) -> datasets.Dataset:
    rows = []
    for index in range(count):
        a, b = index % 10, (3 * index) % 10
        rows.append({"prompt": [user(f"{a}+{b}")], "chosen": [assistant(str(a + b))], "rejected": [assistant(str(a + b + 1))]})
    return datasets.Dataset.from_list(rows)


def _config(tmp_path, backbone, **train) -> RewardConfig:
    config = RewardConfig()
    config.model.name_or_path = str(backbone)
    config.model.device = "cpu"
    config.train.output_dir = str(tmp_path / "run")
    config.train.progress = False
    config.train.learning_rate = 3e-3
    config.train.batch_size = 4
    config.train.max_steps = train.get("max_steps", 6)
    config.data.max_length = 32
    return config


@pytest.mark.parametrize("lora", [False, True])
def test_train_save_and_reload_with_plain_transformers_same_scores(tmp_path, lora):
    backbone = save_tiny_model(tmp_path / "backbone")
    config = _config(tmp_path, backbone)
    config.model.lora = lora
    config.model.lora_r = 4
    config.group_by_length = not lora  # both batching paths
    result = train_reward_model(config, dataset=_pairs(24), eval_dataset=_pairs(8))
    assert result.step == 6 and result.model_dir == tmp_path / "run" / "final"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "mean_reward", "std_reward", "min_reward", "max_reward"} <= set(metrics[0])
    assert "eval/accuracy" in metrics[-1] and result.evaluation["num_pairs"] == 8

    saved = json.loads((result.model_dir / "prefalign_reward.json").read_text())
    assert saved["rendering"] == "chat_template" and saved["max_length"] == 32
    assert saved["reward_std"] > 0 and saved["reward_mean"] == pytest.approx(result.settings.reward_mean)

    tokenizer = build_char_tokenizer()
    examples, _ = encode_pairs(_pairs(8), tokenizer, result.settings)
    sequences = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    plain = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        plain_scores = [plain(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    reloaded = RewardModelScorer(str(result.model_dir), device="cpu")
    assert reloaded.settings.reward_mean == pytest.approx(result.settings.reward_mean)
    assert reloaded.score_sequences(sequences) == pytest.approx(plain_scores, abs=1e-5)
    # the held-out accuracy computed during training is what the reloaded model gives
    chosen, rejected = plain_scores[:8], plain_scores[8:]
    assert result.evaluation["accuracy"] == sum(w > r for w, r in zip(chosen, rejected, strict=True)) / 8
    assert result.evaluation["margin"] == pytest.approx(sum(w - r for w, r in zip(chosen, rejected, strict=True)) / 8, abs=1e-5)
    if lora:
        assert (result.model_dir / "adapter" / "adapter_config.json").exists()
        initial = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
        assert initial.score.weight.shape == plain.score.weight.shape  # the head was trained and saved merged
        assert not torch.allclose(initial.score.weight, plain.score.weight)


def test_eval_reward_command_and_eval_only(tmp_path, capsys):
    backbone = save_tiny_model(tmp_path / "backbone")
    result = train_reward_model(_config(tmp_path, backbone, max_steps=2), dataset=_pairs(8))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(row) + "\n" for row in _pairs(10).to_list()))
    out = tmp_path / "eval"
    assert main(["eval-reward", "--model", str(result.model_dir), "--data.path", str(held_out), "--output_dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "| accuracy |" in printed and "| accuracy_ci95_low |" in printed and "| length_correlation |" in printed
    report = json.loads((out / "eval_reward.json").read_text())
    assert report["num_pairs"] == 10 and report["accuracy_ci95_low"] <= report["accuracy"] <= report["accuracy_ci95_high"]
    assert main([
        "reward", "--eval-only", "--model.name_or_path", str(result.model_dir), "--data.eval_path", str(held_out),
        "--train.output_dir", str(tmp_path / "eval2"), "--model.device", "cpu",
    ]) == 0
    assert json.loads((tmp_path / "eval2" / "eval_reward.json").read_text())["accuracy"] == report["accuracy"]


def test_backbone_errors(tmp_path):
    config = _config(tmp_path, tmp_path / "nothing-here")
    with pytest.raises(ModelError, match="could not read a model config from .*nothing-here"):
        train_reward_model(config, dataset=_pairs(4))
    two_labels = tmp_path / "two"
    model = AutoModelForSequenceClassification.from_pretrained(save_tiny_model(tmp_path / "lm"), num_labels=2)
    model.save_pretrained(two_labels)
    build_char_tokenizer().save_pretrained(two_labels)
    config = _config(tmp_path, two_labels)
    config.train.output_dir = str(tmp_path / "run2")
    with pytest.raises(ModelError, match="2 labels"):
        train_reward_model(config, dataset=_pairs(4))


def test_example_config_is_the_builtin_recipe():
    from pathlib import Path

    from prefalign.commands.demo_recipes import REWARD
    from prefalign.config import apply_overrides, load_config

    loaded = load_config(RewardConfig, Path(__file__).resolve().parents[1] / "examples" / "reward.yaml")
    recipe = apply_overrides(RewardConfig(), REWARD)
    assert (loaded.model.name_or_path, loaded.data.path, loaded.data.max_length) == ("builtin", ["builtin"], recipe.data.max_length)
    for key in ("learning_rate", "batch_size", "max_steps", "warmup_ratio", "schedule"):
        assert getattr(loaded.train, key) == getattr(recipe.train, key), key
    assert (loaded.rendering, loaded.group_by_length, loaded.mixed_precision) == ("auto", True, "auto")


def test_length_grouped_batches_cover_every_pair_once_with_similar_lengths():
    from prefalign.algorithms.reward_model import length_grouped_batches

    examples = [{"chosen_ids": [1] * (index % 7 + 2), "rejected_ids": [1] * 3, "index": index} for index in range(50)]
    batches = length_grouped_batches(examples, batch_size=4, seed=0, group=5)  # groups of 20 pairs
    assert sorted(e["index"] for batch in batches for e in batch) == list(range(50))
    assert [len(batch) for batch in batches] == [4] * 5 + [4] * 5 + [4, 4, 2]
    for batch in batches:  # sorted inside each group, so a batch spans few lengths
        lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in batch]
        assert lengths == sorted(lengths)
    assert batches == length_grouped_batches(examples, batch_size=4, seed=0, group=5)  # seeded


def test_length_grouped_batches_cut_padding_on_mixed_lengths():
    import random

    from prefalign.algorithms.reward_model import length_grouped_batches

    # 96 pairs, longer sides 3..50 tokens in a scrambled order, batches of 8 pairs, groups of 4 batches.
    widths = [3 + (index * 37) % 48 for index in range(96)]
    examples = [{"chosen_ids": [1] * width, "rejected_ids": [2] * (width - 1), "index": index} for index, width in enumerate(widths)]

    def padded_tokens(batches):  # chosen and rejected rows padded to the batch's longest
        return sum(2 * len(batch) * max(len(e["chosen_ids"]) for e in batch) for batch in batches)

    grouped = length_grouped_batches(examples, batch_size=8, seed=3, group=4)
    order = [e["index"] for batch in grouped for e in batch]
    assert sorted(order) == list(range(96))  # a permutation: every pair once
    assert order == [e["index"] for batch in length_grouped_batches(examples, batch_size=8, seed=3, group=4) for e in batch]
    assert order != [e["index"] for batch in length_grouped_batches(examples, batch_size=8, seed=4, group=4) for e in batch]
    shuffled = list(examples)
    random.Random(3).shuffle(shuffled)
    plain = [shuffled[start : start + 8] for start in range(0, 96, 8)]
    real = sum(2 * width - 1 for width in widths)
    # Sorted inside groups of 32 pairs, a batch spans about a quarter of the length range instead of most of
    # it: the pad tokens drop from 3,568 to 1,072 here (4,992 real ones); asserted: by more than half.
    assert padded_tokens(grouped) - real < 0.5 * (padded_tokens(plain) - real)


def test_grouped_training_resumes_exactly(tmp_path):
    """Length-grouped batches: a run cut after step 3 (of 8; an epoch is 6 batches) and resumed ends with the
    same weights and the same losses as the uninterrupted run."""
    import shutil

    backbone = save_tiny_model(tmp_path / "backbone")

    def run(name, *, resume=False, save_every=0):
        config = _config(tmp_path, backbone, max_steps=8)
        config.train.output_dir, config.train.resume, config.train.save_every = str(tmp_path / name), resume, save_every
        config.train.log_every, config.normalization_pairs = 1, 4
        assert config.group_by_length
        return train_reward_model(config, dataset=_pairs(24), save=False)

    full = run("full")
    run("cut", save_every=3)
    checkpoints = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000003", "step-000006"]
    shutil.rmtree(checkpoints[1])  # as if the run had stopped after step 3
    resumed = run("cut", resume=True)
    assert [m["step"] for m in resumed.metrics] == [4, 5, 6, 7, 8]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics[3:]]
    assert resumed.settings.reward_mean == full.settings.reward_mean  # same final weights, same scores


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_while_training_unless_asked(tmp_path, disable):
    from prefalign.config import ModelConfig
    from prefalign.rewards.scorer import load_reward_backbone

    model, tokenizer = load_reward_backbone(ModelConfig(name_or_path=str(save_tiny_model(tmp_path / "backbone")), device="cpu"))
    model.model.layers[0].mlp.add_module("extra_dropout", torch.nn.Dropout(0.3))  # Llama has none of its own
    config = _config(tmp_path, tmp_path / "backbone", max_steps=1)
    config.disable_dropout, config.normalization_pairs = disable, 4
    train_reward_model(config, dataset=_pairs(8), model=model, tokenizer=tokenizer, save=False)
    assert model.model.layers[0].mlp.extra_dropout.p == (0.0 if disable else 0.3)


def test_bf16_autocast_decision():
    from prefalign.models.forward import cpu_has_native_bf16, use_bf16_autocast

    cpu = torch.device("cpu")
    assert use_bf16_autocast("no", cpu, 4096) is False
    assert use_bf16_autocast("bf16", cpu, 32) is True
    assert use_bf16_autocast("auto", cpu, 128) is False  # small matmuls: casting costs more than it saves
    assert use_bf16_autocast("auto", cpu, 384) is cpu_has_native_bf16()


@pytest.mark.slow
def test_builtin_recipe_held_out_accuracy(tmp_path):
    """The built-in recipe end to end (minutes; builds the base model when it is not cached)."""
    from prefalign import reward
    from prefalign.commands.demo_recipes import REWARD
    from prefalign.config import apply_overrides

    config = apply_overrides(RewardConfig(), REWARD)
    config.train.output_dir, config.train.progress = str(tmp_path / "run"), False
    result = reward(config)
    # Measured 0.862 for this recipe (seed 0, 1 thread; BENCHMARKS.md); the 0.95 is not reached by this budget.
    assert result.evaluation["num_pairs"] == 500 and result.evaluation["accuracy"] >= 0.75


def test_negative_or_nan_centering_is_refused_before_training(tmp_path):
    from prefalign.errors import ConfigError

    for bad in (-0.01, float("nan")):
        config = _config(tmp_path, str(tmp_path / "never-loaded"))
        config.center_rewards_coefficient = bad
        with pytest.raises(ConfigError, match="center_rewards_coefficient must be >= 0"):
            train_reward_model(config, dataset=_pairs(4))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
