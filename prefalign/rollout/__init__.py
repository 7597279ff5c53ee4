"""The rollout engine: sampling completions with their log-probs (L2). Backends implement RolloutBackend."""

from prefalign.rollout.engine import LocalEngine, generate, sample_next_tokens
from prefalign.rollout.types import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    RolloutBackend,
    Sample,
    SamplingParams,
)

__all__ = [
    "FINISH_EOS",
    "FINISH_STOP",
    "FINISH_LENGTH",
    "SamplingParams",
    "Sample",
    "RolloutBackend",
    "LocalEngine",
    "generate",
    "sample_next_tokens",
]
