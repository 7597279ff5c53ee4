"""DPO's pairs and their reference log-probs: computed like a plain per-pair forward, cached in the run folder
and reused only for the same data and the same reference weights."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file

from prefalign import DPOConfig, TrainConfig, dpo
from prefalign.algorithms.dpo_pairs import (
    REF_LOGPS_FILE,
    PairForward,
    precompute_reference,
    sequence_logps,
    tokenized_pairs,
)
from prefalign.config import DataConfig
from prefalign.data import collate_preference
from prefalign.models.forward import completion_logps, mixed_precision
from prefalign.models.reference import Reference
from prefalign.runtime.metrics import read_metrics
from prefalign.tasks.arithmetic import preference_dataset
from tests.helpers import save_tiny_model, tiny_model


def test_cached_reference_is_reused_only_for_the_same_data_and_weights(tmp_path):
    model, tokenizer = tiny_model(0)
    other, _ = tiny_model(1)
    data = DataConfig(max_length=64)
    pairs, _ = tokenized_pairs(preference_dataset("train", limit=6), tokenizer, data, "train")
    forwards = []  # one entry per forward pass of either network: a cache hit runs none
    for network in (model, other):
        network.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    computed = []  # one entry per call that computed (rather than read back) its log-probs

    def reference_of(network, rows, run_dir=tmp_path):
        before = len(forwards)
        forward = PairForward(tokenizer.pad_token_id)
        reference = Reference(network, snapshot=False)
        values = precompute_reference(run_dir, reference, {"train": rows}, forward, 4)["train"]["chosen"]
        if len(forwards) > before:
            computed.append(1)
        return values

    first = reference_of(model, pairs)
    again = reference_of(model, pairs)
    assert len(computed) == 1 and torch.equal(first, again)  # read back
    swapped = reference_of(other, pairs)  # another network in the same run folder: recomputed, not reused
    assert len(computed) == 2 and not torch.equal(first, swapped)
    (tmp_path / "fresh").mkdir()
    assert torch.equal(swapped, reference_of(other, pairs, run_dir=tmp_path / "fresh"))
    changed, _ = tokenized_pairs(preference_dataset("train", limit=6, seed=1), tokenizer, data, "train")
    reference_of(other, changed)
    assert len(computed) == 4  # the fresh folder above, then the changed data


def per_pair_logps(model, pairs, pad_token_id, bf16=False):
    """The plain way: each pair alone, prompt + completion in one padded forward (no batching, no sharing)."""
    sums = []
    with torch.no_grad(), mixed_precision(torch.device("cpu"), bf16):
        for pair in pairs:
            sums.append(completion_logps(model, collate_preference([pair], pad_token_id)).sums.float())
    both = torch.stack(sums)  # (pairs, 2): chosen, rejected
    return both[:, 0], both[:, 1]


def test_precomputed_reference_equals_a_plain_per_pair_forward(tmp_path):
    model, tokenizer = tiny_model(0, num_layers=2)
    pad = tokenizer.pad_token_id
    # Mixed lengths, so the length-sorted batches reorder pairs and pad; batch 3 leaves a short last batch.
    rows = preference_dataset("train", limit=10)
    pairs, _ = tokenized_pairs(rows, tokenizer, DataConfig(max_length=64), "train")
    pairs[1] = {**pairs[1], "chosen_ids": pairs[1]["chosen_ids"] + pairs[2]["chosen_ids"]}
    assert len({len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs}) > 2
    chosen, rejected = per_pair_logps(model, pairs, pad)
    reference = Reference(model, snapshot=False)
    cached = precompute_reference(tmp_path, reference, {"train": pairs}, PairForward(pad), 3)["train"]
    torch.testing.assert_close(cached["chosen"], chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["rejected"], rejected, rtol=1e-5, atol=1e-5)
    # Computed under inference mode, but stored as ordinary tensors: the loss can use them beside autograd.
    assert not cached["chosen"].is_inference() and not cached["chosen"].requires_grad
    # Under bf16 autocast (fp32 attention for short sequences) the values stay within bf16 rounding.
    fast = sequence_logps(model, pairs, pad, 64, PairForward(pad, bf16=True))
    torch.testing.assert_close(fast["chosen"], chosen, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fast["rejected"], rejected, rtol=1e-2, atol=1e-2)


def test_an_unreadable_reference_cache_is_recomputed_on_resume(tmp_path, caplog):
    """A torn or corrupt ref_logps.safetensors is reported and recomputed: the resumed run ends with the
    uninterrupted run's numbers."""
    model_dir, run = save_tiny_model(tmp_path / "model"), tmp_path / "run"
    rows = preference_dataset("train", limit=16)

    def train(resume=False):
        config = DPOConfig()
        config.model.name_or_path, config.data.max_length = str(model_dir), 32
        config.train = TrainConfig(
            output_dir=str(run), max_steps=4, save_every=2, batch_size=4, learning_rate=1e-3, progress=False,
            resume=resume,
        )  # fmt: skip
        return dpo(config, dataset=rows, save=False)  # no final/: the run can be resumed from step 2 again

    whole = train()
    cache = run / REF_LOGPS_FILE
    # Copied out: load_file maps the file, whose bytes the loop below overwrites.
    cached = {key: value.clone() for key, value in load_file(str(cache)).items()}
    intact = cache.read_bytes()
    for broken in (b"\x00garbage" * 64, intact[: len(intact) // 2]):
        cache.write_bytes(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="prefalign"):
            resumed = train(resume=True)
        assert "cannot be read" in caplog.text and "computing the reference log-probs again" in caplog.text
        assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in whole.metrics[2:]]
        assert [record["step"] for record in read_metrics(run)] == [1, 2, 3, 4]
        assert load_file(str(cache)).keys() == cached.keys()
        assert all(torch.equal(load_file(str(cache))[key], value) for key, value in cached.items())
