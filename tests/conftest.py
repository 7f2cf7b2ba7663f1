"""Shared fixtures: device list, seeding, the RUN_SLOW gate for @pytest.mark.slow, and torch threads split among
pytest-xdist workers (``scripts/test.sh`` runs one worker per core)."""

from __future__ import annotations

import os

import pytest
import torch


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # each worker takes its share of torch's threads: no oversubscribed intra-op thread pools
        threads = max(1, torch.get_num_threads() // workers)
        torch.set_num_threads(threads)
        # ... and so do the processes it starts: a fresh-process reload must compute with the same thread count
        # as the test to give bit-identical outputs (the reduction order of a convolution depends on it)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set RUN_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every available device: cpu, plus cuda when present."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
