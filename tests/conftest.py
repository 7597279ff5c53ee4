"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for every test: tiny models gain nothing from threads, on a busy machine OpenMP
    barriers stall them, and bit-exact comparisons need a fixed reduction order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
