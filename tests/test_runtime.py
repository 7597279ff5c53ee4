"""The shared runtime: schedule, accumulation equivalence, exact resume, atomic checkpoints, NaN guard."""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.algorithms.sft import completion_tokens, sft_loss
from prefalign.config import DataConfig, TrainConfig
from prefalign.data import collate_sft, tokenize_sft
from prefalign.errors import TrainingError
from prefalign.runtime import checkpoint, metrics
from prefalign.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from prefalign.runtime.loop import build_optimizer, build_scheduler, lr_factor, train_on_examples
from prefalign.tasks.arithmetic import sft_dataset
from tests.helpers import assert_same_parameters, tiny_model


def _examples(tokenizer, count: int = 24):
    data, _ = tokenize_sft(sft_dataset("train", limit=count), tokenizer, DataConfig())
    return data.to_list()


def _train(run_dir, *, batch_size, grad_accum, max_steps, seed=0, model_seed=0, resume=False, save_every=0, examples=None, loss_fn=sft_loss):
    model, tokenizer = tiny_model(model_seed)
    config = TrainConfig(
        output_dir=str(run_dir), learning_rate=1e-2, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
        warmup_ratio=0.25, seed=seed, save_every=save_every, resume=resume, progress=False, max_grad_norm=1.0,
    )
    result = train_on_examples(
        model=model, examples=examples or _examples(tokenizer), collate=lambda b: collate_sft(b, tokenizer.pad_token_id),
        loss_fn=loss_fn, units_of=completion_tokens, config=config, run_dir=run_dir,
    )
    return model, result


def test_lr_schedule_warmup_then_cosine_and_linear():
    config = TrainConfig(warmup_ratio=0.2, schedule="cosine")
    # 10 steps, 2 warmup: (1/2, 2/2), then cosine over the 8 remaining: step 2 -> 1.0, step 6 -> 0.5 (cos(pi/2)=0).
    assert [round(lr_factor(s, 10, config), 6) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    linear = TrainConfig(warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.1)
    # 0.1 + 0.9 * (1 - 5/10) = 0.55
    assert lr_factor(5, 10, linear) == pytest.approx(0.55)


def test_accumulation_equivalence(tmp_path):
    """Batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same update."""
    big, _ = _train(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=2)
    small, _ = _train(tmp_path / "b", batch_size=1, grad_accum=8, max_steps=2)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # And the update is not trivially zero.
    fresh, _ = tiny_model(0)
    assert not torch.allclose(next(fresh.parameters()), next(big.parameters()))


def test_resume_mid_epoch_is_bit_exact(tmp_path):
    """24 examples, 4 per step x 2 accumulation: a checkpoint at step 2 sits mid-epoch (16 of 24 seen)."""
    full_model, full = _train(tmp_path / "full", batch_size=4, grad_accum=2, max_steps=6)
    _train(tmp_path / "cut", batch_size=4, grad_accum=2, max_steps=6, save_every=2)
    # Simulate a crash after step 2: keep only that checkpoint and the metrics written up to it.
    checkpoints = list_checkpoints(tmp_path / "cut")
    assert [p.name for p in checkpoints] == ["step-000002", "step-000004"]
    import shutil

    shutil.rmtree(checkpoints[1])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[:2]
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed_model, resumed = _train(tmp_path / "cut", batch_size=4, grad_accum=2, max_steps=6, resume=True, model_seed=1)
    assert [m["step"] for m in resumed.metrics] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics[2:]]
    assert_same_parameters(full_model, resumed_model)


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


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding_loss(model, batch):
        calls["n"] += 1
        output = sft_loss(model, batch)
        if calls["n"] > 2:  # steps 1-2 are fine, step 3 blows up
            output.loss_sum = output.loss_sum * float("nan")
        return output

    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 3.*last good checkpoint is .*step-000002"):
        _train(tmp_path, batch_size=4, grad_accum=1, max_steps=5, save_every=2, loss_fn=exploding_loss)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]


def test_metrics_file_has_one_record_per_step(tmp_path):
    _, result = _train(tmp_path, batch_size=4, grad_accum=1, max_steps=3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "step_time"} <= set(records[0])
    assert all(r["loss"] > 0 for r in records)


def test_metrics_reach_an_accelerate_tracker(tmp_path):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):  # accelerate's extension point for a tracker it does not ship
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.finished = [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    logger = metrics.MetricsLogger(tmp_path, 2, TrainConfig(progress=False, report_to=[recorder]))
    logger.log(1, {"loss": torch.tensor(0.5)})
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert recorder.logged == [(1, {"step": 1, "loss": 0.5}), (2, {"step": 2, "loss": 0.25})]
    assert recorder.finished
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.25]


def test_fused_adamw_is_the_default_and_can_be_turned_off():
    model, _ = tiny_model(0)
    assert build_optimizer(model, TrainConfig()).defaults["fused"]
    assert not build_optimizer(model, TrainConfig(fused_optimizer=False)).defaults["fused"]
