"""Writing Hugging Face model folders atomically (temporary folder, then rename), with a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefalign.files import atomic_folder, writing
from prefalign.models.loading import is_peft_model


def model_card(title: str, lines: dict[str, Any]) -> str:
    body = "\n".join(f"- **{key}**: {value}" for key, value in lines.items())
    return (
        f"---\nlibrary_name: transformers\ntags: [prefalign]\n---\n\n# {title}\n\nTrained with "
        f"prefalign.\n\n{body}\n"
    )


def save_model(
    model, tokenizer, out_dir: str | Path, *, card: str | None = None, merge_lora: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face folder atomically (temporary folder, then rename).

    For a LoRA model the folder holds the adapter; with `merge_lora` a full merged model is written to
    `<out_dir>/merged` as well. `extra_files` (name -> JSON-able object) are written beside the weights.
    """
    out_dir = Path(out_dir)
    where = "save to another folder (train.output_dir for a training run)"
    with writing(out_dir, where), atomic_folder(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if is_peft_model(model) and merge_lora:
            merged = _merged_copy(model)
            merged.save_pretrained(staging / "merged", safe_serialization=True)
            tokenizer.save_pretrained(staging / "merged")
        if card:
            (staging / "README.md").write_text(card)
        for name, content in (extra_files or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2))
    return out_dir


def _merged_copy(peft_model):
    """A merged full model without touching the live adapter-carrying one."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()
