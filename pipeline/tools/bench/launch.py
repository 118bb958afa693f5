"""Launching the runs: each run's command line and settings, one run at a time in the plan's order, the
machine's 1-minute load sampled while they run."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.loading import e2e_overrides
from pipeline.errors import StageFailure
from pipeline.tools.bench.results import combine, figures
from pipeline.tools.bench.runs import BenchRun, Request
from pipeline.tools.torchrun import config_arguments, module_command, set_arguments, torchrun_command

# Launches one run: (command, log file, list to append 1-minute load samples to) -> exit code.
Launcher = Callable[[list[str], Path, list[float]], int]


def command_for(run: BenchRun, config_path: str | None, sets: list[str]) -> list[str]:
    return module_command(run.processes, "pipeline.train", config_arguments(config_path, sets))


def classic_command(run: BenchRun, config_path: str | None, sets: list[str]) -> list[str]:
    arguments = [*config_arguments(config_path), "--schedule", run.schedule, "--microbatches", str(run.microbatches)]
    return torchrun_command(run.processes, "pipeline.classic_pp", [*arguments, *set_arguments(sets)])


def run_command(run: BenchRun, request: Request, out: Path, cores: int, written_cuts: dict[int, str]) -> list[str]:
    """The command of one run writing to ``out``: the local runs of K modules cut at ``written_cuts[K]``."""
    # classic_pp reads the pipeline's settings (threads per stage, timeout) as a pipeline run would
    mode = "pipeline" if run.mode == "classic_pp" else run.mode
    run_sets = [
        *request.sets, f"run.mode={mode}", f"run.out_dir={out}", f"train.max_steps={request.steps}",
        f"run.log_every={request.window}", "run.resume=\"\"", f"local.modules={run.modules}", "train.epochs=1000000",
        "run.overwrite=true",  # the bench owns its round folders: a second bench replaces them
    ]
    run_sets += (e2e_overrides([]) if run.modules == 1
                 else [f"local.partition={written_cuts[run.modules]}"])
    if run.processes > 1:
        run_sets.append(f"pipeline.threads_per_stage={max(1, cores // run.processes)}")
    if run.segments:
        run_sets.append(f"precision.checkpoint_segments={run.segments}")
    if run.mode == "classic_pp":
        return classic_command(run, request.config_path, run_sets)
    return command_for(run, request.config_path, run_sets)


@dataclass
class Load:
    """The machine's 1-minute load average: before the runs (with the 5- and 15-minute ones), and while they ran."""

    cores: int
    before: tuple[float, float, float]
    during: list[float] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        return busy_warning(self.before[0], self.cores)


def busy_warning(load_1min: float, cores: int) -> str | None:
    if load_1min <= 0.5 * cores:
        return None
    return (f"warning: the machine was busy before the benchmark (1-minute load {load_1min:.2f} on {cores} cores): "
            f"other work shares the cores, so these figures are noisy; rerun on an idle machine")


def launch(command: list[str], log_path: Path, load: list[float]) -> int:
    """Run one benchmark run, sampling the 1-minute load average every 2 s while it runs."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                return process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                load.append(os.getloadavg()[0])


def run_rounds(runs: list[tuple[int, BenchRun]], out_dir: Path, command_of: Callable[[BenchRun, Path], list[str]],
               window: int, batch: int, launcher: Launcher = launch) -> tuple[dict[str, Any], list[float]]:
    """Every (round, run) in order -> ({mode: combined figures}, 1-minute load samples taken during the runs)."""
    per_mode: dict[str, list[dict[str, Any]]] = {}
    load: list[float] = []
    rounds = max(number for number, _ in runs)
    for number, run in runs:
        out = out_dir / f"round-{number}" / run.name
        command = command_of(run, out)
        print(f"[bench] round {number}/{rounds} {run.name}: {shlex.join(command)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        log_path = out.parent / f"{run.name}.log"
        code = launcher(command, log_path, load)
        load.append(os.getloadavg()[0])
        if code != 0:
            raise StageFailure(f"bench run {run.name} (round {number}) failed with exit code {code}; see {log_path}")
        result = figures(run, out, window, batch)
        per_mode.setdefault(run.name, []).append(result)
        print(f"[bench] round {number}/{rounds} {run.name}: {result['samples_per_s']} samples/s", flush=True)
    return {name: combine(results) for name, results in per_mode.items()}, load
