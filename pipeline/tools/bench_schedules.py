"""python -m pipeline.bench_schedules --config FILE --slow S --factor F [--steps N] [--out DIR]

Lockstep against buffered on one config, as a K-stage pipeline under torchrun with stage S made F
times slower (pipeline.slowdown). The lockstep run trains N steps: every stage waits for the slow
one. The buffered run gets the same training time: its stage 0 trains as many steps as its own
step time (measured in the lockstep run, where it is not slowed) fits into the lockstep run's
training time, and the downstream stages train at their own pace meanwhile. Both runs end with
an exact evaluation of the test set. Writes DIR/schedules.json and DIR/schedules.md: steps/s per
stage, stage 0's samples/s, training and wall seconds, test accuracy.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import ArgumentParser, add_set_argument, run_main, writable_folder
from pipeline.config.loading import load_config
from pipeline.errors import BadInput, StageFailure
from pipeline.runtime.metrics import percent
from pipeline.tools.bench.launch import launch
from pipeline.tools.torchrun import config_arguments, torchrun_command

SCHEDULES = ("lockstep", "buffered")


def stage_steps(metrics: Path) -> dict[int, int]:
    """Each module's own steps at the end of a run (its ``stage`` line in metrics.jsonl)."""
    steps: dict[int, int] = {}
    for line in metrics.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "stage":
            steps[int(event["module"])] = int(event["step"])
    return steps


def run_figures(summary: dict[str, Any], steps: dict[int, int], batch: int) -> dict[str, Any]:
    """One run's row: per stage its steps and steps/s over its own training time (full batches assumed)."""
    stages = sorted(summary["stages"], key=lambda stage: stage["stage"])
    rates = [stage["samples_per_s"] for stage in stages]
    first = stages[0]
    return {
        "stage_steps": [steps[stage["stage"]] for stage in stages],
        "steps_per_s": [round(rate / batch, 3) for rate in rates],
        "samples_per_s": rates[0],
        # The run's training time: the stage that trained longest (lockstep: the last, draining the queue).
        "train_s": round(max(steps[stage["stage"]] * batch / max(stage["samples_per_s"], 1e-9)
                             for stage in stages), 2),
        "stage0_step_s": first["compute_s"] / max(steps[first["stage"]], 1),
        "wall_s": summary["wall_s"],
        "test_accuracy": summary["test_accuracy"],
    }


def buffered_steps(lockstep: dict[str, Any]) -> int:
    """Stage 0's steps in the buffered run: its own step time into the lockstep run's training time."""
    return max(1, round(float(lockstep["train_s"]) / max(float(lockstep["stage0_step_s"]), 1e-9)))


def markdown(report: dict[str, Any]) -> str:
    slow, factor = report["slow"], report["factor"]
    lines = [
        f"# Lockstep vs buffered: stage {slow} slowed {factor:g}x",
        "",
        f"Config `{report['config']}`, K = {report['modules']}, batch {report['batch_size']}, {report['machine']}. "
        f"Lockstep trains {report['runs']['lockstep']['stage_steps'][0]} steps; buffered gets the same training "
        f"time: stage 0 trains {report['runs']['buffered']['stage_steps'][0]} steps (its own step time, measured "
        f"in the lockstep run, into the lockstep run's training time). Steps/s per stage over its training time.",
        "",
        "| schedule | steps per stage | steps/s per stage | stage 0 samples/s | train s | wall s | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SCHEDULES:
        run = report["runs"][name]
        accuracy = "-" if run["test_accuracy"] is None else percent(run["test_accuracy"])
        lines.append(f"| {name} | {' / '.join(map(str, run['stage_steps']))} | "
                     f"{' / '.join(f'{rate:.2f}' for rate in run['steps_per_s'])} | {run['samples_per_s']:.0f} | "
                     f"{run['train_s']:.1f} | {run['wall_s']:.1f} | {accuracy} |")
    return "\n".join(lines) + "\n"


def run_schedules(config_path: str | None, sets: list[str], slow: int, factor: float, steps: int,
                  out_dir: Path) -> dict[str, Any]:
    config = load_config(config_path, sets)
    modules, batch = config.local.modules, config.data.batch_size
    if not 0 <= slow < modules:
        raise BadInput(f"--slow = {slow} names no stage; the config has local.modules = {modules} (0..{modules - 1})")
    if factor < 1.0 or steps < 1:
        raise BadInput(f"--factor = {factor} must be >= 1 and --steps = {steps} >= 1")
    slowdown = [factor if stage == slow else 1.0 for stage in range(modules)]
    runs: dict[str, dict[str, Any]] = {}
    stage0_steps = steps
    for name in SCHEDULES:
        out = out_dir / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        run_sets = [*sets, "run.mode=pipeline", f"run.out_dir={out}", "run.overwrite=true", f"pipeline.schedule={name}",
                    f"pipeline.slowdown={slowdown}", f"train.max_steps={stage0_steps}", "pipeline.replicas=1"]
        command = torchrun_command(modules, "pipeline.train", config_arguments(config_path, run_sets))
        print(f"[bench_schedules] {name}: {shlex.join(command)}", flush=True)
        code = launch(command, out_dir / f"{name}.log", [])
        if code != 0:
            raise StageFailure(f"the {name} run failed with exit code {code}; see {out_dir / f'{name}.log'}")
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = run_figures(summary, stage_steps(out / "metrics.jsonl"), batch)
        if name == "lockstep":
            stage0_steps = buffered_steps(runs[name])
    report = {"config": config_path or "(defaults)", "sets": sets, "modules": modules, "batch_size": batch,
              "slow": slow, "factor": factor, "machine": f"{os.cpu_count()} CPU cores", "runs": runs}
    (out_dir / "schedules.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "schedules.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench_schedules", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--slow", type=int, default=1, help="the stage to slow down")
        parser.add_argument("--factor", type=float, default=1.5, help="how many times slower it runs")
        parser.add_argument("--steps", type=int, default=200, help="training steps of the lockstep run")
        parser.add_argument("--out", default="runs/bench_schedules", help="output folder")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        run_schedules(args.config, args.set, args.slow, args.factor, args.steps, writable_folder(args.out))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
