"""Direct preference losses: the DPO family on (chosen, rejected) pairs, the RPO SFT term, and KTO.

Inputs are summed completion log-probs, one number per sequence (prompt tokens excluded):
log π(y|x) = Σ_t log π(y_t | x, y_<t). With u_w = log π(y_w|x) − log π_ref(y_w|x), u_l likewise
and h = u_w − u_l, each loss type is a small per-pair function registered by name in
`DPO_LOSSES`; the batch loss is the mean over pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.errors import ConfigError


@dataclass(frozen=True)
class PreferencePairs:
    """The inputs of one DPO-family loss call; all tensors (num_pairs,)."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    ref_rejected_logps: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    simpo_gamma: float

    def log_ratio_margin(self) -> Tensor:
        """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))."""
        chosen = self.policy_chosen_logps - self.ref_chosen_logps
        rejected = self.policy_rejected_logps - self.ref_rejected_logps
        return chosen - rejected

    def length_normalized_log_ratio_margin(self) -> Tensor:
        """h with each log-ratio divided by its completion length first."""
        chosen = (self.policy_chosen_logps - self.ref_chosen_logps) / self.chosen_lengths
        rejected = (self.policy_rejected_logps - self.ref_rejected_logps) / self.rejected_lengths
        return chosen - rejected

    def length_normalized_logp_margin(self) -> Tensor:
        """log π(y_w)/|y_w| − log π(y_l)/|y_l| (no reference: SimPO)."""
        return (
            self.policy_chosen_logps / self.chosen_lengths
            - self.policy_rejected_logps / self.rejected_lengths
        )


def _sigmoid(pairs: PreferencePairs) -> Tensor:
    """DPO (Rafailov et al. 2023): −log σ(βh); with label smoothing ε it is conservative DPO
    (Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh)."""
    logits = pairs.beta * pairs.log_ratio_margin()
    smoothing = pairs.label_smoothing
    return -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)


def _robust(pairs: PreferencePairs) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε).
    Unbiased under label flips with rate ε; unbounded below, so it can be negative."""
    logits = pairs.beta * pairs.log_ratio_margin()
    smoothing = pairs.label_smoothing
    unscaled = -(1 - smoothing) * F.logsigmoid(logits) + smoothing * F.logsigmoid(-logits)
    return unscaled / (1 - 2 * smoothing)


def _hinge(pairs: PreferencePairs) -> Tensor:
    """Hinge (RSO, Liu et al. 2024): max(0, 1 − βh)."""
    return torch.relu(1 - pairs.beta * pairs.log_ratio_margin())


def _ipo(pairs: PreferencePairs) -> Tensor:
    """IPO as in the paper (Azar et al. 2023), on summed log-ratios: (h − 1/(2β))², β in the role of τ."""
    return (pairs.log_ratio_margin() - 1 / (2 * pairs.beta)) ** 2


def _ipo_length_normalized(pairs: PreferencePairs) -> Tensor:
    """IPO with each log-ratio divided by its length first (what TRL calls `ipo`)."""
    return (pairs.length_normalized_log_ratio_margin() - 1 / (2 * pairs.beta)) ** 2


def _simpo(pairs: PreferencePairs) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free: −log σ(β(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)."""
    return -F.logsigmoid(pairs.beta * pairs.length_normalized_logp_margin() - pairs.simpo_gamma)


@dataclass(frozen=True)
class LossSpec:
    per_pair: Callable[[PreferencePairs], Tensor]
    needs_reference: bool = True
    needs_lengths: bool = False
    uses_label_smoothing: bool = False
    max_label_smoothing: float = 0.5  # inclusive unless strict_max
    strict_max: bool = False


DPO_LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, uses_label_smoothing=True),
    "cdpo": LossSpec(_sigmoid, uses_label_smoothing=True),
    "conservative": LossSpec(_sigmoid, uses_label_smoothing=True),
    "robust": LossSpec(_robust, uses_label_smoothing=True, strict_max=True),
    "hinge": LossSpec(_hinge),
    "ipo": LossSpec(_ipo),
    "ipo_length_normalized": LossSpec(_ipo_length_normalized, needs_lengths=True),
    "simpo": LossSpec(_simpo, needs_reference=False, needs_lengths=True),
}


def _resolve_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None
) -> list[tuple[str, float]]:
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not names:
        raise ConfigError("loss_type is empty: name at least one of " + ", ".join(sorted(DPO_LOSSES)) + ".")
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    if len(weights) != len(names):
        raise ConfigError(f"loss_weights has {len(weights)} entries but loss_type names {len(names)} losses.")
    for weight in weights:
        if not math.isfinite(float(weight)) or weight < 0:
            raise ConfigError(f"loss_weights must be finite and >= 0, got {weights}.")
    for name in names:
        if name not in DPO_LOSSES:
            raise ConfigError(f"Unknown DPO loss_type {name!r}; choose from {', '.join(sorted(DPO_LOSSES))}.")
    return list(zip(names, weights, strict=True))


def _check_shapes(pairs: PreferencePairs) -> None:
    """Every tensor (num_pairs,): a (num_pairs, 1) among them would broadcast to a table of cross-pair
    terms."""
    expected = tuple(pairs.policy_chosen_logps.shape)
    if len(expected) != 1:
        raise ValueError(f"policy_chosen_logps must have shape (num_pairs,), got {expected}.")
    for name in (
        "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths",
        "rejected_lengths",
    ):
        value = getattr(pairs, name)
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but policy_chosen_logps has {expected}: "
                "pass (num_pairs,) each."
            )


def _check_pairs(pairs: PreferencePairs, names: list[str]) -> None:
    _check_shapes(pairs)
    if not pairs.beta > 0:
        raise ConfigError(f"beta must be > 0, got {pairs.beta}.")
    smoothing = pairs.label_smoothing
    specs = {name: DPO_LOSSES[name] for name in names}
    if smoothing != 0 and not any(spec.uses_label_smoothing for spec in specs.values()):
        raise ConfigError(
            f"label_smoothing={smoothing} has no effect on loss_type {names}: "
            "it applies to sigmoid/cdpo/conservative and robust only; set it to 0."
        )
    for name, spec in specs.items():
        too_high = (
            smoothing >= spec.max_label_smoothing if spec.strict_max else smoothing > spec.max_label_smoothing
        )
        if spec.uses_label_smoothing and (smoothing < 0 or too_high):
            bound = "< 0.5" if spec.strict_max else "<= 0.5"
            raise ConfigError(
                f"label_smoothing must be >= 0 and {bound} for loss_type {name!r}, got {smoothing}."
            )
        if spec.needs_reference and (pairs.ref_chosen_logps is None or pairs.ref_rejected_logps is None):
            raise ConfigError(
                f"loss_type {name!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps); "
                "compute them with the reference model, or use the reference-free 'simpo'."
            )
        if spec.needs_lengths:
            _check_lengths(name, pairs.chosen_lengths, pairs.rejected_lengths)


def _check_lengths(name: str, chosen_lengths: Tensor | None, rejected_lengths: Tensor | None) -> None:
    if chosen_lengths is None or rejected_lengths is None:
        raise ConfigError(
            f"loss_type {name!r} is length-normalised: pass chosen_lengths and rejected_lengths "
            "(completion token counts per pair)."
        )
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise ValueError(f"loss_type {name!r}: every completion length must be >= 1 (an empty completion?).")


def _metrics(pairs: PreferencePairs, reference_free: bool) -> dict[str, float]:
    with torch.no_grad():
        if reference_free:  # SimPO's implicit reward: β·log π(y|x)/|y|
            chosen = pairs.beta * pairs.policy_chosen_logps / pairs.chosen_lengths
            rejected = pairs.beta * pairs.policy_rejected_logps / pairs.rejected_lengths
        else:
            chosen = pairs.beta * (pairs.policy_chosen_logps - pairs.ref_chosen_logps)
            rejected = pairs.beta * (pairs.policy_rejected_logps - pairs.ref_rejected_logps)
        return {
            "rewards/chosen": chosen.mean().item(),
            "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).float().mean().item(),
            "logps/chosen": pairs.policy_chosen_logps.mean().item(),
            "logps/rejected": pairs.policy_rejected_logps.mean().item(),
        }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, dict[str, float]]:
    """Mean over pairs of a DPO-family per-pair loss, with h = u_w − u_l (see module docstring).

    loss_type (per-pair loss):
      sigmoid          −log σ(βh)                                  Rafailov et al. 2023 (DPO)
      cdpo, conservative  −(1−ε) log σ(βh) − ε log σ(−βh), ε = label_smoothing ∈ [0, 0.5]
                       (sigmoid with label_smoothing is the same)  Mitchell 2023 (cDPO note)
      robust           [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1−2ε), ε < 0.5; can be negative
                                                                   Chowdhury et al. 2024
      hinge            max(0, 1 − βh)                              Liu et al. 2024 (RSO)
      ipo              (h − 1/(2β))² on SUMMED log-ratios (the paper's IPO)   Azar et al. 2023
      ipo_length_normalized  the same with each log-ratio divided by its length (TRL's `ipo`)
      simpo            −log σ(β(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ), γ = simpo_gamma,
                       no reference (ref logps may be None)        Meng et al. 2024
    A list of names with `loss_weights` gives the weighted sum of their batch losses.

    All tensors (num_pairs,); lengths are completion token counts. Returns (loss, metrics):
    `rewards/chosen` = mean β·u_w, `rewards/rejected` = mean β·u_l, `rewards/margins` = mean β·h,
    `rewards/accuracies` = mean [u_w > u_l], `logps/chosen`, `logps/rejected` (means); when every
    loss is reference-free (simpo) the rewards are β·log π(y|x)/|y|. Also `loss/<name>` for each
    part of a combination.
    """
    weighted = _resolve_loss_types(loss_type, loss_weights)
    pairs = PreferencePairs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, beta, label_smoothing, simpo_gamma,
    )  # fmt: skip
    names = [name for name, _ in weighted]
    _check_pairs(pairs, names)
    loss = policy_chosen_logps.new_zeros(())
    parts = {}
    for name, weight in weighted:
        part = DPO_LOSSES[name].per_pair(pairs).mean()
        parts[f"loss/{name}"] = part.detach().item()
        loss = loss + weight * part
    reference_free = not any(DPO_LOSSES[name].needs_reference for name in names)
    metrics = _metrics(pairs, reference_free)
    if len(weighted) > 1:
        metrics.update(parts)
    return loss, metrics


def sft_term(chosen_token_nll_sum: Tensor, num_chosen_tokens: int | Tensor, *, alpha: float = 1.0) -> Tensor:
    """RPO's SFT term: α · (Σ NLL of chosen-completion tokens) / (chosen-completion tokens in the step).

    chosen_token_nll_sum: the summed −log π(y_t) over the chosen-completion tokens of this
    micro-batch (any shape; it is summed). num_chosen_tokens: the number of chosen-completion tokens
    in the whole OPTIMIZER STEP (all micro-batches), so the micro-batch terms add up to the step's
    per-token mean NLL and every token weighs the same.

    Pang et al. 2024 (Iterative RPO) instead normalise each chosen sequence by its own length and
    average over pairs (every sequence weighs the same, short ones' tokens more) with α = 1; this
    per-token normalisation over the step is a deliberate difference.
    """
    count = torch.as_tensor(
        num_chosen_tokens, dtype=chosen_token_nll_sum.dtype, device=chosen_token_nll_sum.device
    )
    return alpha * chosen_token_nll_sum.sum() / count.clamp(min=1)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples; mean over all examples of

        desirable (label True):    λ_D · (1 − σ(β(r − z₀)))
        undesirable (label False): λ_U · (1 − σ(β(z₀ − r)))

    with r = log π(y|x) − log π_ref(y|x) and the reference point
    z₀ = max(0, mean_i [log π(y_j(i)|x_i) − log π_ref(y_j(i)|x_i)]) over mismatched pairs (each
    prompt with another example's completion), detached: no gradient flows through z₀.

    policy_logps, ref_logps, labels (bool): (batch,); kl_policy_logps, kl_ref_logps: (num_mismatched,).
    Metrics: `kl` (z₀), `rewards/chosen` / `rewards/rejected` (mean β·r of desirable /
    undesirable examples, present only when there are some), `count/desirable`, `count/undesirable`.
    """
    if not beta > 0:
        raise ConfigError(f"beta must be > 0, got {beta}.")
    labels = labels.bool()
    reference_point = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    log_ratios = policy_logps - ref_logps  # (batch,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - reference_point)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - log_ratios)))
    loss = torch.where(labels, desirable, undesirable).mean()
    metrics = {
        "kl": reference_point.item(),
        "count/desirable": int(labels.sum().item()),
        "count/undesirable": int((~labels).sum().item()),
    }
    rewards = (beta * log_ratios).detach()
    if metrics["count/desirable"]:
        metrics["rewards/chosen"] = rewards[labels].mean().item()
    if metrics["count/undesirable"]:
        metrics["rewards/rejected"] = rewards[~labels].mean().item()
    return loss, metrics
