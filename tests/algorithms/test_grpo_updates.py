"""GRPO's updates through its entry point: a second pass's clipping and KL recomputed by hand, accumulation
equivalence with rho != 1 and beta > 0, old log-probs, epochs, and DAPO's options (dynamic sampling,
masking)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.algorithms.grpo import grpo
from prefalign.tasks.arithmetic import prompt_dataset
from tests.algorithms.grpo_support import (
    StepSpy,
    eos_likely,
    make_config,
    plain_scores,
    policy_with,
    prompts,
    recompute_grpo_step,
    sgd_like,
)


def test_second_pass_clips_and_its_kl_match_a_recomputation(tmp_path, model_dir, tokenizer, monkeypatch):
    """μ = 2 at temperature 0.7 with a KL term, 3 steps: steps 1 and 2 are the two passes over the first
    rollout batch (π_old = the policy before step 1), step 3 the first pass over the next one (π_old = the
    policy before step 3); π_ref is the starting policy throughout. Each step's loss, KL, entropy and clip
    ratios are recomputed from plain forwards of the weights in play: a wrong shift, mask, temperature,
    π_old or reference changes them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    spy = StepSpy(monkeypatch, model)
    config = make_config(
        model_dir, tmp_path / "mu2", loss_type="grpo", beta=0.1, num_iterations=2, temperature=0.7,
        train={"max_steps": 3},
    )
    records = grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False).metrics
    policies = [policy_with(model_dir, weights) for weights in spy.weights]
    for step, old in enumerate([0, 0, 2]):
        expected = recompute_grpo_step(policies[step], policies[old], policies[0], spy, step, config)
        for key, value in expected.items():
            assert records[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    first, second, third = records
    # First pass: π = π_old exactly, so nothing clips; π = π_ref, so the KL is 0 up to float noise.
    assert first["clip_ratio/region_mean"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    # Second pass: the update moved π off π_old both ways, and away from the reference.
    assert second["clip_ratio/low_mean"] > 0.0 and second["clip_ratio/high_mean"] > 0.0
    assert second["kl"] > 1e-3
    # A new rollout batch: π_old is the policy again (nothing clips), the reference is still the start.
    assert third["clip_ratio/region_mean"] == 0.0 and third["kl"] > 1e-3
    # The sampler's log-probs at T = 0.7 are the training forward's at the same weights (π_old) ...
    assert first["rollout/logprob_diff_max"] < 1e-4 and third["rollout/logprob_diff_max"] < 1e-4
    # ... and the plain forward's, so both apply the temperature as the sampling did.
    with torch.no_grad():
        for prompt_ids, completion_ids, _, _, sampler_logps in spy.completions(0):
            logps, _ = plain_scores(policies[0], prompt_ids, completion_ids, config.temperature)
            torch.testing.assert_close(torch.tensor(sampler_logps), logps, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- accumulation and old log-probs






@pytest.mark.parametrize(
    ("loss_type", "share_prompt", "second_pass"),
    [
        ("grpo", True, False), ("dapo", True, False), ("dr_grpo", True, False), ("dapo", False, False),
        ("grpo", True, True), ("dapo", False, True),
    ],
)  # fmt: skip
def test_accumulation_gives_the_gradient_of_one_batch(
    tmp_path, model_dir, tokenizer, monkeypatch, loss_type, share_prompt, second_pass
):
    """Micro-batches of 3, 3 and 2 completions update exactly like one batch of 8: three prompts are sampled,
    dynamic sampling drops the one whose rewards are all equal (its answer is a multiple of 3), and the 8
    completions left have different lengths (EOS made likely). `second_pass`: μ = 2 and a k3 KL term
    (β = 0.1), so step 2 is a second pass over the same completions after an update, with ρ ≠ 1, clipping
    active and a positive KL, and each step's update is compared."""
    rows = prompts(64).to_list()
    multiples = [row for row in rows if int(row["answer"]) % 3 == 0]
    others = [row for row in rows if int(row["answer"]) % 3 != 0]
    dataset = datasets.Dataset.from_list([others[0], multiples[0], others[1]])
    extra = dict(num_iterations=2, beta=0.1) if second_pass else {}
    steps = 2 if second_pass else 1
    updates, records = [], []
    for micro, accumulation in ((12, 1), (3, 4)):
        model = eos_likely(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
        spy = StepSpy(monkeypatch, model)
        config = make_config(
            model_dir, tmp_path / f"micro-{micro}", loss_type=loss_type, share_prompt=share_prompt,
            max_new_tokens=6, reward_functions=["test_char_codes_unless_three"], dynamic_sampling=True,
            max_sampling_rounds=1, train=sgd_like(steps, batch_size=micro, grad_accum=accumulation), **extra,
        )  # fmt: skip
        run_records = grpo(config, dataset=dataset, model=model, tokenizer=tokenizer, save=False).metrics
        weights = [*spy.weights, {name: t.detach().clone() for name, t in model.state_dict().items()}]
        names = [name for name, _ in model.named_parameters()]
        updates.append([
            torch.cat([(before[n] - after[n]).flatten() for n in names])
            for before, after in zip(weights[:-1], weights[1:], strict=True)
        ])  # fmt: skip
        records.append(run_records)
    assert [record["groups_trained"] for record in records[0] + records[1]] == [2] * 2 * steps  # 3, 3, 2
    assert records[0][0]["completions/min_length"] < records[0][0]["completions/max_length"]
    if second_pass:
        first, second = records[0]
        assert first["clip_ratio/region_mean"] == 0.0
        assert second["clip_ratio/low_mean"] > 0.0 and second["clip_ratio/high_mean"] > 0.0
        assert second["kl"] > 1e-3
    for step in range(steps):
        assert updates[0][step].abs().max() > 0
        # atol: with the engine's keyed draws, the second pass (ratios near the clip edge, computed in two
        # micro-batch layouts) differs by up to 1.6e-6 on 2 of 13,632 weights; every other weight by < 1e-6.
        torch.testing.assert_close(updates[1][step], updates[0][step], atol=3e-6, rtol=1e-4)
        assert records[1][step]["grad_norm"] == pytest.approx(records[0][step]["grad_norm"], rel=1e-4)
        if second_pass:
            for key in ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean"):
                assert records[1][step][key] == pytest.approx(records[0][step][key], rel=1e-4, abs=1e-6)


def test_several_iterations_use_rollout_logprobs_and_clip(tmp_path, model_dir):
    config = make_config(
        model_dir, tmp_path / "mu", num_iterations=4, epsilon_low=0.01, epsilon_high=0.01,
        train={"max_steps": 4},
    )
    result = grpo(config, dataset=prompts())
    # Pass 1 starts at π = π_old (ρ = 1); later passes move π away from the stored log-probs and clip.
    assert result.metrics[0]["clip_ratio/low_mean"] + result.metrics[0]["clip_ratio/high_mean"] == 0.0
    later = [m["clip_ratio/low_mean"] + m["clip_ratio/high_mean"] for m in result.metrics[1:]]
    assert max(later) > 0.0


def test_epochs_count_passes_over_the_prompts_with_several_iterations(tmp_path, model_dir):
    # 8 prompts, 8 completions a step = 2 prompts (G = 4): one epoch is 4 rollout batches, and with μ = 2
    # each feeds 2 optimizer steps, so 8 steps (not 4, which would see only half the prompts).
    config = make_config(
        model_dir, tmp_path / "epochs", num_iterations=2, train={"max_steps": 0, "epochs": 1.0}
    )
    result = grpo(config, dataset=prompts(8), save=False)
    assert result.step == 8


# ----------------------------------------------------------------------------- DAPO options


def test_dynamic_sampling_drops_equal_groups_and_logs_a_short_batch(tmp_path, model_dir):
    rows = prompt_dataset("train", limit=64)
    config = make_config(
        model_dir, tmp_path / "dyn", reward_functions=["test_some_constant"], dynamic_sampling=True,
        max_sampling_rounds=1, train={"max_steps": 2, "batch_size": 16},
    )
    result = grpo(config, dataset=rows)
    for metrics in result.metrics:
        assert metrics["dynamic_sampling/rounds"] == 1
        # Four prompts a step; groups whose answer is a multiple of 3 all score 1.0 and are dropped.
        assert metrics["groups_trained"] == 4 - metrics["frac_reward_zero_std"] * 4
    assert any(m["dynamic_sampling/short_batch"] == 1.0 for m in result.metrics)


def test_truncated_completions_can_be_masked(tmp_path, model_dir):
    config = make_config(
        model_dir, tmp_path / "trunc", max_new_tokens=1, mask_truncated_completions=True,
        train={"max_steps": 1},
    )
    result = grpo(config, dataset=prompts())
    metrics = result.metrics[0]
    # With one new token every completion is cut here; masked ones contribute no loss and no gradient.
    assert metrics["completions/clipped_ratio"] == 1.0
    assert metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0


@pytest.mark.parametrize(("loss_type", "share_prompt"), [("grpo", True), ("dapo", False)])
def test_masked_truncated_completions_leave_the_loss_and_update_of_the_others(
    tmp_path, model_dir, tokenizer, monkeypatch, loss_type, share_prompt
):
    """Some completions end with EOS, some are cut at max_new_tokens (EOS made likely; temperature 0.7). The
    logged loss and the update (one SGD step of rate 1: the gradient) equal those worked out by hand over
    the untruncated completions only, with plain forwards, normalised by their count (grpo) or their tokens
    (dapo); the truncated ones have nonzero advantages, so training on them would change both. Both training
    forwards: each prompt once for its group (share_prompt) and padded rows."""
    bias, max_new_tokens, temperature = 3.0, 3, 0.7
    model = eos_likely(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, bias)
    spy = StepSpy(monkeypatch, model)
    config = make_config(
        model_dir, tmp_path / "mixed", max_new_tokens=max_new_tokens, mask_truncated_completions=True,
        temperature=temperature, loss_type=loss_type, share_prompt=share_prompt,
        # seed 1: a draw where some cut completions have nonzero advantages (the case this test needs)
        train=sgd_like(batch_size=8, seed=1),
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    [record] = grpo(config, dataset=prompts(), model=model, tokenizer=tokenizer, save=False).metrics
    update = torch.cat([(before[name] - p.detach()).flatten() for name, p in model.named_parameters()])
    completions = list(spy.completions(0))
    # Truncated: max_new_tokens tokens and no EOS at the end.
    cut = [len(ids) == max_new_tokens and ids[-1] != tokenizer.eos_token_id for _, ids, *_ in completions]
    assert 0 < sum(cut) < len(cut)
    assert record["completions/clipped_ratio"] == pytest.approx(sum(cut) / len(cut))
    kept = [c for c, is_cut in zip(completions, cut, strict=True) if not is_cut]
    assert any(c[2] != 0 for c, is_cut in zip(completions, cut, strict=True) if is_cut)

    def surrogate(chosen, policy=None):
        """−(1/N) Σ_i A_i mean_t ρ_it (grpo) or −(1/N_tok) Σ_i Σ_t A_i ρ_it (dapo) over `chosen`, with
        ρ = exp(log π − log π detached): 1 in value, ∇ log π in gradient."""
        terms = []
        for prompt_ids, ids, advantage, *_ in chosen:
            if policy is None:  # the value only: ρ = 1
                logps = torch.zeros(len(ids))
            else:
                logps = plain_scores(policy, prompt_ids, ids, temperature)[0]
            terms.append(-advantage * torch.exp(logps - logps.detach()))
        if loss_type == "grpo":
            return torch.stack([t.mean() for t in terms]).sum() / len(terms)
        return torch.cat(terms).sum() / sum(len(t) for t in terms)

    assert record["loss"] == pytest.approx(float(surrogate(kept)), abs=1e-6)

    def gradient(chosen) -> torch.Tensor:
        policy = policy_with(model_dir, None, tokenizer, eos_bias=bias)
        surrogate(chosen, policy).backward()
        return torch.cat([p.grad.flatten() for _, p in policy.named_parameters()])

    torch.testing.assert_close(update, gradient(kept), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(update, gradient(completions), atol=1e-4)  # the masked ones would count
    # π = π_old here, so the loss compares the sampler's log-probs with the training forward's at T = 0.7.
    assert record["rollout/logprob_diff_max"] < 1e-4


