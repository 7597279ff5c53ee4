"""Bradley–Terry and ranked-pairs reward-model losses against numbers worked out by hand."""

import pytest
import torch

from prefalign.losses import bradley_terry_loss, ranked_pairs_loss


def test_bradley_terry_plain():
    loss, metrics = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]))
    # −log σ(1) = 0.313262; −log σ(−0.5) = 0.974077; mean = 0.643669
    assert loss.item() == pytest.approx(0.643669, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["margin"] == pytest.approx(0.25)  # mean(1 − 0, 0.5 − 1)
    assert metrics["rewards/chosen"] == pytest.approx(0.75)
    assert metrics["rewards/rejected"] == pytest.approx(0.5)


def test_bradley_terry_accepts_head_shape():
    loss, _ = bradley_terry_loss(torch.tensor([[1.0], [0.5]]), torch.tensor([[0.0], [1.0]]))
    assert loss.item() == pytest.approx(0.643669, abs=1e-6)


def test_bradley_terry_with_margin():
    loss, metrics = bradley_terry_loss(
        torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), margin=torch.tensor([0.5, 0.5])
    )
    # −log σ(1 − 0.5) = 0.474077; −log σ(−0.5 − 0.5) = 1.313262; mean = 0.893669
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    assert metrics["margin"] == pytest.approx(0.25)  # the metric is the raw r_w − r_l


def test_bradley_terry_with_centering():
    loss, _ = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), center_coefficient=0.01)
    # 0.643669 + 0.01·mean((1 + 0)², (0.5 + 1)²) = 0.643669 + 0.01·(1 + 2.25)/2 = 0.643669 + 0.01625
    #   = 0.659919
    assert loss.item() == pytest.approx(0.659919, abs=1e-6)


def test_bradley_terry_gradient():
    chosen = torch.tensor([1.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, torch.tensor([0.0]))
    loss.backward()
    # d/dr_w −log σ(r_w − r_l) = −(1 − σ(1)) = −0.268941
    assert chosen.grad.item() == pytest.approx(-0.268941, abs=1e-6)


def test_ranked_pairs_loss():
    # pairs (2,1), (2,0), (1,0): [−log σ(1) + −log σ(2) + −log σ(1)] / C(3,2)
    # = (0.313262 + 0.126928 + 0.313262) / 3 = 0.251150
    assert ranked_pairs_loss(torch.tensor([2.0, 1.0, 0.0])).item() == pytest.approx(0.251150, abs=1e-6)
    # a batch of two prompts: the second, K = 3 scores all equal: 3·log 2 / 3 = 0.693147; mean = 0.472149
    batch = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert ranked_pairs_loss(batch).item() == pytest.approx(0.472149, abs=1e-6)


def test_bradley_terry_margin_per_pair_in_head_shape():
    # A (num_pairs, 1) margin must pair up with its own row, as the (num_pairs, 1) scores do; broadcast
    # against (num_pairs,) it would make a 2×2 table and average all four cross terms (0.768670).
    loss, _ = bradley_terry_loss(
        torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), margin=torch.tensor([[0.5], [0.0]])
    )
    # −log σ(1 − 0.5) = 0.474077; −log σ(−0.5 − 0) = 0.974077; mean = 0.724077
    assert loss.item() == pytest.approx(0.724077, abs=1e-6)


def test_bradley_terry_margin_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(
            torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), margin=torch.tensor([0.5, 0.5, 0.5])
        )


@pytest.mark.parametrize("coefficient", [-0.01, float("nan")])
def test_bradley_terry_centering_coefficient_must_be_non_negative(coefficient):
    # −c·mean((r_w + r_l)²) rewards scores that run off to ±infinity: the loss has no minimum.
    with pytest.raises(ValueError, match="center_coefficient"):
        bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), center_coefficient=coefficient)
