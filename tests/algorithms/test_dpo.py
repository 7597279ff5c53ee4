"""DPO end to end on a tiny random Llama: wiring of the losses, the reference, RPO, mixed precision, errors.

The loss formulas themselves are checked in tests/losses/test_dpo.py; here the literals check that the
trainer feeds them the right numbers (at the first step the policy IS the reference, so every h = 0), and
wherever the policy differs from the reference (a different reference model, or after training) the logged
numbers are recomputed from the formula with a plain log-prob computation written here, so a shift or mask
bug in the trainer's forward changes them.
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F
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


# One plain SGD step of rate 1: AdamW's first step is lr · g / (|g| + ε), which with ε = lr ≫ |g| is the
# gradient g itself (the usual lr · sign(g) would turn float noise in a near-zero gradient into a full step).
SGD_LIKE = dict(learning_rate=1e6, adam_epsilon=1e6, weight_decay=0.0, max_grad_norm=0.0)


def make_config(
    run_dir, *, steps=2, batch_size=4, grad_accum=1, learning_rate=1e-2, train_fields=None, **fields
) -> DPOConfig:
    train = dict(
        output_dir=str(run_dir), learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum,
        max_steps=steps, progress=False, schedule="constant", seed=0,
    )  # fmt: skip
    train = TrainConfig(**{**train, **(train_fields or {})})
    fields.setdefault("mixed_precision", "off")  # exact comparisons; the bf16 path has its own test
    fields.setdefault("rpo_alpha", 0.0)  # plain DPO unless a test asks for the SFT term
    return DPOConfig(model=ModelConfig(device="cpu"), data=DataConfig(max_length=64), train=train, **fields)


def run(run_dir, *, pairs=8, eval_pairs=4, model=None, tokenizer=None, reference=None, **config_fields):
    if model is None:
        model, tokenizer = tiny_model(0)
    config = make_config(run_dir, **config_fields)
    result = dpo(
        config, dataset=preference_dataset("train", limit=pairs),
        eval_dataset=preference_dataset("held_out", limit=eval_pairs) if eval_pairs else None,
        model=model, tokenizer=tokenizer, reference=reference,
    )  # fmt: skip
    return model, result


def train_records(result):
    return [m for m in result.metrics if "loss" in m]


def pairs_of(split: str, limit: int):
    """The tokenized pairs the trainer sees (the tokenizer and data.max_length of make_config)."""
    _, tokenizer = tiny_model(0)
    rows = preference_dataset(split, limit=limit)
    return tokenized_pairs(rows, tokenizer, DataConfig(max_length=64), split)[0]


def other_reference():
    """A reference that is not the policy: the tiny model of seed 1 with its output head scaled by 4. Two
    random tiny models are both close to uniform (their h differ by hundredths of a nat); this one's
    log-probs differ from the policy's by nats, so h, the loss and the rewards are far from their h = 0
    values."""
    model, _ = tiny_model(1)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


@torch.no_grad()
def plain_logps(model, pairs) -> dict[str, torch.Tensor]:
    """Summed completion log-probs {chosen, rejected}, (num_pairs,) each, and their token counts, written out
    plainly: one unpadded forward of prompt + completion per sequence, the logits at position t scoring
    token t + 1 (log-softmax over the vocabulary), summed over the completion tokens only."""
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            prompt, completion = pair["prompt_ids"], pair[f"{side}_ids"]
            ids = torch.tensor(prompt + completion)
            log_probs = torch.log_softmax(model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float(), dim=-1)
            picked = log_probs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)  # token t + 1 of the sequence
            out[side].append(picked[len(prompt) - 1 :].sum())  # the completion's tokens only
            out[f"{side}_tokens"].append(float(len(completion)))
    model.train(was_training)
    return {key: torch.tensor(values) for key, values in out.items()}


def expected_dpo(policy, reference, pairs, *, beta: float, loss: str = "sigmoid") -> dict[str, float]:
    """The trainer's metrics from the formulas: h = (π_c − ref_c) − (π_r − ref_r) per pair from plain_logps;
    sigmoid −log σ(βh) or ipo (h − 1/(2β))², implicit rewards β·(π − ref), means over the pairs."""
    pi = plain_logps(policy, pairs)
    ref = plain_logps(reference, pairs)
    chosen, rejected = beta * (pi["chosen"] - ref["chosen"]), beta * (pi["rejected"] - ref["rejected"])
    h = (chosen - rejected) / beta
    per_pair = -F.logsigmoid(beta * h) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return {
        "_mean_abs_margin": float((beta * h).abs().mean()),  # not logged: how far from h = 0 the case is
        "loss": float(per_pair.mean()), "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()), "rewards/margins": float((chosen - rejected).mean()),
        "rewards/accuracies": float((chosen > rejected).float().mean()),
        "logps/chosen": float(pi["chosen"].mean()), "logps/rejected": float(pi["rejected"].mean()),
    }  # fmt: skip


def assert_metrics(record, expected, *, prefix="", abs_tol=1e-4):
    """The logged metrics (eval/ ones with prefix="eval/") equal `expected`, in a case with h far from 0."""
    assert expected.pop("_mean_abs_margin") > 1e-2
    for key, value in expected.items():
        assert record[prefix + key] == pytest.approx(value, rel=1e-4, abs=abs_tol), prefix + key


def test_first_step_loss_is_log_two_and_metrics_use_trl_names(tmp_path):
    model, result = run(tmp_path)
    first = train_records(result)[0]
    # Step 1: π = π_ref, so every h = 0 and −log σ(0) = log 2 = 0.693147; all implicit rewards 0.
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert TRL_METRICS <= set(first)
    final_eval = result.metrics[-1]
    eval_names = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    assert {f"eval/{name}" for name in eval_names} <= set(final_eval)
    # After two updates the policy is no longer the reference: the final eval, recomputed.
    start, _ = tiny_model(0)
    assert_metrics(final_eval, expected_dpo(model, start, pairs_of("held_out", 4), beta=0.1), prefix="eval/")
    # The run folder: cached reference log-probs for both splits, a loadable final model, metrics.jsonl.
    cached = load_file(str(tmp_path / REF_LOGPS_FILE))
    assert cached["train/chosen"].shape == (8,) and cached["eval/rejected"].shape == (4,)
    assert (tmp_path / "final" / "config.json").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # 2 steps + final eval


def test_ipo_first_step_loss(tmp_path):
    _, result = run(tmp_path, steps=1, beta=0.1, loss_type=["ipo"], eval_pairs=0)
    # (h − 1/(2β))² with h = 0, β = 0.1: (0 − 5)² = 25
    assert train_records(result)[0]["loss"] == pytest.approx(25.0, abs=1e-3)
    # Another reference model: h != 0, and the step-1 numbers (all 4 pairs in the step) are recomputed.
    reference = other_reference()
    _, result = run(
        tmp_path / "other", pairs=4, steps=1, beta=0.1, loss_type=["ipo"], eval_pairs=0, reference=reference
    )
    expected = expected_dpo(tiny_model(0)[0], reference, pairs_of("train", 4), beta=0.1, loss="ipo")
    assert_metrics(train_records(result)[0], expected)


def test_simpo_needs_no_reference(tmp_path):
    _, result = run(
        tmp_path, pairs=4, steps=1, beta=2.0, loss_type=["simpo"], simpo_gamma=0.5, eval_pairs=0
    )
    first = train_records(result)[0]
    assert not (tmp_path / REF_LOGPS_FILE).exists()
    # SimPO's rewards are β·log π(y|x)/|y|: negative for any model, and the margin is their difference.
    assert first["rewards/chosen"] < 0
    margin = first["rewards/chosen"] - first["rewards/rejected"]
    assert first["rewards/margins"] == pytest.approx(margin, abs=1e-5)
    # Recomputed over the step's 4 pairs: −log σ(β(π_c/|y_c| − π_r/|y_r|) − γ), rewards β·π/|y|.
    pi = plain_logps(tiny_model(0)[0], pairs_of("train", 4))
    chosen, rejected = 2.0 * pi["chosen"] / pi["chosen_tokens"], 2.0 * pi["rejected"] / pi["rejected_tokens"]
    expected = {
        "loss": float((-F.logsigmoid(chosen - rejected - 0.5)).mean()),
        "rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
        "logps/chosen": float(pi["chosen"].mean()), "logps/rejected": float(pi["rejected"].mean()),
    }  # fmt: skip
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


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
    # Both final evals (cached reference log-probs; a reference forward per batch), recomputed.
    start, eval_pairs = tiny_model(0)[0], pairs_of("held_out", 4)
    for model, result in ((cached, cached_result), (live, live_result)):
        assert_metrics(result.metrics[-1], expected_dpo(model, start, eval_pairs, beta=0.1), prefix="eval/")


def test_shared_prompt_forward_matches_the_padded_batch(tmp_path):
    shared, shared_result = run(tmp_path / "shared", steps=3, share_prompt=True)
    padded, padded_result = run(tmp_path / "padded", steps=3, share_prompt=False)
    for a, b in zip(train_records(shared_result), train_records(padded_result), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tokens_per_second"] > 0
    for (name, a), (_, b) in zip(shared.named_parameters(), padded.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # Either forward's final eval (policy trained away from the reference), recomputed.
    start, eval_pairs = tiny_model(0)[0], pairs_of("held_out", 4)
    for model, result in ((shared, shared_result), (padded, padded_result)):
        assert_metrics(result.metrics[-1], expected_dpo(model, start, eval_pairs, beta=0.1), prefix="eval/")


def test_padded_forward_step_metrics_match_a_recomputation(tmp_path):
    """The padded (share_prompt off) training forward with another reference: step 1's numbers over all 4
    pairs, recomputed."""
    reference = other_reference()
    _, result = run(
        tmp_path, pairs=4, steps=1, share_prompt=False, beta=0.5, eval_pairs=0, reference=reference
    )
    expected = expected_dpo(tiny_model(0)[0], reference, pairs_of("train", 4), beta=0.5)
    assert_metrics(train_records(result)[0], expected)


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
    base = plain_logps(tiny_model(0)[0], pairs)  # the same numbers, written out plainly
    torch.testing.assert_close(cached["train/chosen"], base["chosen"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["train/rejected"], base["rejected"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_now[:8], before[:8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # while the adapters did learn


@pytest.mark.parametrize("another_reference", [False, True])
def test_rpo_term_is_per_token_over_the_step_and_accumulation_invariant(tmp_path, another_reference):
    model, tokenizer = tiny_model(0)
    pairs, _ = tokenized_pairs(
        preference_dataset("train", limit=4), tokenizer, DataConfig(max_length=64), "train"
    )
    with torch.no_grad():
        scored = completion_logps(model, collate_preference(pairs, tokenizer.pad_token_id))
    chosen_nll_per_token = float(-scored.token_logps[:4].sum() / scored.mask[:4].sum())
    plain = plain_logps(model, pairs)  # the same NLL, written out plainly
    assert chosen_nll_per_token == pytest.approx(float(-plain["chosen"].sum() / plain["chosen_tokens"].sum()))
    # With another reference model h != 0 (β = 1 here), so the DPO part is recomputed too; else it is log 2.
    # There the step is one SGD step (the update is the gradient: σ(−βh) weighs the pairs unequally), as
    # AdamW's sign-like first step would blow float noise in near-zero gradients up past the tolerance.
    reference, options, dpo_part = None, {}, 0.693147
    if another_reference:
        reference, options = other_reference(), dict(beta=1.0, train_fields=SGD_LIKE)
        dpo_part = expected_dpo(model, reference, pairs, beta=1.0)["loss"]
        assert abs(dpo_part - math.log(2)) > 1e-2
    big, big_result = run(
        tmp_path / "a", pairs=4, steps=1, batch_size=4, rpo_alpha=0.5, eval_pairs=0, reference=reference,
        **options,
    )  # fmt: skip
    small, small_result = run(
        tmp_path / "b", pairs=4, steps=1, batch_size=1, grad_accum=4, rpo_alpha=0.5, eval_pairs=0,
        reference=reference, **options,
    )  # fmt: skip
    first = train_records(big_result)[0]
    # One step over all 4 pairs: loss = DPO loss + α · (chosen NLL summed / chosen tokens)
    assert first["nll_loss"] == pytest.approx(chosen_nll_per_token, rel=1e-4)
    assert first["loss"] == pytest.approx(dpo_part + 0.5 * chosen_nll_per_token, abs=1e-4)
    assert train_records(small_result)[0]["loss"] == pytest.approx(first["loss"], abs=1e-5)
    for (name, a), (_, b) in zip(big.named_parameters(), small.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    if another_reference:  # the updates themselves (the gradients), not only the weights they moved
        start = dict(tiny_model(0)[0].named_parameters())
        updates = [
            torch.cat([(start[name] - p).detach().flatten() for name, p in trained.named_parameters()])
            for trained in (big, small)
        ]
        assert updates[0].abs().max() > 0
        torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-6)


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
    reference, tokenizer = other_reference(), tiny_model(0)[1]
    reference.save_pretrained(tmp_path / "reference")
    tokenizer.save_pretrained(tmp_path / "reference")
    config = make_config(tmp_path / "run", steps=1, reference=str(tmp_path / "reference"))
    model, tokenizer = tiny_model(0)
    result = dpo(config, dataset=preference_dataset("train", limit=4), model=model, tokenizer=tokenizer)
    # A different reference: at step 1 h != 0, so the loss is no longer log 2 ...
    first = train_records(result)[0]
    assert first["loss"] != pytest.approx(0.693147, abs=1e-3)
    # ... but the formula over the step's 4 pairs with the reference loaded from its folder.
    assert_metrics(first, expected_dpo(tiny_model(0)[0], reference, pairs_of("train", 4), beta=0.1))


def test_bf16_autocast_keeps_the_first_step_near_log_two(tmp_path):
    model, result = run(tmp_path, steps=2, mixed_precision="bf16", eval_pairs=0)
    first = train_records(result)[0]
    # Reference and policy both run under autocast; bf16 rounding leaves h close to, not exactly, 0.
    assert first["loss"] == pytest.approx(0.693147, abs=2e-2)
    assert next(model.parameters()).dtype == torch.float32  # weights and optimizer stay float32
    assert_bf16_step_matches_float32_formula(tmp_path / "other")


def assert_bf16_step_matches_float32_formula(run_dir, model=None, tokenizer=None):
    """Another reference (h far from 0, β = 1) under bf16: step 1's numbers over all 4 pairs equal the float32
    recomputation within the bf16 tolerance above."""
    reference = other_reference()
    _, result = run(
        run_dir, model=model, tokenizer=tokenizer, pairs=4, steps=1, beta=1.0, mixed_precision="bf16",
        eval_pairs=0, reference=reference,
    )  # fmt: skip
    expected = expected_dpo(tiny_model(0)[0], reference, pairs_of("train", 4), beta=1.0)
    assert abs(expected["loss"] - 0.693147) > 0.1  # far outside the tolerance
    assert_metrics(train_records(result)[0], expected, abs_tol=2e-2)


def test_bf16_under_gradient_checkpointing_trains(tmp_path):
    # Checkpointing recomputes the forward in the backward pass, outside mixed_precision's float32 attention:
    # the forward must then keep autocast's own attention dtype, or the recomputation's dtypes would differ.
    model, tokenizer = tiny_model(0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, result = run(tmp_path, model=model, tokenizer=tokenizer, steps=2, mixed_precision="bf16", eval_pairs=0)
    assert train_records(result)[0]["loss"] == pytest.approx(0.693147, abs=2e-2)
    assert all(record["grad_norm"] > 0 for record in train_records(result))
    model, tokenizer = tiny_model(0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_bf16_step_matches_float32_formula(tmp_path / "other", model, tokenizer)


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


def test_a_dataset_dict_trains_on_train_and_evaluates_on_test(tmp_path):
    model, tokenizer = tiny_model(0)
    splits = datasets.DatasetDict(
        {"train": preference_dataset("train", limit=4), "test": preference_dataset("held_out", limit=2)}
    )
    result = dpo(make_config(tmp_path / "dict", steps=1), dataset=splits, model=model, tokenizer=tokenizer)
    assert any("loss" in record for record in result.metrics)
    assert any("eval/loss" in record for record in result.metrics)  # the test split is the eval data
