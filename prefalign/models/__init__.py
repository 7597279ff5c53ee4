"""Models in and out: loading (LoRA), saving HF folders, the frozen reference, forward passes (L2)."""

from prefalign.models.loading import (
    BUILTIN,
    apply_lora,
    count_parameters,
    disable_dropout,
    is_peft_model,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    model_device,
    prepare_model,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from prefalign.models.reference import (
    Reference,
    check_reference_model,
    check_same_tokenizer,
    frozen_copy,
    reference_mode,
    weights_fingerprint,
)
from prefalign.models.saving import model_card, save_model

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "BUILTIN",
    "resolve_model_path",
    "load_tokenizer",
    "load_causal_lm",
    "load_sequence_classifier",
    "prepare_model",
    "apply_lora",
    "is_peft_model",
    "disable_dropout",
    "model_device",
    "count_parameters",
    "model_card",
    "save_model",
    "reference_mode",
    "check_same_tokenizer",
    "check_reference_model",
    "Reference",
    "weights_fingerprint",
    "frozen_copy",
]
