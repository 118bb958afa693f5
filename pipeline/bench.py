"""python -m pipeline.bench --config FILE --nproc N [--steps S] [--out DIR]

Runs, one after another on this machine and the same data: E2E in one process (all cores),
DDP over N processes, sequential local learning (one process, K = N) and the pipeline over N
processes (K = N). The local runs share one set of cuts (balanced-time unless the config gives
an explicit list or balanced-memory). Throughput is the median of timed windows of
``--window`` steps after the first (warm-up) window; activation memory is what autograd keeps
for backward, counted exactly. Writes DIR/bench.json, DIR/bench.md and, with matplotlib,
DIR/bench.png.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cli import ArgumentParser, run_main
from pipeline.config import Config, load_config
from pipeline.data.specs import dataset_spec
from pipeline.distributed import keep_freed_host_memory
from pipeline.errors import BadInput, StageFailure
from pipeline.metrics import say
from pipeline.model.network import resolve_cuts
from pipeline.model.partition import flat_to_cut
from pipeline.model.profile import module_activation_bytes


@dataclass(frozen=True)
class BenchRun:
    name: str
    mode: str
    processes: int
    modules: int


def plan_runs(nproc: int) -> list[BenchRun]:
    return [
        BenchRun("e2e", "sequential", 1, 1),
        BenchRun("ddp", "ddp", nproc, 1),
        BenchRun("sequential", "sequential", 1, nproc),
        BenchRun("pipeline", "pipeline", nproc, nproc),
    ]


def command_for(run: BenchRun, config_path: str | None, sets: list[str]) -> list[str]:
    args = ["-m", "pipeline.train"] + (["--config", config_path] if config_path else [])
    for item in sets:
        args += ["--set", item]
    if run.processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.processes}", *args]


def windows(metrics: Path, module: int, window: int) -> dict[int, dict[int, dict[str, Any]]]:
    """Timed windows: step -> module -> the train line logged there (whole windows only)."""
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for line in metrics.read_text().splitlines():
        item = json.loads(line)
        if item.get("event") == "train" and item["step"] % window == 0:
            found.setdefault(item["step"], {})[item["module"]] = item
    first = min(found, default=0)
    return {step: lines for step, lines in found.items() if step != first and module in lines}


def figures(run: BenchRun, out: Path, window: int, batch: int) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    timed = windows(out / "metrics.jsonl", run.modules - 1, window)
    if not timed:
        raise BadInput(f"bench: --steps must cover at least two windows of --window steps (run {run.name})")
    rates = [lines[run.modules - 1]["samples_per_s"] for lines in timed.values()]
    result: dict[str, Any] = {
        "mode": run.mode,
        "processes": run.processes,
        "modules": run.modules,
        "samples_per_s": round(statistics.median(rates), 2),
        "windows": len(rates),
        "peak_mem_bytes": max(stage["peak_mem_bytes"] for stage in summary["stages"]),
        "busy_fraction": [stage["busy_fraction"] for stage in summary["stages"]],
        "recv_wait_s": [stage["recv_wait_s"] for stage in summary["stages"]],
        "send_wait_s": [stage["send_wait_s"] for stage in summary["stages"]],
        "cut_points": summary["cut_points"],
        "test_accuracy": summary["test_accuracy"],
    }
    if run.mode == "pipeline":
        # Bottleneck bound per window: the slowest stage's compute seconds for those batches.
        bounds = [batch * window / max(line["window_compute_s"] for line in lines.values())
                  for lines in timed.values() if len(lines) == run.modules]
        result["bottleneck_samples_per_s"] = round(statistics.median(bounds), 2)
    return result


def run_bench(config_path: str | None, sets: list[str], nproc: int, steps: int, window: int, out_dir: Path) -> dict[str, Any]:
    if nproc < 2:
        raise BadInput(f"--nproc = {nproc}: the benchmark compares N processes; use --nproc 2 or more")
    if steps < 2 * window:
        raise BadInput(f"--steps = {steps} must be at least two windows (2 x --window = {2 * window})")
    keep_freed_host_memory()  # as in the runs, so the profiled block times match theirs
    base = load_config(config_path, [*sets, "local.modules=1", "local.partition=equal", "local.context=R0"])
    chosen = load_config(config_path, sets).local.partition
    if isinstance(chosen, list) and len(chosen) + 1 != nproc:
        raise BadInput(f"--nproc = {nproc} but the config's local.partition cuts the network into "
                       f"{len(chosen) + 1} modules; use --nproc {len(chosen) + 1}")
    local = load_config(config_path, [*sets, f"local.modules={nproc}", *_partition(chosen)])
    spec = dataset_spec(local)
    cuts = _profile_cuts(local, spec, nproc)
    explicit = json.dumps([flat_to_cut(cut, local.model.blocks_per_stage) for cut in cuts])
    batch = base.data.batch_size
    activation = {
        "e2e": module_activation_bytes(base, spec, [], batch)[0],
        "ddp": module_activation_bytes(base, spec, [], -(-batch // nproc))[0],
        "local": module_activation_bytes(local, spec, cuts, batch),
    }

    results: dict[str, Any] = {}
    for run in plan_runs(nproc):
        out = out_dir / run.name
        run_sets = [
            *sets, f"run.mode={run.mode}", f"run.out_dir={out}", f"train.max_steps={steps}", f"run.log_every={window}",
            "run.resume=\"\"", f"local.modules={run.modules}", "train.epochs=1000000",
        ]
        run_sets += ["local.context=R0", "local.partition=equal"] if run.modules == 1 else [f"local.partition={explicit}"]
        if run.processes > 1:
            run_sets.append(f"pipeline.threads_per_stage={max(1, (os.cpu_count() or 1) // run.processes)}")
        command = command_for(run, config_path, run_sets)
        say(f"[bench] {run.name}: {' '.join(command)}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        with open(out_dir / f"{run.name}.log", "w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            raise StageFailure(f"bench run {run.name} failed with exit code {code}; see {out_dir / (run.name + '.log')}")
        results[run.name] = figures(run, out, window, batch)
        say(f"[bench] {run.name}: {results[run.name]['samples_per_s']} samples/s")

    results["e2e"]["activation_mem_bytes"] = activation["e2e"]
    results["ddp"]["activation_mem_bytes"] = activation["ddp"]
    for name in ("sequential", "pipeline"):
        results[name]["activation_mem_bytes"] = max(activation["local"])
        results[name]["module_activation_mem_bytes"] = activation["local"]
    pipe = results["pipeline"]
    report = {
        "config": config_path,
        "overrides": sets,
        "nproc": nproc,
        "steps": steps,
        "window": window,
        "batch_size": batch,
        "arch": base.model.arch,
        "dataset": base.data.name,
        "device": "cuda" if torch.cuda.is_available() and base.run.device != "cpu" else "cpu",
        "cpu_count": os.cpu_count(),
        "runs": results,
        "pipeline_over_ddp": round(pipe["samples_per_s"] / results["ddp"]["samples_per_s"], 3),
        "pipeline_over_e2e": round(pipe["samples_per_s"] / results["e2e"]["samples_per_s"], 3),
        "pipeline_efficiency": round(pipe["samples_per_s"] / pipe["bottleneck_samples_per_s"], 3),
        "largest_stage_activation_over_e2e": round(max(activation["local"]) / activation["e2e"], 3),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "bench.md").write_text(table)
    say(table)
    plot(report, out_dir / "bench.png")
    return report


def _partition(chosen: str | list[list[int]]) -> list[str]:
    """The cuts the local runs use: the config's explicit list or balanced-memory, else balanced-time."""
    return [] if isinstance(chosen, list) or chosen == "balanced-memory" else ["local.partition=balanced-time"]


def _profile_cuts(config: Config, spec: Any, nproc: int) -> list[int]:
    """Profile as a stage will run: with its share of the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        device = torch.device("cuda" if torch.cuda.is_available() and config.run.device != "cpu" else "cpu")
        return resolve_cuts(config, spec, device)
    finally:
        torch.set_num_threads(before)


def markdown(report: dict[str, Any]) -> str:
    mib = 1 << 20
    lines = [
        f"ResNet {report['arch']} on {report['dataset']}, batch {report['batch_size']}, {report['nproc']} processes, "
        f"{report['steps']} steps, windows of {report['window']} ({report['device']}, {report['cpu_count']} cores)",
        "",
        "| run | processes | modules | samples/s | peak mem / process (MiB) | activation mem (MiB) | busy fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        busy = " / ".join(f"{b:.2f}" for b in run["busy_fraction"])
        lines.append(
            f"| {name} | {run['processes']} | {run['modules']} | {run['samples_per_s']:.1f} | "
            f"{run['peak_mem_bytes'] / mib:.0f} | {run['activation_mem_bytes'] / mib:.0f} | {busy} |"
        )
    lines += [
        "",
        f"- pipeline / DDP samples/s: {report['pipeline_over_ddp']:.3f}",
        f"- pipeline / E2E samples/s: {report['pipeline_over_e2e']:.3f}",
        f"- pipeline efficiency (measured / slowest-stage bound): {report['pipeline_efficiency']:.3f}",
        f"- largest module's activation memory / E2E's: {report['largest_stage_activation_over_e2e']:.3f}",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("[bench] matplotlib not installed: no bench.png (pip install .[plot])")
        return
    names = list(report["runs"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [report["runs"][n]["samples_per_s"] for n in names], color="tab:blue")
    left.set_ylabel("samples / s")
    left.set_title("throughput")
    right.bar(names, [report["runs"][n]["activation_mem_bytes"] / (1 << 20) for n in names], color="tab:orange")
    right.set_ylabel("MiB")
    right.set_title("activation memory (largest module / rank)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file")
        parser.add_argument("--nproc", type=int, required=True, help="processes for DDP and the pipeline (K = N)")
        parser.add_argument("--steps", type=int, default=60, help="training steps per run")
        parser.add_argument("--window", type=int, default=10, help="steps per timed window")
        parser.add_argument("--out", default="runs/bench", help="output folder")
        parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE")
        args = parser.parse_args(argv)
        if args.window < 1:
            raise BadInput(f"--window = {args.window} must be >= 1")
        run_bench(args.config, args.set, args.nproc, args.steps, args.window, Path(args.out))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
