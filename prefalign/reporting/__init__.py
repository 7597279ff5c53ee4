"""Run reports: figures and report.md from run folders (`prefalign report`, the end of every training
command, the demo's page). Reads run folders only; matplotlib (Agg) draws."""

from prefalign.reporting.report import Report, write_report
from prefalign.reporting.runs import Run, load_run

__all__ = ["Report", "Run", "load_run", "write_report"]
