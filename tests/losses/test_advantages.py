"""Group advantages, GAE, whitening and DAPO's overlong penalty against numbers worked out by hand."""

import pytest
import torch

from prefalign.losses import gae, group_advantages, overlong_penalty, whiten, zero_std_groups


def assert_values(actual, expected, atol=1e-6):
    """Compare a tensor with nested literal lists (pytest.approx takes flat ones only)."""
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_grpo_two_samples_uses_sample_std():
    advantages = group_advantages(torch.tensor([0.0, 1.0]), group_size=2)
    # mean 0.5, sample std sqrt((0.25 + 0.25)/1) = 0.707107; ±0.5/(0.707107 + 1e−4) = ±0.707007
    assert advantages.tolist() == pytest.approx([-0.707007, 0.707007], abs=1e-6)


def test_grpo_all_equal_group_is_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0])
    advantages = group_advantages(rewards, group_size=3)
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    # (1, 2, 3): mean 2, sample std 1; (−1, 0, 1)/(1 + 1e−4) = ∓0.999900
    assert advantages[3:].tolist() == pytest.approx([-0.999900, 0.0, 0.999900], abs=1e-6)
    assert zero_std_groups(rewards, 3).tolist() == [True, False]


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_all_equal_groups_whose_mean_does_not_round_back_are_exactly_zero(scale):
    """G = 8 rewards of 0.1 (or 0.7): in float32 their mean is not exactly 0.1 (0.7), so r − mean is about
    ∓7e-9 (6e-8), and the group std about 8e-9 (6e-8), far below δ = 1e-4: the plain formula gives about
    −7.4e-5 (6.0e-4), not 0. Only the explicit zeroing of all-equal groups makes these exactly 0."""
    groups = torch.tensor([[0.1] * 8, [0.7] * 8, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    centered = groups - groups.mean(dim=1, keepdim=True)
    naive = centered / (groups.std(dim=1, keepdim=True) + 1e-4)
    assert (centered[:2] != 0).all() and (naive[:2].abs() > 1e-5).all()  # the test can fail
    advantages = group_advantages(groups.flatten(), group_size=8, scale=scale)
    assert advantages[:16].tolist() == [0.0] * 16
    assert (advantages[16:] != 0).all()  # the group with a spread keeps its advantages
    assert zero_std_groups(groups.flatten(), 8).tolist() == [True, True, False]


def test_grpo_accepts_grouped_shape():
    advantages = group_advantages(torch.tensor([[0.0, 1.0], [3.0, 3.0]]), group_size=2)
    assert advantages.shape == (2, 2)
    assert_values(advantages, [[-0.707007, 0.707007], [0.0, 0.0]])


def test_dr_grpo_no_scaling():
    advantages = group_advantages(torch.tensor([0.0, 1.0, 1.0, 5.0, 5.0, 8.0]), group_size=3, scale="none")
    # means 2/3 and 6: (−0.666667, 0.333333, 0.333333), (−1, −1, 2)
    assert advantages.tolist() == pytest.approx([-0.666667, 0.333333, 0.333333, -1.0, -1.0, 2.0], abs=1e-6)


def test_batch_scaling():
    advantages = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0]), group_size=2, scale="batch")
    # batch mean 1.75; squared deviations 3.0625 + 0.5625 + 1.5625 + 1.5625 = 6.75; sample var 6.75/3 = 2.25,
    # std 1.5; group-centred (−0.5, 0.5, 0, 0) / (1.5 + 1e−4) = ±0.333311
    assert advantages.tolist() == pytest.approx([-0.333311, 0.333311, 0.0, 0.0], abs=1e-6)


def test_group_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), group_size=2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.tensor([1.0, 2.0]), group_size=2, scale="population")


def test_gae_with_right_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])  # 9.0: garbage at padding
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)  # γλ = 0.45
    # row 1: δ2 = 1 − 0.7 = 0.3 (V after the end = 0); δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04
    #        A2 = 0.3; A1 = 0.03 + 0.45·0.3 = 0.165; A0 = 0.04 + 0.45·0.165 = 0.11425
    # row 2: δ1 = 2 − 0.5 = 1.5; δ0 = 0.9·0.5 − 1.0 = −0.55; A1 = 1.5; A0 = −0.55 + 0.45·1.5 = 0.125
    assert_values(advantages, [[0.11425, 0.165, 0.3], [0.125, 1.5, 0.0]])
    # R = A + V: (0.61425, 0.765, 1.0), (1.125, 2.0, 0 at padding)
    assert_values(returns, [[0.61425, 0.765, 1.0], [1.125, 2.0, 0.0]])


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    advantages, returns = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
                              torch.ones(1, 3), gamma=1.0, lam=1.0)  # fmt: skip
    # reward-to-go (6, 5, 3) minus V = 0.5
    assert_values(advantages, [[5.5, 4.5, 2.5]])
    assert_values(returns, [[6.0, 5.0, 3.0]])


def test_whiten():
    values = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, sample variance (4 + 0 + 4)/2 = 4, std 2 → (−1, 0, 1); padding → 0
    assert_values(whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # without shifting the mean: (−1, 0, 1) + 4
    assert_values(whiten(values, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])


def test_overlong_penalty():
    lengths = torch.tensor([3, 6, 7, 8, 10, 11])
    # max 10, cache 4: soft zone (6, 10]; (6 − |y|)/4: 7 → −0.25, 8 → −0.5, 10 → −1; beyond → −1
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert_values(overlong_penalty(lengths, max_len=10, cache_len=4), expected)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(lengths, max_len=10, cache_len=0)
