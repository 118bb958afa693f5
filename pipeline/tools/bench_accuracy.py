"""python -m pipeline.bench_accuracy --config FILE --minutes M [--nproc N] [--second SETS] [--eval-every S]
                                   [--out DIR]

Time to accuracy on this machine: E2E under DDP over N processes (default the config's
local.modules), the pipeline with the config's method (K = local.modules processes) and, with
--second, the pipeline with a second method (comma-separated table.key=value overrides, e.g.
local.context=R1E,local.modules=4), one after another, each for the same M minutes of wall time
from its launch. Each run writes a complete checkpoint set every --eval-every steps; when its
time is up every worker gets SIGTERM (run.stop_signal), which ends the run at one more set.
Every set is then scored on the test split as python -m pipeline.evaluate scores it, off the
clock, at the wall seconds after the launch at which the set was complete. Writes
DIR/accuracy.json, DIR/accuracy.md and, with matplotlib, DIR/accuracy.png.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import ArgumentParser, add_set_argument, run_main, writable_folder
from pipeline.config.loading import e2e_overrides, load_config
from pipeline.errors import BadInput, StageFailure
from pipeline.tools.bench.report import write_report
from pipeline.tools.plot import optional_pyplot
from pipeline.tools.torchrun import config_arguments, module_command

STOP_GRACE_S = 120.0  # for the workers to finish their step and write the last set after SIGTERM

# (command, log file, seconds) -> (launch time, exit code): runs the command for at most that long
TimedLauncher = Callable[[list[str], Path, float], tuple[float, int]]


@dataclass(frozen=True)
class AccuracyRun:
    name: str
    mode: str
    processes: int
    sets: tuple[str, ...]  # what this run sets on top of the config


def accuracy_runs(config_path: str | None, sets: list[str], nproc: int | None,
                  second: list[str]) -> list[AccuracyRun]:
    """DDP end to end, the config's pipeline, and the second method's pipeline where given."""
    config = load_config(config_path, sets)
    modules = config.local.modules
    if modules < 2:
        raise BadInput(f"--config trains local.modules = {modules}: the time-to-accuracy run compares a pipeline "
                       "with E2E; give a config with local.modules >= 2 (its method is the pipeline's)")
    processes = modules if nproc is None else nproc
    if processes < 1:
        raise BadInput(f"--nproc = {processes} must be >= 1")
    runs = [
        AccuracyRun("ddp_e2e", "ddp", processes, tuple([*e2e_overrides([]), "run.mode=ddp"])),
        AccuracyRun(f"pipeline_{config.local.context}_k{modules}", "pipeline", modules, ("run.mode=pipeline",)),
    ]
    if second:
        other = load_config(config_path, [*sets, *second])
        name = f"pipeline_{other.local.context}_k{other.local.modules}"
        runs.append(AccuracyRun(name if name != runs[1].name else f"{name}_second", "pipeline", other.local.modules,
                                (*second, "run.mode=pipeline")))
    return runs


def timed_launch(command: list[str], log_path: Path, seconds: float) -> tuple[float, int]:
    """Run ``command`` for at most ``seconds``, then SIGTERM its workers (torchrun's children, or the one
    process) and wait for them to save; returns (launch time, exit code: 3 where stopped)."""
    import psutil

    started = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            return started, process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pass
        # torchrun's agent, signalled itself, would pass it on but report no exit codes: the workers are signalled
        children = psutil.Process(process.pid).children()
        for worker in children or [psutil.Process(process.pid)]:
            worker.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise StageFailure(f"{shlex.join(command)} did not stop within {STOP_GRACE_S:.0f} s of SIGTERM; "
                               f"see {log_path}") from None
    stopped = "stopped by SIGTERM" in log_path.read_text()
    return started, 3 if stopped else code


def scored_sets(run_dir: Path, started: float, config_path: str | None, sets: list[str]) -> list[dict[str, Any]]:
    """Every complete checkpoint set of a run: its step, the wall seconds after the launch it was complete at,
    and its test scores (a stopped run writes no summary.json: its config is the one it was launched with)."""
    from pipeline.runtime import checkpoint  # torch: the launcher holds none while its runs train
    from pipeline.tools.evaluate import evaluate, load_for_evaluation

    points = []
    for step, folder in checkpoint.complete_sets(run_dir):
        wall = (folder / checkpoint.MARKER).stat().st_mtime - started
        net, config, spec = load_for_evaluation(run_dir, step, config_path, sets)
        points.append({"step": step, "wall_s": round(wall, 1), **evaluate(net, config, spec)})
    return points


def run_accuracy(config_path: str | None, sets: list[str], minutes: float, eval_every: int, out_dir: Path,
                 nproc: int | None = None, second: list[str] | None = None,
                 launcher: TimedLauncher = timed_launch) -> dict[str, Any]:
    if not minutes > 0:
        raise BadInput(f"--minutes = {minutes} must be > 0")
    if eval_every < 1:
        raise BadInput(f"--eval-every = {eval_every} must be >= 1 (steps between checkpoint sets)")
    runs = accuracy_runs(config_path, sets, nproc, second or [])
    results: dict[str, Any] = {}
    for run in runs:
        out = out_dir / run.name
        run_sets = [*sets, *run.sets, f"run.out_dir={out}", "run.overwrite=true", "run.resume=\"\"",
                    "train.max_steps=0", f"run.checkpoint_every={eval_every}", f"run.log_every={eval_every}",
                    "run.keep_checkpoints=1000000", "run.stop_signal=SIGTERM"]
        command = module_command(run.processes, "pipeline.train", config_arguments(config_path, run_sets))
        print(f"[accuracy] {run.name} for {minutes:g} min: {shlex.join(command)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / f"{run.name}.log"
        started, code = launcher(command, log_path, minutes * 60.0)
        if code not in (0, 3):
            raise StageFailure(f"time-to-accuracy run {run.name} failed with exit code {code}; see {log_path}")
        points = scored_sets(out, started, config_path, run_sets)
        results[run.name] = {"mode": run.mode, "processes": run.processes, "overrides": list(run.sets),
                             "command": shlex.join(command), "points": points}
        final = points[-1]["test_accuracy"] if points else None
        print(f"[accuracy] {run.name}: {len(points)} sets, last test accuracy {final}", flush=True)
    report = {"config": config_path, "overrides": sets, "minutes": minutes, "eval_every": eval_every,
              "runs": results}
    write_report(out_dir, "accuracy", report, markdown, plot)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Test accuracy against wall seconds, {report['minutes']:g} minutes per run, a set every "
             f"{report['eval_every']} steps", "", "| run | step | wall s | test accuracy (%) |", "|---|---|---|---|"]
    for name, run in report["runs"].items():
        lines += [f"| {name} | {point['step']} | {point['wall_s']:.0f} | {100 * point['test_accuracy']:.2f} |"
                  for point in run["points"]]
    return "\n".join([*lines, ""])


def plot(report: dict[str, Any], path: Path) -> None:
    plt = optional_pyplot("accuracy", "accuracy.png")
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(7, 4.8))
    for name, run in report["runs"].items():
        points = run["points"]
        axes.plot([p["wall_s"] for p in points], [100 * p["test_accuracy"] for p in points], marker="o", label=name)
    axes.set_xlabel("wall seconds since launch")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"time to accuracy: {report['minutes']:g} minutes each")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def overrides_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all("=" in item for item in items):
        raise BadInput(f"--second {text!r}: give table.key=value overrides separated by commas, e.g. "
                       "local.context=R1E,local.modules=4")
    return items


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench_accuracy", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file of the pipeline (local.modules >= 2)")
        parser.add_argument("--minutes", type=float, required=True, help="wall minutes each run trains")
        parser.add_argument("--nproc", type=int, help="processes of the DDP run (default: the config's local.modules)")
        parser.add_argument("--second", help="a second method's overrides, comma-separated table.key=value")
        parser.add_argument("--eval-every", type=int, default=200, help="steps between scored checkpoint sets")
        parser.add_argument("--out", default="runs/accuracy", help="output folder")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        run_accuracy(args.config, args.set, args.minutes, args.eval_every, writable_folder(args.out), args.nproc,
                     overrides_list(args.second) if args.second is not None else None)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
