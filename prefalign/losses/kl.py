"""Per-token KL estimators from samples of π (Schulman, "Approximating KL divergence", 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.errors import ConfigError

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) on tokens sampled from π, with Δ = log π_ref − log π:

        k1 = −Δ              unbiased, high variance, can be negative; its gradient is zero in
                             expectation, so use it inside a reward (PPO), not as a loss term
        k2 = ½ Δ²            biased, low variance; its gradient is that of KL(π‖π_ref)
        k3 = exp(Δ) − Δ − 1  unbiased, ≥ 0; as a loss its gradient is that of the forward
                             KL(π_ref‖π) (GRPO's choice, Shao et al. 2024)

    logps, ref_logps: same shape, typically (batch, seq); returns that shape; nothing is masked
    (mask padding afterwards, e.g. with masked_mean, which also drops inf at padding).

    k3 is computed as expm1(Δ) − Δ, which keeps digits for small |Δ|. Nothing is clamped: exp(Δ)
    grows without bound when π_ref ≫ π (Δ = 20 gives about 4.9e8; float32 overflows to inf near
    Δ = 88.7). A token that π has almost ruled out but π_ref likes can dominate the batch; that is
    the estimator's variance, shown rather than hidden.
    """
    delta = ref_logps - logps
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.expm1(delta) - delta
    raise ConfigError(f"Unknown KL estimator kind {kind!r}; choose from {', '.join(KL_KINDS)}.")
