"""Fixtures of the runner tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import SHARED_JOBS, tiny_config, torchrun, torchrun_jobs

from pipeline.runtime.assemble import run


@pytest.fixture
def single_thread():
    """Sequential references run with one thread, as each pipeline stage does here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pipeline_job(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, list[str]], Path]:
    """(processes, overrides) -> the out_dir of that torchrun pipeline job (a later run.mode wins), run once per
    session: tests that check different facts of one job share it. A job of SHARED_JOBS runs in one launch with
    the others of its world size, at the first request for any of them; any other job, in a launch of its own."""
    done_jobs: dict[tuple[int, tuple[str, ...]], Path] = {}

    def launch(processes: int, jobs: list[tuple[str, ...]]) -> None:
        root = tmp_path_factory.mktemp("pipeline")
        outs = [root / f"job_{number}" for number in range(len(jobs))]
        runs = [[f"run.out_dir={out}", "run.mode=pipeline", *job] for job, out in zip(jobs, outs)]
        done = torchrun(processes, runs[0], timeout=240) if len(jobs) == 1 else \
            torchrun_jobs(processes, runs, root, timeout=120 + 60 * len(jobs))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        done_jobs.update({(processes, job): out for job, out in zip(jobs, outs)})

    def job(processes: int, overrides: list[str]) -> Path:
        key = (processes, tuple(overrides))
        if key not in done_jobs:
            shared = list(dict.fromkeys(tuple(sets) for size, sets in SHARED_JOBS.values() if size == processes))
            launch(processes, shared if key[1] in shared else [key[1]])
        return done_jobs[key]

    return job


@pytest.fixture(scope="session")
def sequential_reference(
        tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], tuple[Path, dict[str, Any]]]:
    """overrides -> (out_dir, summary) of that sequential run, run once per session (call it under
    single_thread): the threaded and the torchrun equivalence tests compare with the same run."""
    done_runs: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}

    def reference(overrides: list[str]) -> tuple[Path, dict[str, Any]]:
        key = tuple(overrides)
        if key not in done_runs:
            root = tmp_path_factory.mktemp("reference")
            summary = run(tiny_config(root, "sequential", *overrides))
            assert summary is not None
            done_runs[key] = (root / "sequential", summary)
        return done_runs[key]

    return reference
