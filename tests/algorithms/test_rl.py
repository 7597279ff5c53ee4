"""The RL core's source of optimizer steps: μ passes of whole-group steps over one rollout batch, reference
log-probs once per batch, and π_old from the training forward only when the batch feeds several steps."""

from __future__ import annotations

import pytest
import torch

from prefalign.algorithms.rl.experience import CompletionScorer
from prefalign.algorithms.rl.source import ExperienceSource, RolloutBatch
from prefalign.models.reference import Reference
from prefalign.rollout.engine import LocalEngine
from prefalign.rollout.types import SamplingParams
from tests.helpers import tiny_model, user

G = 4


def make_source(num_iterations: int, steps_per_generation: int, temperature: float, with_reference: bool):
    model, tokenizer = tiny_model(3)
    prompts = [
        list(ids)
        for ids in tokenizer.apply_chat_template(
            [[user(f"{a}+{a}")] for a in (1, 22)], add_generation_prompt=True
        )["input_ids"]
    ]
    params = SamplingParams(n=G, temperature=temperature, max_new_tokens=5, seed=0)
    groups = LocalEngine(model, tokenizer).generate(prompts, params)

    def collect(progress, next_prompt) -> RolloutBatch:
        rows = [
            {"prompt_ids": prompts[i], "completion_ids": s.token_ids, "sampler_logps": s.logprobs,
             "advantage": float(j) - 1.5, "reward": 0.0, "trained": True}
            for i, group in enumerate(groups) for j, s in enumerate(group)
        ]  # fmt: skip
        return RolloutBatch(rows=rows, group_size=G, metrics={"reward": 0.5})

    score = CompletionScorer(temperature=temperature)
    reference = Reference(model) if with_reference else None
    source = ExperienceSource(
        collect, num_prompts=2, seed=0, policy=model, score=score, reference=reference,
        num_iterations=num_iterations, steps_per_generation=steps_per_generation, micro_batch_size=3,
        pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"),
    )  # fmt: skip
    return source, model, score


def test_one_step_per_batch_needs_no_old_forward():
    source, _, _ = make_source(1, 1, 1.0, with_reference=False)
    phase = source.next_phase(step=0, steps_left=10)
    assert len(phase.steps) == 1 and [len(b["completion_ids"]) for b in phase.steps[0]] == [3, 3, 2]
    assert all(value is None for batch in phase.steps[0] for value in batch["old_logps"] + batch["ref_logps"])
    assert phase.metrics == {"reward": 0.5} and phase.generation


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_several_steps_take_pi_old_from_the_training_forward(temperature):
    source, model, score = make_source(2, 2, temperature, with_reference=True)
    phase = source.next_phase(step=0, steps_left=3)
    # μ = 2 passes × 2 steps of one whole group each, cut to the 3 steps left.
    assert len(phase.steps) == 3
    assert [sum(len(b["completion_ids"]) for b in step) for step in phase.steps] == [G, G, G]
    first = phase.steps[0][0]
    with torch.no_grad():
        expected = score(model, first)
    for values, row_mask, old, ref in zip(expected.token_logps, expected.mask, first["old_logps"],
                                          first["ref_logps"], strict=True):  # fmt: skip
        assert old == pytest.approx(values[row_mask.bool()].tolist(), abs=1e-6)
        assert ref == pytest.approx(old, abs=1e-6)  # the reference is the policy before any update
    # The sampler's numbers and the training forward's agree at the same weights and temperature (fp32).
    assert phase.metrics["rollout/logprob_diff_max"] < 1e-4
    assert 0 <= phase.metrics["rollout/logprob_diff_mean"] <= phase.metrics["rollout/logprob_diff_max"]


def test_a_temperature_mismatch_shows_in_the_logprob_difference():
    """The metric can fail: scoring at T = 1 what was sampled at T = 0.7 is far from the sampler's numbers."""
    source, _, _ = make_source(2, 1, 0.7, with_reference=False)
    source.score = CompletionScorer(temperature=1.0)
    assert source.next_phase(step=0, steps_left=2).metrics["rollout/logprob_diff_max"] > 1e-2


def test_a_reward_function_that_scored_nothing_has_no_metric_not_nan():
    from prefalign.algorithms.rl.rollout import function_means, reward_metrics

    means = function_means({"scored": [[1.0, None], [3.0, None]], "never": [[None, None], [None, None]]})
    assert means == {"rewards/scored/mean": 2.0}
    assert reward_metrics(torch.full((2, 2), float("nan"))) == {}
    assert reward_metrics(torch.tensor([[1.0, float("nan")]])) == {"reward": 1.0}  # one scored: no spread
    assert reward_metrics(torch.tensor([[1.0, float("nan")], [2.0, 2.0]])) == pytest.approx(
        {"reward": 5 / 3, "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    )
