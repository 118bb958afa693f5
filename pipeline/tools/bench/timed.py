"""The timed benchmark: the run plan's runs launched round after round, their results read, the performance
model's figures added, and the report written. Torch and the model load with this module: the command line
imports it only once its arguments are checked."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.runtime.host import keep_freed_host_memory
from pipeline.tools.bench.estimates import estimate, idle_fraction
from pipeline.tools.bench.launch import Launcher, Load, launch, run_command, run_rounds
from pipeline.tools.bench.picture import plot
from pipeline.tools.bench.report import bench_json, markdown, write_report
from pipeline.tools.bench.runs import CLASSIC_MICROBATCHES, BenchRun, Request, every_run, schedule


def run_bench(config_path: str | None, sets: list[str], nproc: int, steps: int, window: int, out_dir: Path,
              rounds: int = 3, launcher: Launcher = launch,
              classic_microbatches: Sequence[int] = CLASSIC_MICROBATCHES,
              checkpoint_segments: Sequence[int] | None = None) -> dict[str, Any]:
    """Every run of the plan, ``rounds`` times, into ``out_dir``; bench.json's content, also written there."""
    request = Request(config_path, sets, nproc, steps, window, rounds)
    check_request(request)
    load = Load(os.cpu_count() or 1, os.getloadavg())
    if load.warning:
        print(load.warning, file=sys.stderr, flush=True)
    keep_freed_host_memory()  # as in the runs, so the profiled block times match theirs
    model = estimate(request, classic_microbatches, checkpoint_segments)
    written_cuts = model.written_cuts

    def command_of(run: BenchRun, out: Path) -> list[str]:
        return run_command(run, request, out, load.cores, written_cuts)

    results, during = run_rounds(schedule(nproc, rounds, classic_microbatches, model.segments), out_dir, command_of,
                                 window, model.batch, launcher)
    load.during.extend(during)
    runs = every_run(nproc, classic_microbatches, model.segments)
    for run in runs:
        results[run.name].update(model.row(run))
    traffic = {run.name: model.wire_bytes(run) for run in runs}
    idle = {run.name: idle_fraction(run, results[run.name]) for run in runs}
    report = bench_json(model, load, runs, results, traffic, idle)
    write_report(out_dir, "bench", report, markdown, plot)
    return report


def check_request(request: Request) -> None:
    if request.nproc < 2:
        raise BadInput(f"--nproc = {request.nproc}: the benchmark compares N processes; use --nproc 2 or more")
    if request.steps < 2 * request.window:
        raise BadInput(f"--steps = {request.steps} must be at least two windows "
                       f"(2 x --window = {2 * request.window})")
    if request.rounds < 1:
        raise BadInput(f"--rounds = {request.rounds} must be >= 1 (3 or more to see the spread)")
