"""Loading and saving models: policy, reference (LoRA adapters off), sequence classifiers; HF folders out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefalign.config import ModelConfig
from prefalign.errors import ModelError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are hundreds of times slower than fp32 on most CPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


BUILTIN = "builtin"


def resolve_model_path(name_or_path: str) -> str:
    """A model folder or hub name, checked. `builtin` (the built-in task's base model) is resolved by the
    commands layer; reaching this layer it is an error that names the function that builds it."""
    if name_or_path == BUILTIN:
        raise ModelError(
            "model 'builtin' names the built-in task's tiny base model, which is built on demand by "
            "prefalign.commands.builtin.resolve_builtin (the CLI and the functions `from prefalign import "
            "...` do this) or prefalign.ensure_base_model(); pass that folder's path here."
        )
    folder = Path(name_or_path)
    if (
        folder.is_dir() and not (folder / "config.json").exists()
        and not (folder / "adapter_config.json").exists()
    ):
        raise ModelError(
            f"model folder {name_or_path!r} has no config.json: it is not a Hugging Face model "
            "folder. Point model.name_or_path at a folder written by save_pretrained (config.json, "
            "weights, tokenizer files)."
        )
    return name_or_path


def _explain_load_failure(kind: str, path: str, error: Exception) -> ModelError:
    where = "a local folder" if Path(path).exists() else "a hub name (needs network) or a local folder"
    detail = " ".join(str(error).split())[:300]
    return ModelError(
        f"could not load the {kind} from {path!r} (read as {where}): {type(error).__name__}: {detail}. Point "
        "model.name_or_path at a folder saved with save_pretrained (config.json, weights, tokenizer files)."
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - every failure becomes one actionable message
        raise _explain_load_failure("tokenizer", path, error) from error
    if tokenizer.pad_token_id is None:
        # Padding is always masked, so reusing EOS as pad changes no result.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(config: ModelConfig, *, trainable: bool = True):
    """(model, tokenizer) on the configured device and dtype, with LoRA adapters when asked."""
    path = resolve_model_path(config.name_or_path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise _explain_load_failure("causal language model", path, error) from error
    return prepare_model(model, config, device, trainable=trainable), tokenizer


def load_sequence_classifier(config: ModelConfig, *, num_labels: int = 1, trainable: bool = True):
    """(model, tokenizer) with a scalar head, e.g. a reward model."""
    path = resolve_model_path(config.name_or_path)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(path, trust_remote_code=config.trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            dtype=resolve_dtype(config.dtype, device),
            trust_remote_code=config.trust_remote_code,
        )
    except Exception as error:  # noqa: BLE001
        raise _explain_load_failure("sequence-classification model", path, error) from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return prepare_model(model, config, device, trainable=trainable, task_type="SEQ_CLS"), tokenizer


def prepare_model(
    model, config: ModelConfig, device: torch.device, *, trainable: bool, task_type: str = "CAUSAL_LM",
):
    model.to(device)
    # Dropout off everywhere: RL and preference losses compare log-probs across passes.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.lora:
        model = apply_lora(model, config, task_type=task_type)
    model.train()
    return model


def apply_lora(model, config: ModelConfig, *, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model

    targets: Any = config.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config)


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model) -> None:
    """p = 0 in every dropout module (the saved config keeps the model's own rates). Algorithms that compare
    log-probs of one network at two moments (policy vs reference, new vs old) turn it off, or the noise
    of two dropout masks shows up as a ratio and a KL where there is none."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # rates kept as floats (Llama-style attention)
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def count_parameters(model, *, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    total = 0
    seen: set[int] = set()
    embedding_ids = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                embedding_ids.add(id(module.weight))
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if output is not None:
            embedding_ids.add(id(output.weight))
    for parameter in model.parameters():
        if id(parameter) in seen or id(parameter) in embedding_ids:
            continue
        if trainable_only and not parameter.requires_grad:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total
