"""DPO-family, RPO SFT term and KTO losses against numbers worked out by hand."""

import math

import pytest
import torch

from prefalign.errors import ConfigError
from prefalign.losses import dpo_loss, kto_loss, sft_term

BETA = 0.1


def two_pairs():
    """Pair 1: u_w = −10 − (−11) = 1, u_l = −12 − (−11) = −1, h = 2.
    Pair 2: u_w = −8 − (−8) = 0,  u_l = −7 − (−8) = 1,   h = −1."""
    policy_chosen = torch.tensor([-10.0, -8.0])
    policy_rejected = torch.tensor([-12.0, -7.0])
    ref_chosen = torch.tensor([-11.0, -8.0])
    ref_rejected = torch.tensor([-11.0, -8.0])
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_sigmoid_loss_and_metrics():
    loss, metrics = dpo_loss(*two_pairs(), beta=BETA)
    # pair 1: −log σ(0.1·2) = −log σ(0.2) = 0.598139; pair 2: −log σ(−0.1) = 0.744397
    # mean = (0.598139 + 0.744397) / 2 = 0.671268
    assert loss.item() == pytest.approx(0.671268, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.05)  # mean(0.1·1, 0.1·0)
    assert metrics["rewards/rejected"] == pytest.approx(0.0)  # mean(0.1·−1, 0.1·1)
    assert metrics["rewards/margins"] == pytest.approx(0.05)  # mean(0.2, −0.1)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # pair 1 right, pair 2 wrong
    assert metrics["logps/chosen"] == pytest.approx(-9.0)  # mean(−10, −8)
    assert metrics["logps/rejected"] == pytest.approx(-9.5)  # mean(−12, −7)
    assert all(isinstance(value, float) for value in metrics.values())


def test_sigmoid_gradient_is_beta_times_sigma_minus_one():
    chosen = torch.tensor([-10.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=BETA)
    loss.backward()
    # d/d logπ(y_w) of −log σ(βh) = −β(1 − σ(βh)) = −0.1·(1 − σ(0.2)) = −0.1·0.450166 = −0.0450166
    assert chosen.grad.item() == pytest.approx(-0.0450166, abs=1e-6)


@pytest.mark.parametrize("name", ["cdpo", "conservative", "sigmoid"])
def test_conservative_dpo(name):
    loss, _ = dpo_loss(*two_pairs(), beta=BETA, loss_type=name, label_smoothing=0.1)
    # −0.9 log σ(x) − 0.1 log σ(−x), and log σ(x) − log σ(−x) = x, so it equals −log σ(x) + 0.1·x:
    # pair 1 (x = 0.2): 0.598139 + 0.02 = 0.618139; pair 2 (x = −0.1): 0.744397 − 0.01 = 0.734397
    # mean = 0.676268
    assert loss.item() == pytest.approx(0.676268, abs=1e-6)


def test_robust_dpo():
    loss, _ = dpo_loss(*two_pairs(), beta=BETA, loss_type="robust", label_smoothing=0.1)
    # [−0.9 log σ(x) + 0.1 log σ(−x)] / 0.8 = −log σ(x) − 0.1·x/0.8:
    # pair 1: 0.598139 − 0.025 = 0.573139; pair 2: 0.744397 + 0.0125 = 0.756897; mean = 0.665018
    assert loss.item() == pytest.approx(0.665018, abs=1e-6)


def test_robust_dpo_can_be_negative():
    policy_chosen = torch.tensor([0.0])
    loss, _ = dpo_loss(
        policy_chosen, torch.tensor([-10.0]), torch.tensor([0.0]), torch.tensor([0.0]),
        beta=1.0, loss_type="robust", label_smoothing=0.4,
    )  # fmt: skip
    # βh = 10: [−0.6 log σ(10) + 0.4 log σ(−10)] / 0.2 = [0.6·4.54e−5 − 0.4·10.0000454] / 0.2 = −19.999955
    assert loss.item() == pytest.approx(-19.999955, abs=1e-4)


def test_ipo_on_summed_log_ratios():
    loss, _ = dpo_loss(*two_pairs(), beta=BETA, loss_type="ipo")
    # 1/(2β) = 5; (2 − 5)² = 9; (−1 − 5)² = 36; mean = 22.5
    assert loss.item() == pytest.approx(22.5)


def test_ipo_length_normalized():
    loss, _ = dpo_loss(
        *two_pairs(), beta=BETA, loss_type="ipo_length_normalized",
        chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([4, 2]),
    )  # fmt: skip
    # pair 1: 1/2 − (−1)/4 = 0.75 → (0.75 − 5)² = 18.0625; pair 2: 0/4 − 1/2 = −0.5 → (−5.5)² = 30.25
    # mean = 24.15625
    assert loss.item() == pytest.approx(24.15625)


def test_hinge():
    loss, _ = dpo_loss(*two_pairs(), beta=BETA, loss_type="hinge")
    # max(0, 1 − 0.2) = 0.8; max(0, 1 + 0.1) = 1.1; mean = 0.95
    assert loss.item() == pytest.approx(0.95)
    loss, _ = dpo_loss(*two_pairs(), beta=1.0, loss_type="hinge")
    # max(0, 1 − 2) = 0; max(0, 1 + 1) = 2; mean = 1
    assert loss.item() == pytest.approx(1.0)


def test_simpo_without_reference():
    loss, metrics = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), None, None,
        beta=2.0, loss_type="simpo", simpo_gamma=0.5,
        chosen_lengths=torch.tensor([5]), rejected_lengths=torch.tensor([4]),
    )  # fmt: skip
    # −10/5 = −2, −12/4 = −3; −log σ(2·(−2 − (−3)) − 0.5) = −log σ(1.5) = 0.201413
    assert loss.item() == pytest.approx(0.201413, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(-4.0)  # 2·(−10/5)
    assert metrics["rewards/rejected"] == pytest.approx(-6.0)  # 2·(−12/4)
    assert metrics["rewards/margins"] == pytest.approx(2.0)
    assert metrics["rewards/accuracies"] == pytest.approx(1.0)


def test_weighted_combination():
    loss, metrics = dpo_loss(*two_pairs(), beta=BETA, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5])
    # 0.671268 + 0.5·22.5 = 11.921268
    assert loss.item() == pytest.approx(11.921268, abs=1e-5)
    assert metrics["loss/ipo"] == pytest.approx(22.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "robust", "hinge", "ipo"])
def test_large_margin_is_finite(loss_type):
    smoothing = 0.1 if loss_type in ("cdpo", "robust") else 0.0
    chosen = torch.tensor([0.0, -1000.0], requires_grad=True)
    rejected = torch.tensor([-1000.0, 0.0])
    zeros = torch.zeros(2)
    loss, metrics = dpo_loss(
        chosen, rejected, zeros, zeros, beta=0.1, loss_type=loss_type, label_smoothing=smoothing
    )
    loss.backward()  # β·h = +100 and −100
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all()
    assert all(math.isfinite(value) for value in metrics.values())


def test_large_margin_sigmoid_values():
    zeros = torch.zeros(1)
    loss, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1000.0]), zeros, zeros, beta=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # −log σ(100) = 3.7e−44
    loss, _ = dpo_loss(torch.tensor([-1000.0]), torch.tensor([0.0]), zeros, zeros, beta=0.1)
    assert loss.item() == pytest.approx(100.0)  # −log σ(−100) = 100 + log(1 + e^−100)


# ----------------------------------------------------------------------------- large margins by hand
# With β·h = ±100, σ(100) = 1 − 3.7e−44, so −log σ(100) = 3.7e−44 ≈ 0 and −log σ(−100) = 100 + 3.7e−44 ≈ 100.


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
    zeros = torch.zeros(2)
    loss, _ = dpo_loss(
        chosen, rejected, zeros, zeros, beta=0.1, loss_type=loss_type, label_smoothing=smoothing
    )
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


def test_errors():
    pairs = two_pairs()
    with pytest.raises(ValueError, match="Unknown DPO loss_type"):
        dpo_loss(*pairs, beta=BETA, loss_type="sigmoidd")
    with pytest.raises(ValueError, match="< 0.5"):
        dpo_loss(*pairs, beta=BETA, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*pairs, beta=BETA, loss_type="cdpo", label_smoothing=0.7)
    with pytest.raises(ValueError, match="no effect"):
        dpo_loss(*pairs, beta=BETA, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*pairs, beta=BETA, loss_type="simpo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*pairs, beta=BETA, loss_type="ipo_length_normalized")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pairs[0], pairs[1], None, None, beta=BETA, loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*pairs, beta=0.0)
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(*pairs, beta=BETA, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ConfigError):
        dpo_loss(*pairs, beta=BETA, loss_type=[])


def test_sft_term_per_token_over_the_step():
    # micro-batch 1 holds 6 chosen tokens with summed NLL 3.0, micro-batch 2 holds 2 with 5.0; step: 8 tokens
    first = sft_term(torch.tensor([1.0, 2.0]), 8, alpha=0.5)  # 0.5·3/8 = 0.1875
    second = sft_term(torch.tensor(5.0), 8, alpha=0.5)  # 0.5·5/8 = 0.3125
    assert first.item() == pytest.approx(0.1875)
    assert (first + second).item() == pytest.approx(0.5)  # 0.5·(3 + 5)/8


def kto_inputs(mismatched_shift):
    policy = torch.tensor([-5.0, -6.0, -7.0], requires_grad=True)
    ref = torch.tensor([-5.5, -6.0, -6.5])  # r = (0.5, 0, −0.5)
    labels = torch.tensor([True, True, False])
    kl_policy = torch.tensor([-9.0, -10.0, -11.0], requires_grad=True)
    kl_ref = kl_policy.detach() - mismatched_shift
    return policy, ref, labels, kl_policy, kl_ref


def test_kto_loss():
    policy, ref, labels, kl_policy, kl_ref = kto_inputs(torch.tensor([0.3, 0.1, 0.2]))
    loss, metrics = kto_loss(policy, ref, labels, kl_policy, kl_ref, beta=0.5, undesirable_weight=2.0)
    # z0 = max(0, mean(0.3, 0.1, 0.2)) = 0.2
    # desirable r = 0.5: 1 − σ(0.5·0.3) = 1 − σ(0.15) = 0.462570
    # desirable r = 0:   1 − σ(0.5·(−0.2)) = 1 − σ(−0.1) = 0.524979
    # undesirable r = −0.5: 2·(1 − σ(0.5·(0.2 + 0.5))) = 2·(1 − σ(0.35)) = 0.826765
    # mean = (0.462570 + 0.524979 + 0.826765) / 3 = 0.604771
    assert loss.item() == pytest.approx(0.604771, abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.2, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.125)  # mean(0.5·0.5, 0.5·0)
    assert metrics["rewards/rejected"] == pytest.approx(-0.25)  # 0.5·(−0.5)
    loss.backward()
    assert kl_policy.grad is None  # z0 is detached
    # d/dr of λ_D(1 − σ(β(r − z0)))/3 = −λ_D·β·σ(x)(1 − σ(x))/3, x = 0.15: −0.5·0.248599/3 = −0.0414332
    assert policy.grad[0].item() == pytest.approx(-0.0414332, abs=1e-6)


def test_kto_reference_point_is_clamped_at_zero():
    policy, ref, labels, kl_policy, kl_ref = kto_inputs(torch.tensor([-0.3, -0.1, -0.2]))
    loss, metrics = kto_loss(policy, ref, labels, kl_policy, kl_ref, beta=0.5, undesirable_weight=2.0)
    # z0 = max(0, −0.2) = 0: 1 − σ(0.25) = 0.437823; 1 − σ(0) = 0.5; 2·(1 − σ(0.25)) = 0.875647
    # mean = 1.813470 / 3 = 0.604490
    assert loss.item() == pytest.approx(0.604490, abs=1e-6)
    assert metrics["kl"] == 0.0


def test_mismatched_shapes_are_an_error_not_a_broadcast():
    # (2,) against (2, 1) would broadcast to a 2×2 table of cross-pair log-ratios and average it silently.
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = two_pairs()
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(policy_chosen, policy_rejected, ref_chosen.unsqueeze(-1), ref_rejected, beta=BETA)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(policy_chosen, policy_rejected[:1], ref_chosen, ref_rejected, beta=BETA)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(
            policy_chosen, policy_rejected, None, None, beta=2.0, loss_type="simpo",
            chosen_lengths=torch.tensor([[5], [4]]), rejected_lengths=torch.tensor([4, 4]),
        )  # fmt: skip


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0])
def test_loss_weights_must_be_finite_and_not_negative(weight):
    # A NaN weight would make every step's loss NaN; a negative one would maximise that loss without bound.
    with pytest.raises(ConfigError, match="loss_weights"):
        dpo_loss(*two_pairs(), beta=BETA, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, weight])
