"""Loading models: a clear error for an unreadable folder; dropout off for deterministic training."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prefalign.config import ModelConfig
from prefalign.errors import ModelError
from prefalign.models.loading import disable_dropout, load_causal_lm


def test_unreadable_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty.* has no config.json.*save_pretrained"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "empty")))


def test_disable_dropout_makes_training_mode_deterministic():
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        attention_dropout=0.5,
    )
    gpt2 = GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5
    )
    models = [LlamaForCausalLM(llama), GPT2LMHeadModel(gpt2)]
    ids = torch.randint(0, 50, (2, 7))
    for model in models:
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live before
        disable_dropout(model)
        training = model(ids).logits
        model.eval()
        assert torch.allclose(training, model(ids).logits, atol=1e-6)
