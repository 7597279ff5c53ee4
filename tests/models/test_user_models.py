"""Models as users have them: an encoder refused as a policy (still a reward model), a model with fewer
positions than data.max_length, a saved LoRA adapter folder continued (its reference is that adapter)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from prefalign.algorithms.dpo import DPOConfig, dpo
from prefalign.algorithms.sft import SFTConfig, sft
from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.errors import ModelError
from prefalign.models.loading import (
    LOADED_ADAPTER,
    apply_lora,
    context_length,
    fit_max_length,
    is_peft_model,
    load_causal_lm,
    load_sequence_classifier,
)
from prefalign.models.reference import Reference
from prefalign.tasks.tokenizer import build_char_tokenizer
from tests.helpers import save_tiny_model


def saved_bert(folder, *, is_decoder=False):
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, is_decoder=is_decoder,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def saved_short_gpt2(folder, positions=48):
    """A GPT-2 with learned positions: a token past `positions` is an IndexError in its embedding."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_an_encoder_is_refused_as_a_policy_but_stays_a_reward_model(tmp_path):
    bert = saved_bert(tmp_path / "bert")
    with pytest.raises(ModelError, match=r"not a causal language model.*BERT.*reward model"):
        load_causal_lm(ModelConfig(name_or_path=bert, device="cpu"))
    model, _ = load_sequence_classifier(ModelConfig(name_or_path=bert, device="cpu"))
    assert model.config.num_labels == 1
    # The same architecture as a decoder (is_decoder: true) is causal, so it is accepted.
    decoder, _ = load_causal_lm(ModelConfig(name_or_path=saved_bert(tmp_path / "dec", is_decoder=True)))
    assert decoder is not None


def long_rows(count=6):
    return [
        {"prompt": f"{index}+1=", "completion": " and a long answer" * 6}
        for index in range(count)
    ]


def test_max_length_is_fitted_to_a_short_context(tmp_path, caplog):
    import datasets

    model_dir = saved_short_gpt2(tmp_path / "gpt2")
    rows = datasets.Dataset.from_list(long_rows())
    train = dict(max_steps=1, batch_size=2, progress=False, learning_rate=1e-3)
    config = SFTConfig(
        model=ModelConfig(name_or_path=model_dir, device="cpu"), data=DataConfig(max_length=512),
        train=TrainConfig(output_dir=str(tmp_path / "sft"), **train),
    )
    with caplog.at_level(logging.WARNING, logger="prefalign"):
        result = sft(config, dataset=rows)  # was: IndexError in the position embedding
    assert result.step == 1
    assert "at most 48 positions" in caplog.text and "data.max_length 512 -> 48" in caplog.text
    pairs = datasets.Dataset.from_list([
        {"prompt": row["prompt"], "chosen": row["completion"], "rejected": " no" * 20} for row in long_rows()
    ])
    config = DPOConfig(
        model=ModelConfig(name_or_path=model_dir, device="cpu"), data=DataConfig(max_length=512),
        train=TrainConfig(output_dir=str(tmp_path / "dpo"), **train), mixed_precision="off",
    )
    assert dpo(config, dataset=pairs).step == 1


def test_fit_max_length_keeps_what_fits_and_leaves_room_for_generation():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=256))
    assert context_length(model) == 256
    fits = DataConfig(max_length=200)
    assert fit_max_length(fits, model, "sft") is fits
    fitted = fit_max_length(DataConfig(max_length=512, max_prompt_length=400), model, "eval", room=16)
    assert (fitted.max_length, fitted.max_prompt_length) == (240, 239)


def saved_adapter(tmp_path):
    """A tiny base model folder and a LoRA adapter folder on it whose adapter changes the outputs."""
    base_dir = save_tiny_model(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = apply_lora(base, ModelConfig(lora=True, lora_r=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B = 0 at creation: the adapter would change nothing
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    build_char_tokenizer().save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_dir)
    return base_dir, adapter_dir


def test_a_saved_adapter_folder_loads_as_a_trainable_peft_model_whose_reference_keeps_it(tmp_path):
    base_dir, adapter_dir = saved_adapter(tmp_path)
    policy, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(adapter_dir), device="cpu"))
    assert is_peft_model(policy) and getattr(policy, LOADED_ADAPTER) == str(adapter_dir)
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    base, _ = load_causal_lm(ModelConfig(name_or_path=str(base_dir), device="cpu"), trainable=False)
    with torch.no_grad():
        policy_logits, base_logits = policy(ids).logits, base(ids).logits
        assert not torch.allclose(policy_logits, base_logits, atol=1e-3)  # the adapter matters
        reference = Reference(policy)  # a frozen copy of base + adapter, not the adapters-off base
        assert not reference.adapters_off
        with reference.network() as network:
            torch.testing.assert_close(network(ids).logits, policy_logits)


def test_dpo_continues_a_saved_adapter_against_that_adapter(tmp_path):
    import datasets

    _, adapter_dir = saved_adapter(tmp_path)
    pairs = datasets.Dataset.from_list(
        [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(4)]
    )
    config = DPOConfig(
        model=ModelConfig(name_or_path=str(adapter_dir), device="cpu"), data=DataConfig(max_length=32),
        train=TrainConfig(
            output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, progress=False, learning_rate=1e-2,
        ),
        mixed_precision="off", rpo_alpha=0.0,
    )
    result = dpo(config, dataset=pairs)  # was: "optimizer got an empty parameter list"
    # The policy starts equal to its reference (the adapter as saved): the first loss is log 2 exactly.
    assert result.metrics[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert result.metrics[-1]["loss"] < result.metrics[0]["loss"]
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()
