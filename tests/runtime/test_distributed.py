"""The distributed seam with one process (no process group): every function is the identity, so training on
one process is exactly what it was before the seam existed."""

from __future__ import annotations

import pytest
import torch

from prefalign.errors import ConfigError
from prefalign.runtime import distributed


def test_one_process_is_the_identity():
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.sum_across(3.5) == 3.5
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.sum_tensor_across(values), values)
    assert distributed.gather_across([{"a": 1}, 2]) == [{"a": 1}, 2]


def tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_one_process_trains_through_a_plain_runner_and_whole_weights_are_the_model():
    model = tiny_llama()
    runner = distributed.wrap(model, "fsdp")
    assert type(runner) is distributed.Runner and not runner.lockstep
    with distributed.full_weights(model) as whole:
        assert whole is model


def test_fsdp_wraps_each_decoder_layer_also_under_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    assert [type(m).__name__ for m in distributed.layer_modules(model)] == ["LlamaDecoderLayer"] * 3
    lora = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    assert len(distributed.layer_modules(lora)) == 3


def test_the_twin_holds_no_weights_keeps_ties_and_buffers():
    model = tiny_llama(tied=True)
    twin = distributed._meta_twin(model)
    assert all(p.device.type == "meta" and not p.requires_grad for p in twin.parameters())
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    buffers = dict(model.named_buffers())
    assert all(b.device.type == "cpu" and torch.equal(b, buffers[n]) for n, b in twin.named_buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_generation_memory_by_hand():
    from prefalign.rollout.kv_cache import generation_bytes

    model = tiny_llama()  # 3 layers, 2 key/value heads of 64 / 4 = 16 dims, vocabulary 100
    parts = generation_bytes(model.config, 1000, sequences=5, length=7, dtype=torch.bfloat16)
    # weights 1000 x 2 bytes; keys and values: 2 x 3 layers x 2 heads x 16 x 5 x 7 tokens x 2 bytes;
    # one step of fp32 logits: 5 x 100 x 4.
    assert parts == {"weights": 2000, "kv_cache": 13440, "logits": 2000}


def test_a_rollout_that_cannot_fit_beside_the_shards_is_refused_with_the_numbers():
    model = tiny_llama()
    distributed._skeletons[model] = distributed._Skeleton(distributed._meta_twin(model), torch.bfloat16)
    try:
        parameters = sum(p.numel() for p in model.parameters())
        fits = parameters * 2 + 2 * 3 * 2 * 16 * 4 * 10 * 2 + 4 * 100 * 4
        distributed.check_generation_fits(model, sequences=4, length=10, free_bytes=fits)
        with pytest.raises(ConfigError) as refused:
            distributed.check_generation_fits(model, sequences=4, length=10, free_bytes=fits - 1)
        message = str(refused.value)
        assert f"({parameters:,} parameters in bfloat16)" in message
        assert "(4 sequences x 10 tokens)" in message and "Lower generation_batch_size" in message
        # Once gathered (the twin is in memory), only the KV cache and logits must fit in what is left.
        twin = distributed._skeletons[model].module
        distributed._skeletons[model].active = twin
        left = fits - parameters * 2
        distributed.check_generation_fits(twin, sequences=4, length=10, free_bytes=left)
        with pytest.raises(ConfigError, match="the gathered weights"):
            distributed.check_generation_fits(twin, sequences=4, length=10, free_bytes=left - 1)
    finally:
        del distributed._skeletons[model]


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("ppo", {"distributed.strategy": "fsdp"}, "PPO does not run under distributed.strategy fsdp"),
        ("dpo", {"distributed.strategy": "fsdp", "rounds": 2}, "iterative DPO (rounds >= 2) does not run"),
        ("sft", {"distributed.cpu_offload": True}, "distributed.cpu_offload is an FSDP setting"),
        ("sft", {"distributed.compute_dtype": "bfloat16"}, "distributed.compute_dtype is an FSDP setting"),
    ],
)
def test_settings_fsdp_cannot_serve_are_refused_before_any_work(config, overrides, expected):
    from prefalign.algorithms.ppo_config import PPOConfig
    from prefalign.algorithms.sft import SFTConfig
    from prefalign.config import apply_overrides, validate
    from prefalign.recipes.iterative_dpo import IterativeDPOConfig

    cls = {"ppo": PPOConfig, "dpo": IterativeDPOConfig, "sft": SFTConfig}[config]
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(apply_overrides(cls(), overrides))


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one process (what FSDP shards over in gpu_smoke's one-process checks)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_the_gathered_twin_matches_the_model_keeps_ties_and_is_freed_after(group_of_one):
    model = tiny_llama(tied=True)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    runner = distributed.wrap(model, "fsdp", compute_dtype=torch.bfloat16)
    assert runner.lockstep and distributed.is_sharded(model)
    for _ in range(2):  # a second gather finds the twin as the first left it: tied, empty
        with distributed.full_weights(model) as twin:
            assert twin is not model and twin.lm_head.weight is twin.model.embed_tokens.weight
            assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}  # parameters in the compute dtype
            assert twin.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers as they are
            for name, value in twin.state_dict().items():
                torch.testing.assert_close(value.float(), expected[name].float(), rtol=1e-2, atol=1e-2)
            with torch.no_grad():
                torch.testing.assert_close(twin(input_ids=ids).logits.float(), logits, rtol=0.05, atol=0.05)
            with distributed.full_weights(model) as nested:
                assert nested is twin
        assert all(p.device.type == "meta" for p in twin.parameters())
        assert twin.lm_head.weight is twin.model.embed_tokens.weight
    with distributed.full_weights(model, main_only=True) as whole:  # a save: fp32 on rank 0's CPU
        assert whole.lm_head.weight is whole.model.embed_tokens.weight
        assert all(torch.equal(value, expected[name]) for name, value in whole.state_dict().items())
