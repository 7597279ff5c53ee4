"""Metrics: each step's record goes to metrics.jsonl and to any accelerate tracker."""

from __future__ import annotations

import json

import torch

from prefalign.config import TrainConfig
from prefalign.runtime import metrics


def test_metrics_reach_an_accelerate_tracker(tmp_path):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):  # accelerate's extension point for a tracker it does not ship
        name, requires_logging_directory = "recorder", False

        def __init__(self):
            super().__init__()
            self.logged, self.finished = [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    logger = metrics.MetricsLogger(tmp_path, 2, TrainConfig(progress=False, report_to=[recorder]))
    logger.log(1, {"loss": torch.tensor(0.5)})
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert recorder.logged == [(1, {"step": 1, "loss": 0.5}), (2, {"step": 2, "loss": 0.25})]
    assert recorder.finished
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [0.5, 0.25]


def test_a_non_finite_metric_is_left_out_never_written_as_nan(tmp_path, caplog):
    logger = metrics.MetricsLogger(tmp_path, 1, TrainConfig(progress=False))
    with caplog.at_level("WARNING", logger="prefalign"):
        logger.log(1, {"loss": 0.5, "rewards/never/mean": float("nan"), "kl": torch.tensor(float("inf"))})
    logger.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "loss": 0.5}
    assert "rewards/never/mean, kl" in caplog.text
