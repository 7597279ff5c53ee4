"""What keyed sampling costs per decode step: the engine's draw (a counter-based hash of each row's stream and
the step, then inverse-CDF sampling) against the draw it replaced (exponential race with one torch.Generator
for the batch), on the same logits, alternating, 1 thread.

    python benchmarks/sampling_draw.py

Prints the median microseconds per decode step of each draw for a few (rows, vocabulary) shapes, and their
ratio. The draw is a small part of a decode step (the model's forward is the rest), so the last column puts
it against a forward of the tiny built-in model at the same batch (measured in the same run).
"""

from __future__ import annotations

import statistics
import time

import torch

from prefalign.rollout.engine import keyed_uniforms, sample_next_tokens, stream_key
from prefalign.rollout.types import SamplingParams
from prefalign.tasks.model import TinyModelConfig, new_model
from prefalign.tasks.tokenizer import build_char_tokenizer


def exponential_race(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """The previous engine's draw (same law): argmax p_i / E_i with E_i ~ Exp(1) from one generator."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    tokens = probs.div_(noise).argmax(dim=-1)
    return tokens, torch.log_softmax(logits / params.temperature, dim=-1).gather(1, tokens[:, None])[:, 0]


def timed(function, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    params = SamplingParams(temperature=1.0)
    tokenizer = build_char_tokenizer()
    model = new_model(TinyModelConfig(), tokenizer).eval()
    print("| rows | vocabulary | keyed draw µs | previous draw µs | keyed / previous | tiny forward µs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, vocabulary in ((64, len(tokenizer)), (512, len(tokenizer)), (64, 32_000), (64, 151_936)):
        keyed, previous, forward = measure(model, params, rows, vocabulary, len(tokenizer))
        cells = [f"{rows}", f"{vocabulary:,}", f"{keyed:,.0f}", f"{previous:,.0f}", f"{keyed / previous:.2f}"]
        print(f"| {' | '.join(cells)} | {forward:,.0f} |")


def measure(model, params: SamplingParams, rows: int, vocabulary: int, model_vocabulary: int):
    """Median µs of each draw over 5 alternating rounds of 50, and of the tiny model's forward of one new
    token per row (the model's own vocabulary only)."""
    logits = torch.randn(rows, vocabulary)
    streams = torch.tensor([stream_key(0, key, 0) for key in range(rows)])
    generator = torch.Generator().manual_seed(0)
    keyed, previous = [], []
    for _ in range(5):
        keyed.append(timed(lambda: sample_next_tokens(logits, params, keyed_uniforms(streams, 3)), 50))
        previous.append(timed(lambda: exponential_race(logits, params, generator), 50))
    forward = float("nan")
    if vocabulary == model_vocabulary:
        ids = torch.randint(0, vocabulary, (rows, 1))
        with torch.inference_mode():
            forward = timed(lambda: model(input_ids=ids), 20)
    return statistics.median(keyed), statistics.median(previous), forward

if __name__ == "__main__":
    main()
