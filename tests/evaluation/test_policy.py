"""evaluate_policy: greedy accuracy, pass@k and the KL to a reference, and what reward functions receive."""

from __future__ import annotations

import copy

import pytest
import torch

from prefalign.config import DataConfig, ModelConfig
from prefalign.data import tokenize_prompts
from prefalign.evaluation.policy import evaluate_policy
from prefalign.models.loading import apply_lora
from prefalign.models.reference import Reference
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


def test_kl_without_pass_at_k_uses_one_sample_per_prompt():
    """k = 0 still gives the KL (eval/kl of RL runs): on one sample per prompt, the sample k = 1 draws."""
    model, tokenizer = tiny_model(0)
    other, _ = tiny_model(1)
    prompts = held_out_prompts(tokenizer)
    rewards = WeightedRewards(["exact_match"])
    alone = evaluate_policy(
        model, tokenizer, prompts, rewards, k=0, max_new_tokens=4, reference=other, seed=5
    )
    with_pass = evaluate_policy(
        model, tokenizer, prompts, rewards, k=1, max_new_tokens=4, reference=other, seed=5
    )
    # k1 on 6 samples may have either sign; two different random models give a clearly non-zero estimate.
    assert "pass@1" not in alone and abs(alone["kl"]) > 0.01
    assert alone["kl"] == pytest.approx(with_pass["kl"], rel=1e-6)
    assert "kl" not in evaluate_policy(model, tokenizer, prompts, rewards, k=0, max_new_tokens=4)


def test_kl_to_a_lora_policys_reference_turns_the_adapters_off_only_for_the_reference():
    """A Reference with adapters off (a LoRA run's π_ref) gives the KL to the bare base, the same number as a
    separate copy of the base; the policy's own samples still come with its adapters on."""
    model, tokenizer = tiny_model(0)
    base = copy.deepcopy(model).eval()
    policy = apply_lora(model, ModelConfig(lora=True, lora_r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 2.0)  # move the policy away from its base
    prompts = held_out_prompts(tokenizer, count=30)
    rewards = WeightedRewards(["exact_match"])
    kwargs = dict(k=4, max_new_tokens=4, seed=1)
    through_reference = evaluate_policy(
        policy, tokenizer, prompts, rewards, reference=Reference(policy), **kwargs
    )
    through_copy = evaluate_policy(policy, tokenizer, prompts, rewards, reference=base, **kwargs)
    assert through_reference["kl"] > 0.01
    assert through_reference["kl"] == pytest.approx(through_copy["kl"], rel=1e-5)
