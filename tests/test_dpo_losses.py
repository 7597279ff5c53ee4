"""Large-margin values of the DPO family, worked out by hand (tests/losses/test_dpo.py has the ordinary cases).

With β·h = ±100, σ(100) = 1 − 3.7e−44, so −log σ(100) = 3.7e−44 ≈ 0 and −log σ(−100) = 100 + 3.7e−44 ≈ 100.
"""

from __future__ import annotations

import pytest
import torch

from prefalign.losses import dpo_loss

ZEROS = torch.zeros(2)


def pairs_with_margin_plus_and_minus_1000():
    """h = +1000 for pair 1 and −1000 for pair 2 (reference log-probs all 0)."""
    chosen = torch.tensor([0.0, -1000.0], requires_grad=True)
    rejected = torch.tensor([-1000.0, 0.0])
    return chosen, rejected


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "per_pair"),
    [
        # −0.9 log σ(100) − 0.1 log σ(−100) = 0 + 0.1·100 = 10;  −0.9 log σ(−100) − 0.1 log σ(100) = 90
        ("cdpo", 0.1, (10.0, 90.0)),
        # [−0.9 log σ(100) + 0.1 log σ(−100)] / 0.8 = (0 − 10) / 0.8 = −12.5;  [90 + 0] / 0.8 = 112.5
        ("robust", 0.1, (-12.5, 112.5)),
        # max(0, 1 − 100) = 0;  max(0, 1 + 100) = 101
        ("hinge", 0.0, (0.0, 101.0)),
        # (1000 − 5)² = 990025;  (−1000 − 5)² = 1010025
        ("ipo", 0.0, (990025.0, 1010025.0)),
    ],
)
def test_large_margin_literals(loss_type, smoothing, per_pair):
    chosen, rejected = pairs_with_margin_plus_and_minus_1000()
    loss, _ = dpo_loss(chosen, rejected, ZEROS, ZEROS, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(chosen.grad).all()


def test_simpo_large_margin():
    chosen, rejected = pairs_with_margin_plus_and_minus_1000()
    lengths = torch.ones(2)
    loss, metrics = dpo_loss(
        chosen, rejected, None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
        chosen_lengths=lengths, rejected_lengths=lengths,
    )  # fmt: skip
    # pair 1: −log σ(2·1000 − 0.5) ≈ 0;  pair 2: −log σ(−2000.5) = 2000.5;  mean = 1000.25
    assert loss.item() == pytest.approx(1000.25, rel=1e-6)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)
    loss.backward()
    assert torch.isfinite(chosen.grad).all()
