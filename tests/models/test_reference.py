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
