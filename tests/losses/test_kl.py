"""k1 / k2 / k3 KL estimators against numbers worked out by hand, including large |Δ|."""

import pytest
import torch

from prefalign.losses import kl_estimate

# Δ = log π_ref − log π; logps = 0 so Δ = ref_logps.
DELTAS = torch.tensor([-5.0, -0.1, 0.0, 0.1, 5.0])


def test_k1():
    expected = [5.0, 0.1, 0.0, -0.1, -5.0]  # −Δ
    assert kl_estimate(torch.zeros(5), DELTAS, kind="k1").tolist() == pytest.approx(expected)


def test_k2():
    expected = [12.5, 0.005, 0.0, 0.005, 12.5]  # ½Δ²: ½·25, ½·0.01
    assert kl_estimate(torch.zeros(5), DELTAS, kind="k2").tolist() == pytest.approx(expected)


def test_k3_including_large_delta():
    values = kl_estimate(torch.zeros(5), DELTAS, kind="k3")
    expected = [
        4.006738,  # e^−5 + 5 − 1 = 0.006738 + 4
        0.00483742,  # e^−0.1 + 0.1 − 1 = 0.904837 − 0.9
        0.0,
        0.00517092,  # e^0.1 − 0.1 − 1 = 1.105171 − 1.1
        142.413159,  # e^5 − 5 − 1 = 148.413159 − 6
    ]
    assert values.tolist() == pytest.approx(expected, rel=1e-6)
    assert (values >= 0).all()


def test_k3_is_exact_for_tiny_delta():
    # e^Δ − Δ − 1 ≈ Δ²/2 for tiny Δ: 1e−4 → 5.0002e−9; a naive exp(Δ) − Δ − 1 in float32 gives 0 or noise
    value = kl_estimate(torch.tensor([0.0]), torch.tensor([1e-4]), kind="k3")
    assert value.item() == pytest.approx(5.0002e-9, rel=1e-3)


def test_default_is_k3_and_unknown_kind_raises():
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([5.0])).item() == pytest.approx(142.413159, rel=1e-6)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1), torch.zeros(1), kind="k4")


def test_k3_gradient():
    logps = torch.tensor([0.0], requires_grad=True)
    kl_estimate(logps, torch.tensor([0.5]), kind="k3").backward()
    # d/dlogπ (e^Δ − Δ − 1) with Δ = ref − logπ: −e^Δ + 1 = 1 − e^0.5 = −0.648721
    assert logps.grad.item() == pytest.approx(-0.648721, abs=1e-6)
