"""Clipped surrogate (three aggregations), GSPO, value loss and adaptive KL against hand-worked numbers."""

import math

import pytest
import torch

from prefalign.losses import adaptive_kl_update, clipped_surrogate, gspo_loss, value_loss

# Three completions of lengths 3, 1 and 2, padded to T = 4.
LENGTHS_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


def assert_values(actual, expected, atol=1e-6):
    """Compare a tensor with nested literal lists (pytest.approx takes flat ones only)."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def gradient_weights(aggregation, **normalisers):
    """d loss / d logπ per token with A = 1 and ρ = 1 (old = logπ detached): minus the token weight."""
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -9.0, -9.0, -9.0], [-1.5, -0.2, -9.0, -9.0]])
    logps.requires_grad_(True)
    loss, _ = clipped_surrogate(
        logps, logps.detach(), torch.ones(3), LENGTHS_MASK, aggregation=aggregation, **normalisers
    )
    loss.backward()
    return -logps.grad


def test_grpo_aggregation_weights_are_one_over_group_times_length():
    # 1/(G·|y_i|) with G = 3: 1/9, 1/3, 1/6; 0 on padding
    expected = [[1 / 9, 1 / 9, 1 / 9, 0.0], [1 / 3, 0.0, 0.0, 0.0], [1 / 6, 1 / 6, 0.0, 0.0]]
    assert_values(gradient_weights("grpo"), expected)


def test_dapo_aggregation_weights_are_one_over_total_tokens():
    # 1/Σ|y| = 1/(3 + 1 + 2) = 1/6 on every completion token
    expected = [[1 / 6, 1 / 6, 1 / 6, 0.0], [1 / 6, 0.0, 0.0, 0.0], [1 / 6, 1 / 6, 0.0, 0.0]]
    assert_values(gradient_weights("dapo"), expected)


def test_dr_grpo_aggregation_weights_are_one_over_group_times_max_new_tokens():
    # 1/(G·L_max) = 1/(3·8) = 1/24, L_max the configured limit (8), not the longest completion (3)
    expected = [[1 / 24, 1 / 24, 1 / 24, 0.0], [1 / 24, 0.0, 0.0, 0.0], [1 / 24, 1 / 24, 0.0, 0.0]]
    assert_values(gradient_weights("dr_grpo", max_new_tokens=8), expected)


def clip_case():
    """Old logps 0, so ρ = exp(logps). Sequence 1 (A = +1): ρ = 1.3, 0.7, 1.0; sequence 2 (A = −1):
    ρ = 0.7, 1.3."""
    logps = torch.log(torch.tensor([[1.3, 0.7, 1.0], [0.7, 1.3, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_clipped_values_and_clip_metrics():
    # ℓ = −min(ρA, clip(ρ, 0.8, 1.2)A):
    #   seq 1: −min(1.3, 1.2) = −1.2 (high clip); −min(0.7, 0.8) = −0.7; −1.0
    #   seq 2: −min(−0.7, −0.8) = 0.8 (low clip); −min(−1.3, −1.2) = 1.3
    loss, metrics = clipped_surrogate(*clip_case(), aggregation="dapo")
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)  # (−1.2 − 0.7 − 1.0 + 0.8 + 1.3)/5 = −0.8/5
    loss, _ = clipped_surrogate(*clip_case(), aggregation="grpo")
    assert loss.item() == pytest.approx(0.0416667, abs=1e-6)  # (−2.9/3 + 2.1/2)/2 = (−0.966667 + 1.05)/2
    loss, _ = clipped_surrogate(*clip_case(), aggregation="dr_grpo", max_new_tokens=4)
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)  # −0.8/(2·4)
    # low: ρ = 0.7 with A < 0 (1 of 5 tokens); high: ρ = 1.3 with A > 0 (1 of 5).
    # ρ = 0.7 with A > 0 and ρ = 1.3 with A < 0 are not clipped (the min picks the unclipped term).
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.2)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.2)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(0.4)


def test_clip_higher():
    # ε_high = 0.28 (DAPO): seq 1 token 1 is now −min(1.3, 1.28) = −1.28 and still counted as high clip
    loss, metrics = clipped_surrogate(*clip_case(), eps_high=0.28, aggregation="dapo")
    assert loss.item() == pytest.approx(-0.176, abs=1e-6)  # (−1.28 − 0.7 − 1.0 + 0.8 + 1.3)/5 = −0.88/5
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.2)


def test_kl_term_uses_the_same_aggregation():
    logps = torch.zeros(2, 2)
    kl = torch.tensor([[0.1, 0.3], [0.5, 7.0]])  # 7.0 on padding is ignored
    mask = torch.tensor([[1, 1], [1, 0]])
    zero_advantages = torch.zeros(2)

    def loss_for(aggregation, **extra):
        loss, _ = clipped_surrogate(
            logps, logps, zero_advantages, mask, aggregation=aggregation, kl=kl, beta=0.5, **extra
        )
        return loss.item()

    assert loss_for("dapo") == pytest.approx(0.15)  # 0.5·(0.1 + 0.3 + 0.5)/3
    assert loss_for("grpo") == pytest.approx(0.175)  # 0.5·(0.2 + 0.5)/2
    assert loss_for("dr_grpo", max_new_tokens=4) == pytest.approx(0.05625)  # 0.5·0.9/(2·4)
    with pytest.raises(ValueError, match="kl"):
        clipped_surrogate(logps, logps, zero_advantages, mask, beta=0.5)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_accumulation_with_global_normaliser_matches_one_batch(aggregation):
    generator = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 5, generator=generator)
    old_logps = logps + 0.3 * (torch.rand(4, 5, generator=generator) - 0.5)  # ρ ≠ 1, some clipped
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    step = {"max_new_tokens": 5, "num_sequences": 4, "num_tokens": int(mask.sum())}
    whole, _ = clipped_surrogate(
        logps, old_logps, advantages, mask, aggregation=aggregation, max_new_tokens=5
    )
    parts = [
        clipped_surrogate(
            logps[rows], old_logps[rows], advantages[rows], mask[rows], aggregation=aggregation, **step
        )[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_per_token_advantages():
    logps = torch.zeros(1, 2)
    loss, _ = clipped_surrogate(
        logps, logps, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), aggregation="dapo"
    )
    assert loss.item() == pytest.approx(-0.5)  # −(2 − 1)/2 with ρ = 1


def gspo_case():
    """Token log-ratios: seq 1 (A = +1) 0.2, −0.2, 0.3 (mean 0.1); seq 2 (A = −1) 0.4, 0.0 (mean 0.2)."""
    logps = torch.tensor([[0.2, -0.2, 0.3], [0.4, 0.0, 5.0]], requires_grad=True)  # 5.0 on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask


def test_gspo_differs_from_token_level_grpo_when_ratio_is_not_one():
    logps, old_logps, advantages, mask = gspo_case()
    loss, metrics = gspo_loss(logps, old_logps, advantages, mask, eps_low=0.2, eps_high=0.2)
    # s1 = e^0.1 = 1.105171 (inside [0.8, 1.2]);
    # s2 = e^0.2 = 1.221403 with A = −1: min(−1.221403, −1.2) = −1.221403
    # loss = −(1.105171 − 1.221403)/2 = 0.058116
    assert loss.item() == pytest.approx(0.058116, abs=1e-6)
    assert metrics["clip_ratio/region_mean"] == 0.0
    loss.backward()
    # d/dlogπ_t: seq 1: −(1/2)·s1·(1/3) = −0.184195; seq 2: +(1/2)·s2·(1/2) = 0.305351; padding 0
    expected = [[-0.184195] * 3, [0.305351, 0.305351, 0.0]]
    assert_values(logps.grad, expected)

    # token-level GRPO on the same tokens: seq 1: ρ = e^0.2 → 1.2, e^−0.2 = 0.818731, e^0.3 → 1.2:
    #   mean ℓ = −(1.2 + 0.818731 + 1.2)/3 = −1.072910; seq 2: ρ = e^0.4 = 1.491825 (A < 0, unclipped), 1:
    #   mean ℓ = (1.491825 + 1)/2 = 1.245912; loss = (−1.072910 + 1.245912)/2 = 0.086501
    grpo, _ = clipped_surrogate(logps, old_logps, advantages, mask, aggregation="grpo")
    assert grpo.item() == pytest.approx(0.086501, abs=1e-6)


def test_gspo_equals_grpo_gradient_at_ratio_one():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.4, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([0.7, -1.2])
    gspo_loss(logps, logps.detach(), advantages, mask, eps_low=3e-4, eps_high=4e-4)[0].backward()
    gspo_gradient = logps.grad.clone()
    logps.grad = None
    clipped_surrogate(logps, logps.detach(), advantages, mask, aggregation="grpo")[0].backward()
    # both: −A_i/(G·|y_i|): −0.7/6 = −0.116667 on seq 1, 1.2/4 = 0.3 on seq 2
    expected = [[-0.116667] * 3, [0.3, 0.3, 0.0]]
    assert_values(gspo_gradient, expected)
    assert_values(logps.grad, expected)


def test_value_loss():
    values = torch.tensor([[1.0, 2.0, 0.5, 3.0]])
    old_values = torch.tensor([[0.5, 2.5, 0.5, 0.0]])
    returns = torch.tensor([[0.4, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # t0: (1 − 0.4)² = 0.36 vs (0.5 + 0.2 − 0.4)² = 0.09 → 0.36
    # t1: (2 − 1)² = 1 vs (2.5 − 0.2 − 1)² = 1.69 → 1.69 (clipped term larger)
    # t2: (0.5 − 0)² = 0.25 vs (0.5 + 0 − 0)² = 0.25 → 0.25; t3 padding
    # ½·(0.36 + 1.69 + 0.25)/3 = ½·0.766667 = 0.383333
    assert loss.item() == pytest.approx(0.383333, abs=1e-6)
    assert metrics["value/clipfrac"] == pytest.approx(1 / 3)


def test_adaptive_kl_update():
    # e = clip(9/6 − 1 = 0.5) = 0.2 → 0.1·(1 + 0.1·0.2) = 0.102
    assert adaptive_kl_update(0.1, kl=9.0, target=6.0) == pytest.approx(0.102)
    assert adaptive_kl_update(0.1, kl=5.4, target=6.0) == pytest.approx(0.099)  # e = −0.1 → 0.1·0.99
    assert adaptive_kl_update(0.1, kl=0.0, target=6.0) == pytest.approx(0.098)  # e = clip(−1) = −0.2


def test_unknown_aggregation_and_missing_max_new_tokens():
    logps = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="aggregation"):
        clipped_surrogate(logps, logps, torch.ones(1), torch.ones(1, 2), aggregation="sum")
    with pytest.raises(ValueError, match="max_new_tokens"):
        clipped_surrogate(logps, logps, torch.ones(1), torch.ones(1, 2), aggregation="dr_grpo")
    assert math.isfinite(clipped_surrogate(logps, logps, torch.ones(1), torch.zeros(1, 2))[0].item())


def test_gspo_clip_metrics_are_token_means_and_an_empty_row_adds_nothing():
    # Log-ratios: seq 1 (A = +1) 0.2, 0.1, 0.0 (mean 0.1); seq 2 (A = −1) −0.3, −0.1 (mean −0.2);
    # seq 3 (A = +1) has no trained token (a masked truncated completion).
    logps = torch.tensor([[0.2, 0.1, 0.0], [-0.3, -0.1, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    loss, metrics = gspo_loss(
        logps, torch.zeros(3, 3), torch.tensor([1.0, -1.0, 1.0]), mask, eps_low=0.05, eps_high=0.05,
        num_sequences=2,
    )
    # s1 = e^0.1 = 1.105171 > 1.05 with A > 0: −min(1.105171, 1.05) = −1.05 (high clip)
    # s2 = e^−0.2 = 0.818731 < 0.95 with A < 0: −min(−0.818731, −0.95) = 0.95 (low clip)
    # seq 3: nothing. loss = (−1.05 + 0.95)/2 = −0.05
    assert loss.item() == pytest.approx(-0.05, abs=1e-6)
    # Token means over the 5 trained tokens: high 3/5 (seq 1), low 2/5 (seq 2), either 5/5.
    assert metrics["clip_ratio/high_mean"] == pytest.approx(0.6)
    assert metrics["clip_ratio/low_mean"] == pytest.approx(0.4)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(1.0)
    loss.backward()
    assert_values(logps.grad, [[0.0] * 3] * 3)  # both active terms are the clipped constants
