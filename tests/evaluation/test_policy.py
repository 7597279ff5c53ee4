"""evaluate_policy: greedy accuracy, pass@k and the KL to a reference, and what reward functions receive."""

from __future__ import annotations

import pytest
import torch

from prefalign.config import DataConfig
from prefalign.data import tokenize_prompts
from prefalign.evaluation.policy import evaluate_policy
from prefalign.rewards import WeightedRewards, register_reward_function
from prefalign.tasks import arithmetic
from tests.helpers import assistant, tiny_model


def held_out_prompts(tokenizer, count=6):
    prompts, _ = tokenize_prompts(arithmetic.prompt_dataset("held_out", limit=count), tokenizer, DataConfig())
    return prompts


def test_evaluate_policy_counts_and_kl():
    torch.manual_seed(0)
    model, tokenizer = tiny_model(0)
    other, _ = tiny_model(1)
    register_reward_function("always_one", lambda prompts, completions, **_: [1.0] * len(completions))
    prompts = held_out_prompts(tokenizer)
    perfect = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["always_one"]), k=4, max_new_tokens=4, reference=model,
    )
    assert perfect["accuracy"] == 1.0 and perfect["pass@4"] == 1.0 and perfect["num_prompts"] == 6
    assert perfect["kl"] == pytest.approx(0.0, abs=1e-4)  # KL of a model to itself
    random_model = evaluate_policy(
        model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=4, max_new_tokens=4, reference=other,
    )
    assert random_model["accuracy"] == 0.0  # an untrained model does not add numbers
    assert random_model["kl"] > 0.01  # two different random models


def test_evaluate_policy_gives_reward_functions_what_sampling_and_grpo_give():
    model, tokenizer = tiny_model(0)
    seen = []

    def record(prompts, completions, completion_ids, **_):
        seen.extend(zip(completions, completion_ids, strict=True))
        return [0.0] * len(completions)

    prompts = held_out_prompts(tokenizer)  # conversational prompts (lists of messages)
    evaluate_policy(model, tokenizer, prompts, WeightedRewards([record]), k=2, max_new_tokens=3)
    assert len(seen) == 6 + 6 * 2  # greedy, then k samples per prompt
    for completion, ids in seen:
        assert completion == [assistant(tokenizer.decode(ids, skip_special_tokens=True))]
