"""Per-process bytes of parameters, gradients and optimizer state after one training step, under DDP or FSDP2,
on a random-initialised Llama-shaped model of ~58M parameters (fp32, built from a config, no download).

    torchrun --nproc_per_node 2 tests/distributed/memory.py --strategy fsdp

Counts tensor bytes (each DTensor's local shard), not process RSS. Every rank prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefalign.config import TrainConfig
from prefalign.runtime import distributed
from prefalign.runtime.loop import build_optimizer


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measure(strategy: str, vocab: int, hidden: int, layers: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    run = distributed.wrap(model, strategy)
    optimizer = build_optimizer(model, TrainConfig())
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(distributed.rank()))

    def loss_fn(network, batch):
        return network(input_ids=batch, labels=batch).loss

    with run.micro_batch(sync=True):
        run.backward(run(loss_fn, tokens))
    optimizer.step()
    state = [v for entry in optimizer.state.values() for v in entry.values() if torch.is_tensor(v)]
    counts = {
        "parameters": sum(local_bytes(p) for p in model.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(local_bytes(value) for value in state),
    }
    return {
        "strategy": strategy, "rank": distributed.rank(), "processes": distributed.world_size(),
        "model_parameters": parameters, **counts, "total": sum(counts.values()),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    arguments = parser.parse_args()
    distributed.start()
    try:
        print(json.dumps(measure(arguments.strategy, arguments.vocab, arguments.hidden, arguments.layers)))
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
