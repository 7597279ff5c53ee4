"""`prefalign demo`: the whole preference-alignment stage on the built-in task, with a report.

Stages run in order; each is a function `stage(context) -> dict` (prefalign.commands.demo_stages) that
trains with a pinned recipe (prefalign.commands.demo_recipes), evaluates on held-out prompts and adds a line
to the report. The base stage builds (or reuses) the tiny base model and evaluates it; every other stage
starts from it. Budget on a 2-core CPU: about 15 minutes for every stage together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.commands.demo_stages import NEEDS, STAGES, DemoContext
from prefalign.config import validate
from prefalign.errors import ConfigError
from prefalign.options import option
from prefalign.reporting.demo import demo_section
from prefalign.runtime.setup import seed_everything, set_threads


@dataclass
class DemoConfig:
    output_dir: str = option("runs/demo", "Run folder of the demo; report.md is written there.")
    stages: list[str] = option(
        help=f"Stages to run, in order (of {', '.join(STAGES)}).", factory=lambda: list(STAGES),
    )
    eval_prompts: int = option(500, "Held-out prompts each evaluation uses.", low=1)
    seed: int = option(0, "Seed for every stage.", low=0)
    num_threads: int = option(0, "torch CPU threads (0 = torch's default).", low=0)

    def check(self, prefix: str = "") -> None:
        unknown = [name for name in self.stages if name not in STAGES]
        if unknown:
            raise ConfigError(f"unknown demo stage {unknown[0]!r} in {prefix}stages; stages: {list(STAGES)}")


def demo(config: DemoConfig) -> dict[str, Any]:
    """Run the stages, rewriting report.md and results.json after each; returns every stage's results."""
    validate(config)
    set_threads(config.num_threads)
    seed_everything(config.seed)
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    context = DemoContext(
        seed=config.seed, num_threads=config.num_threads, eval_prompts=config.eval_prompts, run_dir=run_dir,
    )
    stages = with_needs(config.stages)
    started = time.perf_counter()
    timings = {}
    for name in stages:
        print(f"\n== demo stage: {name}", flush=True)
        stage_started = time.perf_counter()
        context.results[name] = STAGES[name](context)
        timings[name] = time.perf_counter() - stage_started
        print(context.lines[-1] if context.lines else "", flush=True)
        write_report(context, timings, time.perf_counter() - started)
    print(f"\nreport: {run_dir / 'report.md'}")
    return context.results


def with_needs(asked: list[str]) -> list[str]:
    """The stages to run: the base first (every stage starts from it), then each asked stage after the
    stages it needs (NEEDS) that were not asked for."""
    stages = ["base"]
    for name in asked:
        for needed in [*NEEDS.get(name, []), name]:
            if needed not in stages:
                stages.append(needed)
    return stages


def write_report(context: DemoContext, timings: dict[str, float], total: float) -> None:
    rows = "\n".join(context.lines)
    times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    report = (
        "# prefalign demo\n\n"
        "The built-in task (2-digit addition, exact-match reward) through each stage of preference "
        "alignment. "
        f"Evaluations use {context.eval_prompts} held-out prompts never seen in training.\n\n"
        "| stage | result | notes |\n| --- | --- | --- |\n"
        f"{rows}\n\nWall time: {total:.0f} s ({times}).\n"
    ) + demo_section(context.results, context.run_dir)  # figures, what they show, each stage's curves
    (context.run_dir / "report.md").write_text(report)
    (context.run_dir / "results.json").write_text(json.dumps(context.results, indent=2, default=str))
