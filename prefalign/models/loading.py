"""Loading and saving models: policy, reference (LoRA adapters off), sequence classifiers; HF folders out."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from prefalign.config import DataConfig, ModelConfig
from prefalign.errors import ModelError

logger = logging.getLogger("prefalign")


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


# Set on a policy whose LoRA adapters were loaded from a saved adapter folder (not created in this run): its
# reference is the base plus that adapter as saved, so "adapters off" (the bare base) is not its reference.
LOADED_ADAPTER = "prefalign_loaded_adapter"


def adapter_base(path: str) -> str | None:
    """The base model a saved LoRA adapter folder (adapter_config.json, no config.json) was trained on, or
    None when `path` is not such a folder."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").exists():
        return None
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ModelError(f"adapter folder {path!r}: adapter_config.json cannot be read ({error})") from error
    if not base:
        raise ModelError(
            f"adapter folder {path!r}: adapter_config.json names no base_model_name_or_path, so the model "
            "the adapter belongs to is unknown; set it there to the base model's folder or hub name"
        )
    if not Path(base).is_absolute() and (folder / base).exists() and not Path(base).exists():
        base = str(folder / base)
    return base


def load_causal_lm(config: ModelConfig, *, trainable: bool = True):
    """(model, tokenizer) on the configured device and dtype, with LoRA adapters when asked.

    A saved LoRA adapter folder (what `save_model` writes for a LoRA policy) loads as its base model
    (adapter_config.json's base_model_name_or_path) carrying that adapter, trainable when `trainable`:
    training continues the adapter (model.lora's rank and targets are the saved ones), and the policy is
    marked (LOADED_ADAPTER) so that its reference is the adapter as saved, not the bare base."""
    path = resolve_model_path(config.name_or_path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    base = adapter_base(path)
    has_tokenizer = base is None or (Path(path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(path if has_tokenizer else base, trust_remote_code=config.trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(base or path, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise _explain_load_failure("causal language model", base or path, error) from error
    check_causal(model, base or path)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
        setattr(model, LOADED_ADAPTER, path)
        logger.info("model: LoRA adapter %s on its base %s (the adapter trains)", path, base)
    return prepare_model(model, config, device, trainable=trainable), tokenizer


@torch.no_grad()
def check_causal(model, path: str) -> None:
    """Refuse a model whose output at a position depends on later tokens (a bidirectional encoder such as
    BERT loaded with is_decoder false): as a policy it would see the answer it is asked to predict. Tested
    on the model itself (a 4-token sequence and the same with its last token changed), since configs do not
    say it reliably (GPT-2's is_decoder is false too)."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < 8:
        return
    first = torch.tensor([[vocab // 2, vocab // 3, vocab // 4, vocab // 5]])
    second = first.clone()
    second[0, -1] = vocab // 6
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        logits = [model(input_ids=ids.to(device)).logits[0].float() for ids in (first, second)]
    finally:
        model.train(was_training)
    # Earlier positions of a causal model do not move at all (same computation); a freshly initialised
    # encoder's move little in absolute terms, so the change is measured against the last position's.
    earlier = (logits[0][:-1] - logits[1][:-1]).abs().max().item()
    last = (logits[0][-1] - logits[1][-1]).abs().max().item()
    if earlier > 1e-4 * max(last, 1e-6):
        raise ModelError(
            f"model {path!r} ({type(model).__name__}) is not a causal language model: its predictions at a "
            "position change with the tokens after it (a bidirectional encoder such as BERT, config "
            "is_decoder: false). sft, dpo, grpo, ppo, sample and eval need a decoder that predicts each "
            "token from the ones before it; an encoder can still be a reward model (prefalign reward)."
        )


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
    if is_peft_model(model) and getattr(model, LOADED_ADAPTER, None):
        if config.lora:
            logger.info("model.lora: continuing the loaded adapter (its own rank and targets), no new one")
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
    elif config.lora:
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


# Config attributes that hold a model's number of positions, by family (Llama/Qwen/GPT-2 via attribute_map,
# GPT-2's own name, Falcon/ChatGLM-style names).
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(model) -> int | None:
    """The most tokens the model takes in one sequence (its position limit), or None when its config does
    not say."""
    config = getattr(model, "config", None)
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_max_length(data: DataConfig, model, command: str, *, room: int = 0) -> DataConfig:
    """data.max_length (and max_prompt_length) clamped to the model's context (less `room`, tokens kept free
    for generation), with a WARNING giving both numbers; `data` itself when it already fits.

    Clamped rather than refused: max_length is a cap (512 by default, not a user's measurement), rows that
    fit are unchanged, and rows longer than the context can never be trained on whole anyway: they are cut
    as max_length says (counted and reported), instead of reaching the model and dying with an IndexError
    in its position embeddings."""
    context = context_length(model)
    if context is None:
        return data
    limit = max(context - room, 2)
    prompt_limit = limit - 1
    too_long_prompt = data.max_prompt_length is not None and data.max_prompt_length > prompt_limit
    if data.max_length <= limit and not too_long_prompt:
        return data
    changes = {}
    if data.max_length > limit:
        changes["max_length"] = limit
    if too_long_prompt:
        changes["max_prompt_length"] = prompt_limit
    logger.warning(
        "%s: the model takes at most %d positions%s; %s (rows longer than that are cut as data.max_length "
        "says, and counted)", command, context,
        f" ({room} kept for generation)" if room else "",
        ", ".join(f"data.{key} {getattr(data, key)} -> {value}" for key, value in changes.items()),
    )  # fmt: skip
    return dataclasses.replace(data, **changes)


def model_device(model) -> torch.device:
    """Where the model's forwards run: its parameters' device, or the compute device FSDP recorded on a
    sharded model (`prefalign_compute_device`: with CPU offload its shards live in CPU memory)."""
    recorded = getattr(model, "prefalign_compute_device", None)
    return recorded if recorded is not None else next(model.parameters()).device


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
