"""The built-in task, the base-model builder and cache, and evaluation metrics."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.config import DataConfig
from prefalign.data import tokenize_prompts
from prefalign.evaluation.policy import evaluate_policy
from prefalign.recipes.base_model import BaseConfig, cache_key, ensure_base_model
from prefalign.rewards import WeightedRewards, register_reward_function
from prefalign.tasks import arithmetic
from tests.helpers import tiny_model


def test_task_splits_are_disjoint_and_fixed():
    held_out, train = arithmetic.problems("held_out"), arithmetic.problems("train")
    assert len(held_out) == 500 and len(train) == 9500
    assert not set(held_out) & set(train)
    assert held_out[:3] == arithmetic.problems("held_out")[:3]


def test_exact_match_ignores_format_details():
    completions = ["68", " 68.", "= 68", "The answer is 68", "86", "", [{"role": "assistant", "content": "68"}]]
    rewards = arithmetic.exact_match_reward(None, completions, ["68"] * len(completions))
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_near_misses_are_wrong_and_plausible():
    # 27 + 15 = 42: digit off by one (41, 43), off by ten (32, 52), dropped carry (32), swapped digits (24).
    assert arithmetic.near_misses(27, 15) == [24, 32, 41, 43, 52]
    for a, b in arithmetic.problems("train")[:200]:
        assert all(m != a + b and m >= 0 for m in arithmetic.near_misses(a, b))
    pairs = arithmetic.preference_dataset("train", limit=50)
    assert all(row["chosen"] != row["rejected"] for row in pairs)


def test_base_builder_caches_and_records_its_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))
    config = BaseConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=4, batch_size=8, eval_prompts=8)
    path = ensure_base_model(config)
    assert path.name == f"base-{cache_key(config)}" and path.parent == tmp_path / "cache"
    summary = json.loads((path / "prefalign_base.json").read_text())
    assert summary["sft_steps"] == 4 and 0.0 <= summary["greedy_accuracy"] <= summary["pass@8_t1"] <= 1.0
    card = (path / "README.md").read_text()
    assert f"held-out greedy accuracy**: {summary['greedy_accuracy']:.3f}" in card and "pass@8" in card
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(config) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert cache_key(BaseConfig(steps=5)) != cache_key(BaseConfig(steps=6))


def _prompts(tokenizer, count=6):
    prompts, _ = tokenize_prompts(arithmetic.prompt_dataset("held_out", limit=count), tokenizer, DataConfig())
    return prompts


def test_evaluate_policy_counts_and_kl():
    torch.manual_seed(0)
    model, tokenizer = tiny_model(0)
    other, _ = tiny_model(1)
    register_reward_function("always_one", lambda prompts, completions, **_: [1.0] * len(completions))
    prompts = _prompts(tokenizer)
    perfect = evaluate_policy(model, tokenizer, prompts, WeightedRewards(["always_one"]), k=4, max_new_tokens=4, reference=model)
    assert perfect["accuracy"] == 1.0 and perfect["pass@4"] == 1.0 and perfect["num_prompts"] == 6
    assert perfect["kl"] == pytest.approx(0.0, abs=1e-4)  # KL of a model to itself
    random_model = evaluate_policy(model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=4, max_new_tokens=4, reference=other)
    assert random_model["accuracy"] == 0.0  # an untrained model does not add numbers
    assert random_model["kl"] > 0.01  # two different random models


def test_evaluate_policy_gives_reward_functions_what_sampling_and_grpo_give():
    model, tokenizer = tiny_model(0)
    seen = []

    def record(prompts, completions, completion_ids, **_):
        seen.extend(zip(completions, completion_ids, strict=True))
        return [0.0] * len(completions)

    prompts = _prompts(tokenizer)  # conversational prompts (lists of messages)
    evaluate_policy(model, tokenizer, prompts, WeightedRewards([record]), k=2, max_new_tokens=3)
    assert len(seen) == 6 + 6 * 2  # greedy, then k samples per prompt
    for completion, ids in seen:
        assert completion == [{"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}]


def test_base_build_is_deterministic_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    config = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3, batch_size=8, eval_prompts=4)
    first = ensure_base_model(BaseConfig(**config, output_dir=str(tmp_path / "a")))
    second = ensure_base_model(BaseConfig(**config, output_dir=str(tmp_path / "b")))
    other_seed = ensure_base_model(BaseConfig(**config, seed=7, output_dir=str(tmp_path / "c")))
    weights = [load_file(str(path / "model.safetensors")) for path in (first, second, other_seed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
