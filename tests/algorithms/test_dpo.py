"""DPO end to end on a tiny random Llama: wiring of the losses, the reference, RPO, mixed precision, errors.

The loss formulas themselves are checked in tests/losses/test_dpo.py; here the literals check that the
trainer feeds them the right numbers (at the first step the policy IS the reference, so every h = 0).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefalign.algorithms.dpo import DPOConfig, dpo
from prefalign.algorithms.dpo_pairs import REF_LOGPS_FILE, tokenized_pairs
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.data import collate_preference
from prefalign.errors import ConfigError, DataError, ModelError
from prefalign.models.forward import completion_logps
from prefalign.models.loading import apply_lora
from prefalign.models.reference import reference_mode
from prefalign.tasks.arithmetic import preference_dataset
from tests.helpers import save_tiny_model, tiny_model

TRL_METRICS = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second",
}  # fmt: skip


def make_config(run_dir, *, steps=2, batch_size=4, grad_accum=1, learning_rate=1e-2, **fields) -> DPOConfig:
    train = TrainConfig(
        output_dir=str(run_dir), learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=steps, progress=False, schedule="constant", seed=0,
    )  # fmt: skip
    fields.setdefault("mixed_precision", "off")  # exact comparisons; the bf16 path has its own test
    fields.setdefault("rpo_alpha", 0.0)  # plain DPO unless a test asks for the SFT term
    return DPOConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_length=64), train=train, **fields)


def run(run_dir, *, pairs=8, eval_pairs=4, model=None, tokenizer=None, **config_fields):
    if model is None:
        model, tokenizer = tiny_model(0)
    config = make_config(run_dir, **config_fields)
    result = dpo(
        config, dataset=preference_dataset("train", limit=pairs),
        eval_dataset=preference_dataset("held_out", limit=eval_pairs) if eval_pairs else None,
        model=model, tokenizer=tokenizer,
    )  # fmt: skip
    return model, result


def train_records(result):
    return [m for m in result.metrics if "loss" in m]


def test_first_step_loss_is_log_two_and_metrics_use_trl_names(tmp_path):
    _, result = run(tmp_path)
    first = train_records(result)[0]
    # Step 1: π = π_ref, so every h = 0 and −log σ(0) = log 2 = 0.693147; all implicit rewards 0.
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert TRL_METRICS <= set(first)
    final_eval = result.metrics[-1]
    eval_names = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    assert {f"eval/{name}" for name in eval_names} <= set(final_eval)
    # The run folder: cached reference log-probs for both splits, a loadable final model, metrics.jsonl.
    cached = load_file(str(tmp_path / REF_LOGPS_FILE))
    assert cached["train/chosen"].shape == (8,) and cached["eval/rejected"].shape == (4,)
    assert (tmp_path / "final" / "config.json").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # 2 steps + final eval


def test_ipo_first_step_loss(tmp_path):
    _, result = run(tmp_path, steps=1, beta=0.1, loss_type=["ipo"], eval_pairs=0)
    # (h − 1/(2β))² with h = 0, β = 0.1: (0 − 5)² = 25
    assert train_records(result)[0]["loss"] == pytest.approx(25.0, abs=1e-3)


def test_simpo_needs_no_reference(tmp_path):
    _, result = run(tmp_path, steps=1, beta=2.0, loss_type=["simpo"], simpo_gamma=0.5, eval_pairs=0)
    first = train_records(result)[0]
    assert not (tmp_path / REF_LOGPS_FILE).exists()
    # SimPO's rewards are β·log π(y|x)/|y|: negative for any model, and the margin is their difference.
    assert first["rewards/chosen"] < 0
    margin = first["rewards/chosen"] - first["rewards/rejected"]
    assert first["rewards/margins"] == pytest.approx(margin, abs=1e-5)


def test_precomputed_reference_matches_reference_on_the_fly(tmp_path):
    cached, cached_result = run(tmp_path / "cached", steps=3, precompute_ref_logps=True)
    live, live_result = run(tmp_path / "live", steps=3, precompute_ref_logps=False)
    assert not (tmp_path / "live" / REF_LOGPS_FILE).exists()
    for a, b in zip(train_records(cached_result), train_records(live_result), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for (name, a), (_, b) in zip(cached.named_parameters(), live.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # Training moved the policy away from its start: later steps have h != 0.
    assert train_records(cached_result)[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)


def test_shared_prompt_forward_matches_the_padded_batch(tmp_path):
    shared, shared_result = run(tmp_path / "shared", steps=3, share_prompt=True)
    padded, padded_result = run(tmp_path / "padded", steps=3, share_prompt=False)
    for a, b in zip(train_records(shared_result), train_records(padded_result), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tokens_per_second"] > 0
    for (name, a), (_, b) in zip(shared.named_parameters(), padded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    model, tokenizer = tiny_model(0)
    lora = apply_lora(model, ModelConfig(lora=True, lora_r=4, lora_alpha=8))
    pairs, _ = tokenized_pairs(
        preference_dataset("train", limit=8), tokenizer, DataConfig(max_length=64), "train"
    )
    before = completion_logps(lora, collate_preference(pairs, tokenizer.pad_token_id)).sums.detach()
    run(tmp_path, model=lora, tokenizer=tokenizer, steps=3, learning_rate=5e-2, eval_pairs=0)
    cached = load_file(str(tmp_path / REF_LOGPS_FILE))
    batch = collate_preference(pairs, tokenizer.pad_token_id)
    with torch.no_grad(), reference_mode(lora):
        base_now = completion_logps(lora, batch).sums
    after = completion_logps(lora, batch).sums.detach()
    # The stored reference = the untouched base = the policy before training (LoRA starts as identity).
    torch.testing.assert_close(cached["train/chosen"], before[:8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_now[:8], before[:8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # while the adapters did learn


def test_rpo_term_is_per_token_over_the_step_and_accumulation_invariant(tmp_path):
    model, tokenizer = tiny_model(0)
    pairs, _ = tokenized_pairs(
        preference_dataset("train", limit=4), tokenizer, DataConfig(max_length=64), "train"
    )
    with torch.no_grad():
        scored = completion_logps(model, collate_preference(pairs, tokenizer.pad_token_id))
    chosen_nll_per_token = float(-scored.token_logps[:4].sum() / scored.mask[:4].sum())
    big, big_result = run(tmp_path / "a", pairs=4, steps=1, batch_size=4, rpo_alpha=0.5, eval_pairs=0)
    small, small_result = run(
        tmp_path / "b", pairs=4, steps=1, batch_size=1, grad_accum=4, rpo_alpha=0.5, eval_pairs=0
    )
    first = train_records(big_result)[0]
    # One step over all 4 pairs: loss = log 2 + α · (chosen NLL summed / chosen tokens)
    assert first["nll_loss"] == pytest.approx(chosen_nll_per_token, rel=1e-4)
    assert first["loss"] == pytest.approx(0.693147 + 0.5 * chosen_nll_per_token, abs=1e-4)
    assert train_records(small_result)[0]["loss"] == pytest.approx(first["loss"], abs=1e-5)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_no_pairs_left_after_filtering_is_a_clear_error(tmp_path):
    model, tokenizer = tiny_model(0)
    # Truncation that makes chosen and rejected the same tokens (both keep only "1") leaves no pair.
    clipped = [{"prompt": "9+9=", "chosen": "18", "rejected": "19"}] * 2
    config = make_config(tmp_path / "a")
    config.data.max_length = 6  # BOS + 4 prompt characters + 1 completion token
    with pytest.raises(
        DataError,
        match=r"no train preference pairs left after filtering.*2 pairs had identical.*raise data.max_length",
    ):
        dpo(config, dataset=clipped, model=model, tokenizer=tokenizer)
    # Prompts that fill max_length are dropped; none left is an error too.
    config = make_config(tmp_path / "b")
    config.data.max_length = 4
    with pytest.raises(DataError, match=r"every one of the 2 rows was dropped"):
        dpo(config, dataset=clipped, model=model, tokenizer=tokenizer)
    # Identical texts are refused by the data layer, naming the row.
    same = [{"prompt": "1+1=", "chosen": "2", "rejected": "2"}]
    with pytest.raises(DataError, match="row 1.*identical"):
        dpo(make_config(tmp_path / "c"), dataset=same, model=model, tokenizer=tokenizer)


def test_reference_with_another_tokenizer_is_refused(tmp_path):
    reference_dir = save_tiny_model(tmp_path / "reference")
    _, tokenizer = tiny_model(0)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(reference_dir)
    config = make_config(tmp_path / "run", reference=str(reference_dir))
    model, policy_tokenizer = tiny_model(0)
    pairs = preference_dataset("train", limit=4)
    with pytest.raises(ModelError, match=r"does not share the policy's tokenizer.*<\|extra\|>"):
        dpo(config, dataset=pairs, model=model, tokenizer=policy_tokenizer)
    bigger, _ = tiny_model(0)
    bigger.resize_token_embeddings(len(tokenizer))
    config = make_config(tmp_path / "run2")
    with pytest.raises(ModelError, match="token embeddings"):
        dpo(config, dataset=pairs, model=model, tokenizer=policy_tokenizer, reference=bigger)


def test_a_separate_reference_model_is_used(tmp_path):
    reference_dir = save_tiny_model(tmp_path / "reference", seed=1)
    _, result = run(tmp_path / "run", steps=1, reference=str(reference_dir), eval_pairs=0)
    # A different reference: at step 1 h != 0, so the loss is no longer log 2.
    assert train_records(result)[0]["loss"] != pytest.approx(0.693147, abs=1e-3)


def test_bf16_autocast_keeps_the_first_step_near_log_two(tmp_path):
    model, result = run(tmp_path, steps=2, mixed_precision="bf16", eval_pairs=0)
    first = train_records(result)[0]
    # Reference and policy both run under autocast; bf16 rounding leaves h close to, not exactly, 0.
    assert first["loss"] == pytest.approx(0.693147, abs=2e-2)
    assert next(model.parameters()).dtype == torch.float32  # weights and optimizer stay float32


def test_bf16_under_gradient_checkpointing_trains(tmp_path):
    # Checkpointing recomputes the forward in the backward pass, outside mixed_precision's float32 attention:
    # the forward must then keep autocast's own attention dtype, or the recomputation's dtypes would differ.
    model, tokenizer = tiny_model(0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, result = run(tmp_path, model=model, tokenizer=tokenizer, steps=2, mixed_precision="bf16", eval_pairs=0)
    assert train_records(result)[0]["loss"] == pytest.approx(0.693147, abs=2e-2)
    assert all(record["grad_norm"] > 0 for record in train_records(result))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"loss_type": ["sigmoidd"]}, "Unknown DPO loss_type 'sigmoidd'"),
        ({"loss_type": ["ipo"], "label_smoothing": 0.1}, "no effect"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, "< 0.5"),
        ({"rpo_alpha": -1.0}, "rpo_alpha"),
    ],
)
def test_bad_loss_config_fails_before_loading_anything(tmp_path, fields, message):
    config = make_config(tmp_path, **fields)
    config.model.name_or_path = str(tmp_path / "does-not-exist")  # never reached
    with pytest.raises(ConfigError, match=message):
        dpo(config)
    assert not (tmp_path / "config.yaml").exists()
