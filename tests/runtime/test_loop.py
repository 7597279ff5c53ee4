"""The shared training loop: schedule, accumulation equivalence, exact resume, NaN guard, metrics file."""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.config import DataConfig, TrainConfig
from prefalign.data import collate_sft, tokenize_sft
from prefalign.errors import TrainingError
from prefalign.models.forward import completion_logps
from prefalign.runtime.checkpoint import list_checkpoints
from prefalign.runtime.loop import LossOutput, build_optimizer, lr_factor, train_on_examples
from prefalign.tasks.arithmetic import sft_dataset
from tests.helpers import assert_same_parameters, tiny_model


def sft_loss(model, batch) -> LossOutput:
    """The summed completion-token NLL of a micro-batch (the runtime divides by the step's tokens)."""
    scored = completion_logps(model, batch)
    tokens = int(batch["attention_mask"].sum())
    return LossOutput(loss_sum=-scored.token_logps.sum(), metrics={}, tokens=tokens)


def completion_tokens(batch) -> float:
    return float(batch["completion_mask"].sum())


def _examples(tokenizer, count: int = 24):
    data, _ = tokenize_sft(sft_dataset("train", limit=count), tokenizer, DataConfig())
    return data.to_list()


def _train(
    run_dir, *, batch_size, grad_accum, max_steps, seed=0, model_seed=0, resume=False, save_every=0,
    examples=None, loss_fn=sft_loss,
):
    model, tokenizer = tiny_model(model_seed)
    config = TrainConfig(
        output_dir=str(run_dir), learning_rate=1e-2, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=max_steps, warmup_ratio=0.25, seed=seed, save_every=save_every, resume=resume,
        progress=False, max_grad_norm=1.0,
    )
    result = train_on_examples(
        model=model, examples=examples or _examples(tokenizer),
        collate=lambda b: collate_sft(b, tokenizer.pad_token_id), loss_fn=loss_fn, units_of=completion_tokens,
        config=config, run_dir=run_dir,
    )
    return model, result


def test_lr_schedule_warmup_then_cosine_and_linear():
    config = TrainConfig(warmup_ratio=0.2, schedule="cosine")
    # 10 steps, 2 warmup: (1/2, 2/2), then cosine over the 8 remaining: step 2 -> 1.0,
    # step 6 -> 0.5 (cos(pi/2)=0).
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
    resumed_model, resumed = _train(
        tmp_path / "cut", batch_size=4, grad_accum=2, max_steps=6, resume=True, model_seed=1
    )
    assert [m["step"] for m in resumed.metrics] == [3, 4, 5, 6]
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics[2:]]
    assert_same_parameters(full_model, resumed_model)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding_loss(model, batch):
        calls["n"] += 1
        output = sft_loss(model, batch)
        if calls["n"] > 2:  # steps 1-2 are fine, step 3 blows up
            output.loss_sum = output.loss_sum * float("nan")
        return output

    with pytest.raises(
        TrainingError, match=r"loss is nan at optimizer step 3.*last good checkpoint is .*step-000002"
    ):
        _train(tmp_path, batch_size=4, grad_accum=1, max_steps=5, save_every=2, loss_fn=exploding_loss)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]


def test_metrics_file_has_one_record_per_step(tmp_path):
    _, result = _train(tmp_path, batch_size=4, grad_accum=1, max_steps=3)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "step_time"} <= set(records[0])
    assert all(r["loss"] > 0 for r in records)


def test_fused_adamw_is_the_default_and_can_be_turned_off():
    model, _ = tiny_model(0)
    assert build_optimizer(model, TrainConfig()).defaults["fused"]
    assert not build_optimizer(model, TrainConfig(fused_optimizer=False)).defaults["fused"]
