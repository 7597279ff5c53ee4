"""The reference model: a LoRA policy's base with its adapters off, or a frozen copy of the policy."""

from __future__ import annotations

import pytest
import torch

from prefalign.config import ModelConfig
from prefalign.errors import ModelError
from prefalign.models.loading import load_causal_lm
from prefalign.models.reference import frozen_copy, reference_mode
from tests.helpers import save_tiny_model, tiny_model


def test_reference_mode_needs_lora(tmp_path):
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(save_tiny_model(tmp_path / "b")), device="cpu"))
    with pytest.raises(ModelError, match="needs a LoRA"):
        with reference_mode(model):
            pass


def test_frozen_copy_does_not_follow_training():
    model, _ = tiny_model()
    copy = frozen_copy(model)
    assert all(not parameter.requires_grad for parameter in copy.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(copy.parameters()))


def _lora(model):
    from prefalign.models.loading import apply_lora

    return apply_lora(model, ModelConfig(lora=True, lora_r=4, lora_alpha=8))


def _first_logit(network) -> float:
    with torch.no_grad():
        return float(network(torch.tensor([[10, 11, 12]])).logits[0, -1, 20])


def test_reference_is_chosen_in_one_place():
    """A given model (frozen), a LoRA policy with adapters off, a frozen copy, or the policy itself."""
    from prefalign.models.reference import Reference

    policy, _ = tiny_model(0)
    other, _ = tiny_model(1)
    given = Reference(policy, other)
    assert given.model is other and not any(p.requires_grad for p in other.parameters())
    assert Reference(policy, snapshot=False).model is policy  # valid before the first update only

    copied = Reference(policy)
    before = _first_logit(policy)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.01)
    with copied.network() as network:
        assert network is not policy and _first_logit(network) == before  # the copy did not move
    assert _first_logit(policy) != before

    lora = _lora(tiny_model(2)[0])
    with torch.no_grad():  # move the adapters away from their zero start
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.5)
    adapters_on = _first_logit(lora)
    reference = Reference(lora)
    with reference.network() as network:
        assert network is lora and _first_logit(network) != adapters_on  # adapters off inside
    assert _first_logit(lora) == adapters_on  # and on again after
    merged = Reference(lora, adapters_off=False)  # iterative DPO's "previous": the policy as it is now
    with merged.network() as network:
        assert network is not lora and _first_logit(network) == pytest.approx(adapters_on, abs=1e-5)
