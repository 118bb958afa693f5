"""Fixtures of the runner tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from distributed_helpers import torchrun


@pytest.fixture
def single_thread():
    """Sequential references run with one thread, as each pipeline stage does here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pipeline_job(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, list[str]], Path]:
    """(processes, overrides) -> the out_dir of that torchrun pipeline job, run once per session:
    tests that check different facts of the same job (test_stage, test_replicas) share its launch."""
    done_jobs: dict[tuple[int, tuple[str, ...]], Path] = {}

    def job(processes: int, overrides: list[str]) -> Path:
        key = (processes, tuple(overrides))
        if key not in done_jobs:
            out = tmp_path_factory.mktemp("pipeline") / "out"
            done = torchrun(processes, [f"run.out_dir={out}", "run.mode=pipeline", *overrides], timeout=240)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            done_jobs[key] = out
        return done_jobs[key]

    return job
