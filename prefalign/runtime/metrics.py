"""metrics.jsonl: one JSON object per logged step, the progress bar, and reading the file back."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.config import TrainConfig
from prefalign.files import writing

logger = logging.getLogger("prefalign")


class MetricsLogger:
    """metrics.jsonl in the run folder, a tqdm progress bar, and optional accelerate trackers."""

    def __init__(
        self, run_dir: Path, total_steps: int, config: TrainConfig, *, initial_step: int = 0,
        description: str = "train", enabled: bool = True,
    ):
        """`enabled` False (every process but rank 0): writes, shows and tracks nothing."""
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.enabled = enabled
        self.progress = None
        self.tracker = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(
                total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
            )
        if config.report_to:
            from accelerate import Accelerator

            self.tracker = Accelerator(log_with=config.report_to, project_dir=str(run_dir))
            self.tracker.init_trackers(run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        # NaN / inf is not JSON: such a metric is left out of the record (and said), never written as NaN.
        missing = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if missing:
            logger.warning("step %d: metric(s) %s have no finite value; left out of metrics.jsonl",
                           step, ", ".join(missing))
            record = {k: v for k, v in record.items() if k not in missing}
        with writing(self.path, "set train.output_dir to another folder"), self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tracker is not None:
            self.tracker.log(record, step=step)
        if self.progress is not None:
            shown = {
                k: f"{v:.4g}"
                for k, v in record.items()
                if k in ("loss", "eval/loss", "reward", "rewards/accuracies")
            }
            self.progress.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.tracker is not None:
            self.tracker.end_training()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
