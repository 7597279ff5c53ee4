"""`prefalign report RUN_DIR [RUN_DIR ...] [--output DIR]`: figures and report.md from run folders, several
runs overlaid; and the report every training command writes into its run folder at the end (`--report false`
skips it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.config import validate
from prefalign.options import coerce, option
from prefalign.reporting import Report, write_report
from prefalign.runtime.distributed import is_main_process

logger = logging.getLogger("prefalign")

# A training run's report goes to a folder of its own: iterative DPO writes its own report.md at the top.
RUN_REPORT_FOLDER = "report"
# `--report` of the training commands: read by the CLI, not a config key (it changes nothing in training).
REPORT_OPTION = "report"
REPORT_HELP = (
    f"  --{REPORT_OPTION} (bool, default True)\n      At the end, write figures and report.md into "
    f"<run>/{RUN_REPORT_FOLDER}/ (prefalign report). false = skip."
)


@dataclass
class ReportConfig:
    runs: list[str] = option(
        help="Run folders (train.output_dir of runs); also given as bare arguments: prefalign report RUN "
        "[RUN ...]. Several runs are overlaid in every figure.",
        factory=list,
    )
    output: str = option(
        "", f"Folder for report.md and the figures; empty = <run>/{RUN_REPORT_FOLDER} for one run, "
        "runs/report for several.",
    )
    title: str = option("", "Title of report.md; empty = 'Run report: ' and the run names.")


def default_output(runs: list[str]) -> Path:
    return Path(runs[0]) / RUN_REPORT_FOLDER if len(runs) == 1 else Path("runs/report")


def report(config: ReportConfig) -> Report:
    """Write the report of `config.runs`; prints where it is."""
    validate(config)
    written = write_report(
        config.runs, config.output or default_output(config.runs), title=config.title or None,
    )
    print(f"report: {written.path} ({len(written.figures)} figures)")
    for run in written.runs:
        if run.missing:
            print(f"  {run.name}: " + "; ".join(run.missing))
    return written


def report_option(overrides: dict[str, Any]) -> bool:
    """Take the training commands' `--report` out of the overrides (it is no config key); default true."""
    return coerce(REPORT_OPTION, overrides.pop(REPORT_OPTION, "true"), bool, from_string=True)


def write_run_report(run_dir: str | Path) -> Path | None:
    """The end of a training command: <run>/report/ from the main process only. The model is saved by then,
    so a report that cannot be written is a warning (with the command to retry), never a failed run."""
    if not is_main_process():
        return None
    folder = Path(run_dir) / RUN_REPORT_FOLDER
    try:
        written = write_report([run_dir], folder)
    except Exception as error:  # noqa: BLE001 - the trained model is already saved; say so and go on
        logger.warning(
            "the run report could not be written (%s: %s); the run itself is complete. Retry with: "
            "prefalign report %s", type(error).__name__, error, run_dir,
        )
        return None
    logger.info("report: %s (%d figures)", written.path, len(written.figures))
    return written.path
