"""Training compute of a demo method, in FLOPs, from what its run folders hold.

FLOPs ≈ 2N per token a model runs forward and 4N more per token it trains on (backward), N = the model's
non-embedding parameters (Kaplan et al. 2020), summed over every model a method runs: the policy's training
forward and backward, the reference's forward, the generation of samples (one forward per token), a reward
model's scoring and, where a method uses one, the reward model's own training; PPO's critic trains (6N) and
scores the rollouts (2N). Tokens come from metrics.jsonl (each step logs tokens_per_second and step_time:
their product is the tokens it trained on, prompt and completion); evaluation is left out (every method has
the same). Attention's own FLOPs and the shared prompt prefill are ignored: at this context length they are
small, and the figure compares methods on the same model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.reporting.runs import number
from prefalign.runtime.run_folder import read_log, stored_config

FORWARD, TRAIN = 2, 6  # FLOPs per parameter and token: forward; forward + backward


@dataclass
class Compute:
    """FLOPs by part ("policy forward+backward", "generation", ...); `missing` says what could not be read."""

    parts: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def add(self, part: str, parameters: int | None, tokens: float | None, per_token: int) -> None:
        if parameters and tokens:
            self.parts[part] = self.parts.get(part, 0.0) + per_token * parameters * tokens
        elif parameters is None:
            self.missing.append(f"{part}: no model weights to count")
        else:
            self.missing.append(f"{part}: no token counts in metrics.jsonl")


def non_embedding_parameters(model_dir: str | Path) -> int | None:
    """Parameters in a model folder's safetensors files, less the embeddings and the output head (read from
    the files' headers: nothing is loaded)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name != "__metadata__" and "embed" not in name and not name.startswith("lm_head"):
                total += math.prod(tensor["shape"])
    return total


def trained_tokens(folder: Path) -> tuple[float | None, int]:
    """(tokens the run trained on, its optimizer steps): the logged steps' tokens, scaled up to every step
    when only every log_every-th step was logged."""
    log = read_log(folder / "metrics.jsonl")
    timed = [record for record in log if number(record.get("tokens_per_second")) is not None]
    steps = max((record["step"] for record in log if isinstance(record.get("step"), int)), default=0)
    if not timed:
        return None, steps
    logged = sum(record["tokens_per_second"] * (number(record.get("step_time")) or 0.0) for record in timed)
    return logged * steps / len(timed), steps


def stage_folder(entry: dict[str, Any]) -> Path | None:
    """A demo stage's run folder from its results (`model`/`model_dir` is <run>/final)."""
    for key in ("run_dir", "model", "model_dir"):
        if isinstance(entry.get(key), str):
            path = Path(entry[key])
            return path if key == "run_dir" else path.parent
    return None


def _config(folder: Path) -> dict[str, Any]:
    return stored_config(folder) or {}


def _reward_model(compute: Compute, config: dict[str, Any], rollout_tokens: float | None,
                  results: dict[str, Any]) -> None:  # fmt: skip
    """A reward model's scoring of the rollouts and its own training (the demo's reward stage)."""
    if not config.get("reward_model"):
        return
    reward_parameters = non_embedding_parameters(config["reward_model"])
    compute.add("reward model scoring", reward_parameters, rollout_tokens, FORWARD)
    reward_folder = stage_folder(results.get("reward", {}))
    if reward_folder is not None:
        compute.add("reward model training", reward_parameters, trained_tokens(reward_folder)[0], TRAIN)


def dpo_compute(folder: Path) -> Compute:
    compute = Compute()
    tokens, _ = trained_tokens(folder)
    parameters = non_embedding_parameters(folder / "final")
    compute.add("policy forward+backward", parameters, tokens, TRAIN)
    compute.add("reference forward", parameters, tokens, FORWARD)
    return compute


def iterative_compute(folder: Path) -> Compute:
    """Each round: sampling (samples × tokens per sequence, as the round's DPO pairs have them), then DPO."""
    compute = Compute()
    parameters = non_embedding_parameters(folder / "final")
    for round_dir in sorted(folder.glob("round-*")):
        tokens, steps = trained_tokens(round_dir)
        compute.add("policy forward+backward", parameters, tokens, TRAIN)
        compute.add("reference forward", parameters, tokens, FORWARD)
        stats_path = round_dir / "sample_stats.json"
        batch = (_config(round_dir).get("train") or {}).get("batch_size")
        if tokens and steps and batch and stats_path.is_file():
            per_sequence = tokens / (steps * batch * 2)  # a pair is two sequences
            samples = json.loads(stats_path.read_text()).get("samples", 0)
            compute.add("generation", parameters, samples * per_sequence, FORWARD)
    return compute


def rl_compute(folder: Path, results: dict[str, Any], *, critic: bool) -> Compute:
    """GRPO or PPO: each rollout is generated once and trained on num_iterations times."""
    compute, config = Compute(), _config(folder)
    tokens, _ = trained_tokens(folder)
    rollout_tokens = tokens / max(int(config.get("num_iterations") or 1), 1) if tokens else None
    parameters = non_embedding_parameters(folder / "final")
    compute.add("generation", parameters, rollout_tokens, FORWARD)
    compute.add("policy forward+backward", parameters, tokens, TRAIN)
    if config.get("beta") or config.get("kl_target") or critic:
        compute.add("reference forward", parameters, rollout_tokens, FORWARD)
    if not critic and (config.get("num_iterations") or 1) > 1:
        compute.add("old log-probs forward", parameters, rollout_tokens, FORWARD)
    if critic:
        critic_parameters = non_embedding_parameters(folder / "final" / "critic")
        compute.add("critic forward+backward", critic_parameters, tokens, TRAIN)
        compute.add("critic values forward", critic_parameters, rollout_tokens, FORWARD)
    _reward_model(compute, config, rollout_tokens, results)
    return compute


def method_compute(method: str, results: dict[str, Any]) -> Compute | None:
    """The training compute of a demo stage (dpo, iterative, grpo, ppo), or None when its folder is gone."""
    folder = stage_folder(results.get(method, {}))
    if folder is None or not folder.is_dir():
        return None
    if method == "dpo":
        return dpo_compute(folder)
    if method == "iterative":
        return iterative_compute(folder)
    if method in ("grpo", "ppo"):
        return rl_compute(folder, results, critic=method == "ppo")
    return None
