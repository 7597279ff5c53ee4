"""Checkpoints: a save interrupted mid-write leaves the previous checkpoint whole and loadable."""

from __future__ import annotations

import pytest
import torch

from prefalign.config import TrainConfig
from prefalign.runtime import checkpoint
from prefalign.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefalign.runtime.loop import build_optimizer, build_scheduler
from tests.helpers import tiny_model


def test_interrupted_checkpoint_leaves_previous_loadable(tmp_path, monkeypatch):
    model, _ = tiny_model(0)
    config = TrainConfig(learning_rate=1e-3)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 10)
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"position": 8})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)  # dies after the weights, mid-write
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"position": 16})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    state = load_checkpoint(list_checkpoints(tmp_path)[0], model, optimizer, scheduler)
    assert state["position"] == 8
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_a_checkpoint_of_the_earlier_format_is_refused_with_what_to_do(tmp_path):
    """Before torch.distributed.checkpoint, weights were in model.safetensors: say so, not a DCP error."""
    from prefalign.errors import TrainingError

    old = tmp_path / "checkpoints" / "step-000002"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"")
    model, _ = tiny_model(0)
    config = TrainConfig()
    optimizer = build_optimizer(model, config)
    with pytest.raises(TrainingError, match="earlier prefalign.*--train.overwrite true"):
        load_checkpoint(old, model, optimizer, build_scheduler(optimizer, config, 4))
