"""Saving models: full folders and LoRA adapters (with a merged copy) that plain transformers and peft load
back with the same outputs, written atomically."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from prefalign.config import ModelConfig
from prefalign.models.loading import count_parameters, load_causal_lm
from prefalign.models.reference import reference_mode
from prefalign.models.saving import save_model
from tests.helpers import save_tiny_model


def perturb_lora(model) -> None:
    # Fresh LoRA B matrices are zero (adapter = identity); give them values so the adapter matters.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def test_lora_save_merge_reload_with_plain_transformers(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base")
    config = ModelConfig(name_or_path=str(base_dir), lora=True, lora_r=4, device="cpu")
    model, tokenizer = load_causal_lm(config)
    assert count_parameters(model, trainable_only=True) < count_parameters(model) / 5
    perturb_lora(model)
    ids = torch.tensor([[1, 5, 25, 26, 19, 27, 2, 6]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with reference_mode(model):
            reference = model(input_ids=ids).logits
    plain_base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        torch.testing.assert_close(reference, plain_base(input_ids=ids).logits)
    assert not torch.allclose(adapted, reference)

    out = save_model(model, tokenizer, tmp_path / "final", card="# card", merge_lora=True)
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").read_text() == "# card"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # plain transformers, no peft
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)

    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    # Saving the merged copy must not have merged the live model's adapters away.
    with torch.no_grad(), reference_mode(model):
        torch.testing.assert_close(model(input_ids=ids).logits, reference)


def test_full_model_folder_loads_as_is(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base")
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base_dir), device="cpu"))
    out = save_model(model, tokenizer, tmp_path / "final", card="# card")
    written = {p.name for p in out.iterdir()}
    assert written >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert not list(tmp_path.glob(".final-*")), "no staging folder left behind"
    AutoModelForCausalLM.from_pretrained(out)
