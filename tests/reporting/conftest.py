"""The report tests' real runs: made once per session (tests.reporting.fixtures.make_runs)."""

import pytest

from tests.reporting.fixtures import make_runs


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))
