"""What a rollout backend takes and returns: SamplingParams in, Samples (tokens, text, log-probs, finish
reason) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop_token_ids: list[int] | None = None  # tokenizer.eos_token_id is always a stop unless ignore_eos
    stop_strings: list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: generate exactly max_new_tokens (stop_token_ids still stop)

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_strings and any(not stop for stop in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain an empty string")


@dataclass
class Sample:
    token_ids: list[int]  # generated tokens, including the stop token if one ended it
    text: str  # decoded completion, special tokens skipped, cut before a stop string
    logprobs: list[float]  # per token: log_softmax(logits / T) over the full vocabulary (T = 1 when greedy)
    finish_reason: str  # "eos" | "stop" | "length"


@runtime_checkable
class RolloutBackend(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Sample]]: ...
