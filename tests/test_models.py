"""Model loading and saving: LoRA adapters, merged models, reference mode, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.config import ModelConfig
from prefalign.errors import ModelError
from prefalign.models.loading import count_parameters, load_causal_lm
from prefalign.models.reference import reference_mode
from prefalign.models.saving import save_model
from tests.helpers import save_tiny_model


def _perturb_lora(model) -> None:
    # Fresh LoRA B matrices are zero (adapter = identity); give them values so the adapter matters.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def test_lora_save_merge_reload_with_plain_transformers(tmp_path):
    base_dir = save_tiny_model(tmp_path / "base")
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(base_dir), lora=True, lora_r=4, device="cpu"))
    assert count_parameters(model, trainable_only=True) < count_parameters(model) / 5
    _perturb_lora(model)
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
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert not list(tmp_path.glob(".final-*")), "no staging folder left behind"
    AutoModelForCausalLM.from_pretrained(out)


def test_unreadable_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty.* has no config.json.*save_pretrained"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_reference_mode_needs_lora(tmp_path):
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(save_tiny_model(tmp_path / "b")), device="cpu"))
    with pytest.raises(ModelError, match="needs a LoRA"):
        with reference_mode(model):
            pass


def test_disable_dropout_makes_training_mode_deterministic():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from prefalign.models.loading import disable_dropout

    torch.manual_seed(0)
    models = [
        LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, attention_dropout=0.5)),
        GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)),
    ]
    ids = torch.randint(0, 50, (2, 7))
    for model in models:
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live before
        disable_dropout(model)
        training = model(ids).logits
        model.eval()
        assert torch.allclose(training, model(ids).logits, atol=1e-6)
