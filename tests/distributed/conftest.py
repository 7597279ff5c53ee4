"""Multi-process tests: real torchrun launches of 2 gloo processes on the CPU (`pytest -m distributed`)."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "distributed: launches 2 processes with torchrun (gloo, CPU); part of the default run",
    )
