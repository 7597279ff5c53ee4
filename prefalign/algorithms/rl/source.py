"""RL's source of optimizer steps for the one training loop (`prefalign.runtime.loop.train`).

Each phase collects one rollout batch with the algorithm's `collect` (sampling, scoring, advantages), adds
the frozen reference's per-token log-probs when there is a KL term, and hands out `num_iterations` (μ) passes
over the batch, each split into `steps_per_generation` optimizer steps of whole groups, in micro-batches.

π_old: when the batch feeds more than one optimizer step, the ratio's denominator is a no-grad forward of the
training model before the first update (as TRL, OpenRLHF and verl do), not the sampler's log-probs: the two
differ under bf16 and with another engine; their largest and mean difference is logged. With one step per
batch, π_old = π detached in the loss (ratio 1 in value), and the loss logs the same difference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefalign.algorithms.rl.experience import add_token_logps, collate_experience, logprob_difference
from prefalign.errors import TrainingError
from prefalign.files import writing
from prefalign.models.reference import Reference
from prefalign.runtime import distributed
from prefalign.runtime.loop import Phase, example_stream


@dataclass
class RolloutBatch:
    """What an algorithm's collection step returns: experience rows (groups contiguous) and what to log."""

    rows: list[dict[str, Any]]
    group_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    logged: list[dict[str, Any]] = field(default_factory=list)  # sampled completions for completions.jsonl


@dataclass
class Progress:
    """Where a run is: prompts consumed and generation calls made (sampling seeds follow the calls)."""

    position: int = 0
    generation_calls: int = 0
    step: int = 0


class ExperienceSource:
    def __init__(
        self,
        collect: Callable[[Progress, Callable[[], int]], RolloutBatch],
        *,
        num_prompts: int,
        seed: int,
        policy: torch.nn.Module,
        score: Callable[[torch.nn.Module, dict[str, Any]], Any],
        reference: Reference | None,
        num_iterations: int,
        steps_per_generation: int,
        micro_batch_size: int,
        pad_token_id: int,
        device: torch.device,
        prepare: Callable[[list[dict[str, Any]]], dict[str, float]] | None = None,
        always_old_logps: bool = False,
        extra_state: dict[str, Any] | None = None,
    ):
        self.collect, self.policy, self.score, self.reference = collect, policy, score, reference
        self.num_prompts, self.seed = num_prompts, seed
        self.num_iterations, self.steps_per_generation = num_iterations, steps_per_generation
        self.micro_batch_size, self.pad_token_id, self.device = micro_batch_size, pad_token_id, device
        # prepare(rows) -> metrics runs once the reference and old log-probs are in (PPO: values, rewards,
        # GAE); extra_state is the algorithm's own resumable state (PPO's β), saved with the checkpoints.
        self.prepare, self.always_old_logps = prepare, always_old_logps
        self.extra_state = extra_state if extra_state is not None else {}
        self.restore({"position": 0, "generation_calls": 0, **self.extra_state})

    def restore(self, state: dict[str, Any]) -> None:
        self.progress = Progress(position=state["position"], generation_calls=state["generation_calls"])
        self.stream = example_stream(self.num_prompts, self.seed, start=self.progress.position)
        self.extra_state.update({key: state[key] for key in self.extra_state if key in state})

    def state(self) -> dict[str, Any]:
        progress = {"position": self.progress.position, "generation_calls": self.progress.generation_calls}
        return {**progress, **self.extra_state}

    def next_prompt(self) -> int:
        self.progress.position += 1
        return next(self.stream)

    def next_phase(self, step: int, steps_left: int) -> Phase:
        # Under FSDP the rollout's forwards (sampling, reference and π_old log-probs of this rank's groups,
        # whose counts differ between ranks) run on the policy's whole weights, gathered once for the phase.
        with distributed.full_weights(self.policy) as policy:
            return self._phase(policy, step, steps_left)

    def _phase(self, policy: torch.nn.Module, step: int, steps_left: int) -> Phase:
        self.progress.step = step
        batch = self.collect(self.progress, self.next_prompt)
        # Every process holds the whole batch (ShardedEngine): each trains on its contiguous share of groups.
        rows, group = self.own_groups(batch.rows, batch.group_size), batch.group_size
        logged = {
            "batch_size": self.micro_batch_size,
            "pad_token_id": self.pad_token_id,
            "device": self.device,
        }
        if self.reference is not None:
            with self.reference.network(policy) as network:
                add_token_logps(rows, "ref_logps", lambda b: self.score(network, b), **logged)
        num_groups = len(rows) // group
        # The same number of optimizer steps on every process (a share may hold one group fewer).
        parts = min(self.steps_per_generation, len(batch.rows) // group // distributed.world_size())
        bounds = [round(i * num_groups / parts) * group for i in range(parts + 1)]
        metrics = dict(batch.metrics)
        multi_step = self.num_iterations > 1 or parts > 1
        if multi_step or self.always_old_logps:  # π drifts from π_old within the batch: fix π_old now
            add_token_logps(rows, "old_logps", lambda b: self.score(policy, b), **logged)
            metrics.update(logprob_difference(rows))
        if self.prepare is not None:
            metrics.update(self.prepare(rows))
        steps = []
        for _ in range(self.num_iterations):
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                size = self.micro_batch_size
                steps.append(
                    [
                        collate_experience(rows[i : min(i + size, stop)], self.pad_token_id)
                        for i in range(start, stop, size)
                    ]
                )
        return Phase(steps=steps[:steps_left], metrics=metrics, generation=True, logged=batch.logged)

    @staticmethod
    def own_groups(rows: list[dict[str, Any]], group: int) -> list[dict[str, Any]]:
        """This process's contiguous share of whole groups (all of them with one process)."""
        groups = len(rows) // group
        if groups < distributed.world_size():
            raise TrainingError(
                f"the rollout batch has {groups} prompt groups for {distributed.world_size()} processes: "
                "every process needs at least one. Raise train.batch_size x grad_accum (or lower "
                "dynamic-sampling filtering) or use fewer processes."
            )
        start, end = distributed.shard_bounds(groups)
        return rows[start * group : end * group]


def completions_writer(run_dir: Path, every: int) -> Callable[[Phase, int, int], None]:
    """after_phase for the training loop: append the phase's sampled completions to completions.jsonl when
    one of its steps is a multiple of `every` (0 = never), tagged with the phase's first step."""

    def write(phase: Phase, first_step: int, last_step: int) -> None:
        if every and distributed.is_main_process() and any(
            step % every == 0 for step in range(first_step, last_step)
        ):
            path = run_dir / "completions.jsonl"
            with writing(path, "set train.output_dir to another folder"), path.open("a") as handle:
                for record in phase.logged:
                    handle.write(json.dumps({"step": first_step + 1, **record}, default=str) + "\n")

    return write
