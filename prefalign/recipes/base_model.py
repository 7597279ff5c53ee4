"""`prefalign base`: build the built-in task's tiny base model with the SFT runtime, and cache it.

A char-level tokenizer with a chat template and a small Llama, trained by `prefalign sft` for a fixed
number of steps (deterministic for a seed, not a time budget) on the task's demonstrations. The
calibration target is 15-60% greedy held-out accuracy with a clearly higher pass@8: enough skill to sample
right answers, enough headroom for DPO and RL. The folder is cached under the user's cache directory,
keyed by the builder config and the prefalign and torch versions, behind a file lock, written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from prefalign.config import DataConfig, ModelConfig, TrainConfig
from prefalign.errors import ConfigError
from prefalign.files import atomic_folder
from prefalign.models.loading import count_parameters
from prefalign.models.saving import model_card, save_model
from prefalign.options import option
from prefalign.tasks.model import new_model  # BaseConfig carries its fields
from prefalign.version import __version__

logger = logging.getLogger("prefalign")


@dataclass
class BaseConfig:
    hidden_size: int = option(128, "Model width.", low=1)
    num_layers: int = option(4, "Transformer blocks.", low=1)
    num_heads: int = option(4, "Attention heads.", low=1)
    intermediate_size: int = option(384, "MLP width.", low=1)
    max_position_embeddings: int = option(128, "Longest sequence the model handles.", low=2)
    steps: int = option(
        700, "SFT optimizer steps (fixed, so the build is deterministic for a seed).", low=1,
    )
    batch_size: int = option(64, "Demonstrations per step.", low=1)
    learning_rate: float = option(3e-3, "Peak learning rate (cosine decay, 20-step warmup).", above=0)
    seed: int = option(
        1, "Seed for initialisation and data order (the default steps are calibrated for this seed).", low=0,
    )
    num_threads: int = option(
        1, "torch threads while building (fixed: results depend on the thread count).", low=1,
    )
    eval_prompts: int = option(500, "Held-out prompts for the calibration numbers.", low=1)
    output_dir: str = option("", "Write the model here instead of the cache.")
    force: bool = option(False, "Rebuild even when a cached copy exists.")

    def check(self, prefix: str = "") -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{prefix}hidden_size {self.hidden_size} is not a multiple of {prefix}num_heads "
                f"{self.num_heads}: each head gets hidden_size / num_heads dimensions"
            )


def cache_root() -> Path:
    root = os.environ.get("PREFALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "prefalign",
    )
    return Path(root)


def cache_key(config: BaseConfig) -> str:
    relevant = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("output_dir", "force", "eval_prompts")
    }
    payload = json.dumps(
        {"builder": relevant, "prefalign": __version__, "torch": torch.__version__}, sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_base_model(config: BaseConfig | None = None) -> Path:
    """The cached base model folder, built on first use (one builder at a time, atomic rename)."""
    config = config or BaseConfig()
    target = Path(config.output_dir) if config.output_dir else cache_root() / f"base-{cache_key(config)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists() and not config.force:
            return target
        logger.warning("building the built-in base model into %s (once; about 1-2 minutes on a CPU)", target)
        build_base_model(config, target)
    return target


def build_base_model(config: BaseConfig, target: Path) -> dict:
    """Train the base model and write it (with its calibration numbers in the card) to `target`."""
    from prefalign.algorithms.sft import SFTConfig, sft
    from prefalign.evaluation.policy import evaluate_policy
    from prefalign.rewards import WeightedRewards
    from prefalign.tasks.arithmetic import prompt_dataset, sft_dataset
    from prefalign.tasks.tokenizer import build_char_tokenizer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    started = time.perf_counter()
    try:
        tokenizer = build_char_tokenizer()
        model = new_model(config, tokenizer)
        with tempfile.TemporaryDirectory(prefix="prefalign-base-") as scratch:
            sft_config = SFTConfig(
                model=ModelConfig(device="cpu"),
                data=DataConfig(max_length=config.max_position_embeddings),
                train=TrainConfig(
                    output_dir=str(Path(scratch) / "run"), learning_rate=config.learning_rate,
                    batch_size=config.batch_size, max_steps=config.steps,
                    warmup_ratio=min(1.0, 20 / config.steps),  # 20 steps, or all of a shorter build
                    seed=config.seed, log_every=25, progress=True,
                    # The calibration (seed, steps) was made with the per-tensor AdamW; this tiny model's jump
                    # from ~30% to ~98% greedy comes within a few hundred steps of 700 and moves with any
                    # change in rounding (the fused kernel's put it before step 700: greedy 0.976).
                    fused_optimizer=False,
                ),
            )
            result = sft(
                sft_config, dataset=sft_dataset("train"), eval_dataset=sft_dataset("held_out", limit=200),
                model=model, tokenizer=tokenizer, save=False,
            )
            train_seconds = time.perf_counter() - started
            from prefalign.data import tokenize_prompts

            prompts, _ = tokenize_prompts(
                prompt_dataset("held_out", limit=config.eval_prompts), tokenizer, DataConfig(),
            )
            metrics = evaluate_policy(
                model, tokenizer, prompts, WeightedRewards(["exact_match"]), k=8, temperature=1.0,
                max_new_tokens=8, seed=config.seed,
            )
            summary = {
                "parameters": count_parameters(model),
                "sft_steps": result.step,
                "train_seconds": round(train_seconds, 1),
                "held_out_prompts": metrics["num_prompts"],
                "greedy_accuracy": metrics["accuracy"],
                "pass@8_t1": metrics["pass@8"],
                "final_eval_loss": next(
                    (m["eval/loss"] for m in reversed(result.metrics) if "eval/loss" in m), None,
                ),
            }
            card = model_card("prefalign built-in base model (2-digit addition)", {
                "task": "2-digit addition, one user turn `a+b`, answer `a+b` (prefalign.tasks.arithmetic)",
                "architecture": f"Llama, {config.num_layers} layers, width "
                                f"{config.hidden_size}, {summary['parameters']:,} "
                                "parameters, char-level tokenizer with chat template",
                "training": f"prefalign sft, {config.steps} steps x {config.batch_size} demonstrations, lr "
                            f"{config.learning_rate}, seed {config.seed}",
                "held-out greedy accuracy": f"{metrics['accuracy']:.3f} on {metrics['num_prompts']} prompts",
                "held-out pass@8 (temperature 1)": f"{metrics['pass@8']:.3f}",
                "build time": f"{summary['train_seconds']} s of training on {config.num_threads} thread(s)",
            })
            with atomic_folder(target) as staging:
                save_model(
                    model, tokenizer, staging, card=card,
                    extra_files={"prefalign_base.json": {**summary, "builder": dataclasses.asdict(config)}},
                )
                shutil.copy(Path(scratch) / "run" / "metrics.jsonl", staging / "training_metrics.jsonl")
    finally:
        torch.set_num_threads(previous_threads)
    logger.warning(
        "base model: greedy %.3f, pass@8 %.3f, %s s", summary["greedy_accuracy"], summary["pass@8_t1"],
        summary["train_seconds"],
    )
    if not 0.15 <= summary["greedy_accuracy"] <= 0.60:
        logger.warning(
            "base model: greedy accuracy %.3f is outside the 15-60%% band the demo and benchmarks are "
            "calibrated for (BENCHMARKS.md, 'Built-in base model'); rounding (torch version, CPU kernels) "
            "moves the step where this seed's learning jumps. Alignment gains will not compare; try another "
            "--seed or --steps for a base with headroom.", summary["greedy_accuracy"],
        )
    return summary
