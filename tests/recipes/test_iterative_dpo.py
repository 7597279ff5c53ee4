"""Iterative DPO: prompts from the rows, rounds in turn, config checks, reference choice, the whole loop and
its report."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file

from prefalign import IterativeDPOConfig, dpo
from prefalign.algorithms.dpo_pairs import sequence_logps, tokenized_pairs
from prefalign.config import DataConfig, ModelConfig
from prefalign.data import load_rows, tokenize_preference
from prefalign.errors import ConfigError, DataError
from prefalign.models.loading import apply_lora
from prefalign.models.reference import frozen_copy
from prefalign.recipes import iterative_dpo as iterative
from prefalign.recipes.iterative_dpo import prompt_rows, round_prompts
from tests.helpers import tiny_model


def digit_count(prompts, completions, **_):
    return [float(sum(character.isdigit() for character in completion)) for completion in completions]


def test_prompt_rows_dedupes_and_keeps_extra_columns():
    rows = datasets.Dataset.from_list([
        {"prompt": "1+1", "chosen": "2", "rejected": "3", "answer": "2"},
        {"prompt": "1+1", "chosen": "2", "rejected": "4", "answer": "2"},
        {"prompt": "2+2", "chosen": "4", "rejected": "5", "answer": "4"},
    ])
    prompts = prompt_rows(rows)
    assert prompts.column_names == ["prompt", "answer"]
    assert prompts.to_list() == [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    with pytest.raises(DataError, match="no `prompt` column"):
        prompt_rows(datasets.Dataset.from_list([{"chosen": "a b", "rejected": "a c"}]))


def test_rounds_take_prompts_in_turn_and_wrap():
    pool = datasets.Dataset.from_list([{"prompt": str(index)} for index in range(10)])
    taken = [[row["prompt"] for row in round_prompts(pool, k, 4)] for k in (1, 2, 3)]
    assert taken == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9", "0", "1"]]
    assert len(round_prompts(pool, 2, 0)) == 10  # 0 = every prompt every round


def test_bad_iterative_settings_are_config_errors(tmp_path):
    """Refused before anything loads: the model folder does not exist, and no run folder is made."""

    def config(**changes):
        base = IterativeDPOConfig()
        base.model.name_or_path = str(tmp_path / "never-loaded")
        base.train.output_dir = str(tmp_path / "run")
        for key, value in changes.items():
            target, _, name = key.rpartition(".")
            setattr(getattr(base, target) if target else base, name, value)
        return base

    with pytest.raises(ConfigError, match="iterative DPO trains on pairs"):
        iterative.iterative_dpo(config(**{"sampling.strategy": "best_of_n"}))
    with pytest.raises(ConfigError, match="needs at least 2 samples"):
        iterative.iterative_dpo(config(**{"sampling.n": 1}))
    with pytest.raises(ConfigError, match="round_reference=previous"):
        iterative.iterative_dpo(config(round_reference="previous", reference="some/model"))
    with pytest.raises(ConfigError, match="resume is not supported"):
        iterative.iterative_dpo(config(**{"train.resume": True}))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the whole loop


def _rows(count: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": f"{a}+{a + 2}=", "chosen": str(2 * a + 2), "rejected": str(2 * a + 3),
         "answer": str(2 * a + 2)}
        for a in range(offset, offset + count)
    ])  # fmt: skip


def _config(tmp_path, reference: str = "original") -> IterativeDPOConfig:
    config = IterativeDPOConfig(round_reference=reference, model=ModelConfig(device="cpu"))
    config.train.output_dir = str(tmp_path / "run")
    config.train.max_steps = 2
    config.train.batch_size = 4
    config.train.progress = False
    config.sampling.n = 4
    config.sampling.temperature = 1.5
    config.sampling.max_new_tokens = 4
    config.sampling.prompts_per_round = 6
    config.sampling.eval_prompts = 4
    config.sampling.reward_functions = ["tests.recipes.test_iterative_dpo:digit_count"]
    return config


def test_two_rounds_write_pairs_metrics_report_and_final(tmp_path):
    model, tokenizer = tiny_model()
    config = _config(tmp_path)
    eval_rows = _rows(4, offset=50)
    result = dpo(config, dataset=_rows(12), eval_dataset=eval_rows, model=model, tokenizer=tokenizer)
    run = tmp_path / "run"
    assert result.step == 4  # 2 rounds x 2 steps
    start, *records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the curve's first point
    assert start["round"] == 0 and start["step"] == 0 and "heldout/accuracy" in start
    assert [record["round"] for record in records] == [1, 2]
    assert [record["step"] for record in records] == [2, 4]
    for record in records:
        assert record["sample/prompts"] == 6 and record["sample/pairs"] > 0
        assert "heldout/accuracy" in record and "eval/rewards/accuracies" in record
    for round_index in (1, 2):
        pairs = load_rows([str(run / f"round-{round_index}" / "pairs.jsonl")])
        assert len(pairs) == records[round_index - 1]["sample/pairs"]
        tokenize_preference(pairs, tokenizer, DataConfig())
        assert all(row["chosen_score"] > row["rejected_score"] for row in pairs)
    report = (run / "report.md").read_text()
    assert "| round |" in report and report.count("\n| ") >= 4  # header + round 0 + two rounds
    assert (run / "final" / "config.json").exists()


@pytest.mark.parametrize(
    ("mode", "lora"), [("original", False), ("previous", False), ("original", True), ("previous", True)]
)
def test_reference_choice(tmp_path, monkeypatch, mode, lora):
    model, tokenizer = tiny_model()
    if lora:  # original = the base with adapters off; previous = a merged copy of round 1's result
        model = apply_lora(model, ModelConfig(lora=True, lora_r=4, lora_alpha=8))
    initial = frozen_copy(model)
    entering = []  # the policy as each round's DPO starts
    real_dpo = iterative.dpo  # each round runs plain DPO

    def spy(config, **kwargs):
        entering.append(frozen_copy(kwargs["model"]))
        return real_dpo(config, **kwargs)

    monkeypatch.setattr(iterative, "dpo", spy)
    config = _config(tmp_path, reference=mode)
    # round 1 must move the policy well beyond float noise
    config.train.learning_rate = 3e-2 if lora else 1e-2
    config.sampling.eval_prompts = 0
    if hasattr(config, "mixed_precision"):
        config.mixed_precision = "off"
    iterative.iterative_dpo(config, dataset=_rows(12), model=model, tokenizer=tokenizer, save=False)
    assert len(entering) == 2
    # Round 2's cached reference log-probs: the starting model's (original) or round 1's result (previous).
    cached = load_file(str(tmp_path / "run" / "round-2" / "ref_logps.safetensors"))["train/chosen"]
    rows = load_rows([str(tmp_path / "run" / "round-2" / "pairs.jsonl")])
    pairs, _ = tokenized_pairs(rows, tokenizer, config.data, "train")
    under_initial = sequence_logps(initial, pairs, tokenizer.pad_token_id, 64)["chosen"]
    under_round_one = sequence_logps(entering[1], pairs, tokenizer.pad_token_id, 64)["chosen"]
    assert not torch.allclose(under_initial, under_round_one, atol=1e-2)
    if mode == "original":
        expected, other = under_initial, under_round_one
    else:
        expected, other = under_round_one, under_initial
    assert torch.allclose(cached, expected, atol=1e-4)
    assert not torch.allclose(cached, other, atol=1e-2)


def test_report_names_the_per_round_budget(tmp_path):
    """report.md names each round's DPO budget: epochs over the round's pairs (it said "epochs steps"), or
    a number of steps."""
    budgets = {"epochs": (0, "2 epochs over each round's pairs."), "steps": (3, "3 DPO steps per round.")}
    for name, (max_steps, budget) in budgets.items():
        model, tokenizer = tiny_model()
        config = _config(tmp_path / name)
        config.train.max_steps, config.train.epochs = max_steps, 2.0
        config.sampling.eval_prompts = 0
        iterative.iterative_dpo(config, dataset=_rows(12), model=model, tokenizer=tokenizer, save=False)
        text = (tmp_path / name / "run" / "report.md").read_text()
        assert f"beta=0.1, {budget}" in text and "Reference: original" in text


def test_report_names_a_callable_scorer_by_its_qualified_name():
    from prefalign.recipes.iterative_dpo import report

    config = IterativeDPOConfig()
    config.sampling.reward_functions = [digit_count]
    assert "scorers=tests.recipes.test_iterative_dpo:digit_count" in report(config, [])
