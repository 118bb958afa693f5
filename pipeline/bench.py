"""python -m pipeline.bench --config FILE --nproc N [--steps S] [--window W] [--rounds R] [--out DIR]

Runs on this machine and the same data: E2E in one process (all cores), DDP over N processes,
sequential local learning (one process, K = N) and the pipeline over N processes (K = N). The
local runs share one set of cuts (balanced-time unless the config gives an explicit list or
balanced-memory). The runs alternate: each of --rounds rounds runs every mode once, in that
order, so that whatever else the machine does hits every mode alike. A run's throughput is the
median of its timed windows of --window steps after the first (warm-up) window; a mode's figure
is the median over rounds, reported with its min and max. The 1-minute load average is recorded
before and during the runs, with a warning when the machine was busy before starting.
Activation memory is what autograd keeps for backward, counted exactly. Writes DIR/bench.json,
DIR/bench.md and, with matplotlib, DIR/bench.png.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and the model code load inside run_bench only, so that --help answers at once.
from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config import Config, load_config
from pipeline.errors import BadInput, StageFailure

if TYPE_CHECKING:
    from pipeline.data.specs import DatasetSpec
    from pipeline.model.cost import NetworkProfile

# Launches one run: (command, log file, list to append 1-minute load samples to) -> exit code.
Launcher = Callable[[list[str], Path, list[float]], int]


@dataclass(frozen=True)
class BenchRun:
    name: str
    mode: str
    processes: int
    modules: int


def plan_runs(nproc: int) -> list[BenchRun]:
    """E2E, DDP (K = 1 x R = N), sequential and pipeline (K = N x R = 1), then every other K x R = N."""
    mixed = [BenchRun(f"pipeline_k{k}xr{nproc // k}", "pipeline", nproc, k)
             for k in range(2, nproc) if nproc % k == 0]
    return [
        BenchRun("e2e", "sequential", 1, 1),
        BenchRun("ddp", "ddp", nproc, 1),
        BenchRun("sequential", "sequential", 1, nproc),
        BenchRun("pipeline", "pipeline", nproc, nproc),
        *mixed,
    ]


def layouts(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every K x R = N layout that ran, side by side (DDP is K = 1, the pipeline row K = N)."""
    rows = []
    for name, run in runs.items():
        if run["processes"] < 2:
            continue
        modules = run["modules"]
        bound = run.get("bottleneck_samples_per_s")
        rows.append({
            "run": name, "K": modules, "R": run["processes"] // modules, "samples_per_s": run["samples_per_s"],
            "efficiency": round(run["samples_per_s"] / bound, 3) if bound else None,
            "peak_mem_bytes_per_process": run["peak_mem_bytes"],
        })
    return sorted(rows, key=lambda row: -row["K"])


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
        # Each stage's step: its compute seconds per batch (a window's median), what the profile predicts.
        result["stage_s"] = [round(statistics.median(lines[module]["window_compute_s"] / window
                                                     for lines in timed.values() if module in lines), 4)
                             for module in range(run.modules)]
        # Bottleneck bound per window: the slowest stage's compute seconds for those batches.
        bounds = [batch * window / max(line["window_compute_s"] for line in lines.values())
                  for lines in timed.values() if len(lines) == run.modules]
        result["bottleneck_samples_per_s"] = round(statistics.median(bounds), 2)
    return result


def schedule(nproc: int, rounds: int) -> list[tuple[int, BenchRun]]:
    """(round, run) in the order they run: round 1 runs every mode, then round 2, ... (ABAB)."""
    return [(number, run) for number in range(1, rounds + 1) for run in plan_runs(nproc)]


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures over its rounds: median samples/s with min and max.

    The per-process figures (memory, busy fractions, waits) are those of the round nearest the
    median, so they describe a real run rather than a mix of several.
    """
    rates = [result["samples_per_s"] for result in rounds]
    median = statistics.median(rates)
    typical = min(rounds, key=lambda result: abs(result["samples_per_s"] - median))
    combined = {
        **typical,
        "samples_per_s": round(median, 2),
        "samples_per_s_min": min(rates),
        "samples_per_s_max": max(rates),
        "samples_per_s_rounds": rates,
        "rounds": len(rounds),
        "peak_mem_bytes": max(result["peak_mem_bytes"] for result in rounds),
    }
    if "bottleneck_samples_per_s" in typical:
        bounds = [result["bottleneck_samples_per_s"] for result in rounds]
        combined["bottleneck_samples_per_s"] = round(statistics.median(bounds), 2)
        combined["efficiency_rounds"] = [round(rate / bound, 3) for rate, bound in zip(rates, bounds)]
    return combined


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


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


def machine(device: str) -> str:
    cores = f"{os.cpu_count()} CPU cores"
    if device != "cuda":
        return cores
    import torch

    return f"{cores}, {torch.cuda.get_device_name(0)}"


def run_bench(config_path: str | None, sets: list[str], nproc: int, steps: int, window: int, out_dir: Path,
              rounds: int = 3, launcher: Launcher = launch) -> dict[str, Any]:
    if nproc < 2:
        raise BadInput(f"--nproc = {nproc}: the benchmark compares N processes; use --nproc 2 or more")
    if steps < 2 * window:
        raise BadInput(f"--steps = {steps} must be at least two windows (2 x --window = {2 * window})")
    if rounds < 1:
        raise BadInput(f"--rounds = {rounds} must be >= 1 (3 or more to see the spread)")
    import torch

    from pipeline.data.specs import dataset_spec
    from pipeline.distributed import keep_freed_host_memory
    from pipeline.model.cost import context_plan, predicted_stage_seconds
    from pipeline.model.partition import flat_to_cut
    from pipeline.model.profile import module_activation_bytes

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    warning = busy_warning(load_before[0], cores)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    keep_freed_host_memory()  # as in the runs, so the profiled block times match theirs
    base = load_config(config_path, [*sets, "local.modules=1", "local.partition=equal", "local.context=R0"])
    chosen = load_config(config_path, sets).local.partition
    if isinstance(chosen, list) and len(chosen) + 1 != nproc:
        raise BadInput(f"--nproc = {nproc} but the config's local.partition cuts the network into "
                       f"{len(chosen) + 1} modules; use --nproc {len(chosen) + 1}")
    local = load_config(config_path, [*sets, f"local.modules={nproc}", *_partition(chosen)])
    spec = dataset_spec(local)
    profile = _profile(local, spec, nproc)
    cuts = _cuts(local, spec, profile)
    # The cuts of every K the layouts use: K = N's for the sequential and pipeline rows.
    flat_cuts, plans = {nproc: cuts}, {nproc: context_plan(local)}
    for run in plan_runs(nproc):
        if run.modules not in flat_cuts and run.modules > 1:
            fewer = load_config(config_path, [*sets, f"local.modules={run.modules}", "local.partition=balanced-time"])
            flat_cuts[run.modules], plans[run.modules] = _cuts(fewer, spec, profile), context_plan(fewer)
    explicit = {k: json.dumps([flat_to_cut(cut, local.arch.blocks) for cut in flat])
                for k, flat in flat_cuts.items()}
    batch = base.data.batch_size
    e2e_activation = module_activation_bytes(base, spec, [], batch)[0]
    ddp_activation = module_activation_bytes(base, spec, [], -(-batch // nproc))[0]
    local_activation = module_activation_bytes(local, spec, cuts, batch)

    def command_of(run: BenchRun, out: Path) -> list[str]:
        run_sets = [
            *sets, f"run.mode={run.mode}", f"run.out_dir={out}", f"train.max_steps={steps}", f"run.log_every={window}",
            "run.resume=\"\"", f"local.modules={run.modules}", "train.epochs=1000000",
            "run.overwrite=true",  # the bench owns its round folders: a second bench replaces them
        ]
        run_sets += (["local.context=R0", "local.partition=equal"] if run.modules == 1
                     else [f"local.partition={explicit[run.modules]}"])
        if run.processes > 1:
            run_sets.append(f"pipeline.threads_per_stage={max(1, cores // run.processes)}")
        return command_for(run, config_path, run_sets)

    results, load_during = run_rounds(schedule(nproc, rounds), out_dir, command_of, window, batch, launcher)
    results["e2e"]["activation_mem_bytes"] = e2e_activation
    results["ddp"]["activation_mem_bytes"] = ddp_activation
    for name in ("sequential", "pipeline"):
        results[name]["activation_mem_bytes"] = max(local_activation)
        results[name]["module_activation_mem_bytes"] = local_activation
    for run in plan_runs(nproc):
        if run.mode == "pipeline":
            replica_batch = -(-batch // (run.processes // run.modules))
            results[run.name]["predicted_stage_s"] = [
                round(s, 4) for s in predicted_stage_seconds(profile, plans[run.modules], flat_cuts[run.modules],
                                                             replica_batch)]
    for run in plan_runs(nproc)[4:]:  # the mixed K x R layouts: each replica holds 1/R of the batch
        config_k = load_config(config_path, [*sets, f"local.modules={run.modules}", "local.partition=equal"])
        per_module = module_activation_bytes(config_k, spec, flat_cuts[run.modules],
                                             -(-batch // (run.processes // run.modules)))
        results[run.name]["activation_mem_bytes"] = max(per_module)
        results[run.name]["module_activation_mem_bytes"] = per_module
    pipe, ddp = results["pipeline"], results["ddp"]
    device = "cuda" if torch.cuda.is_available() and base.run.device != "cpu" else "cpu"
    report = {
        "config": config_path,
        "overrides": sets,
        "nproc": nproc,
        "steps": steps,
        "window": window,
        "rounds": rounds,
        "batch_size": batch,
        "arch": base.model.arch,
        "dataset": base.data.name,
        "device": device,
        "cpu_count": cores,
        "machine": machine(device),
        "load_average": {"before": [round(value, 2) for value in load_before],
                         "during": spread(load_during) if load_during else None},
        "busy_warning": warning,
        "runs": results,
        "layouts": layouts(results),
        "pipeline_over_ddp": round(pipe["samples_per_s"] / ddp["samples_per_s"], 3),
        "pipeline_over_e2e": round(pipe["samples_per_s"] / results["e2e"]["samples_per_s"], 3),
        "pipeline_efficiency": round(pipe["samples_per_s"] / pipe["bottleneck_samples_per_s"], 3),
        "largest_stage_activation_over_e2e": round(max(local_activation) / e2e_activation, 3),
        "partition": local.local.partition,
        "memory_cap": local.local.memory_cap if local.local.partition == "balanced" else None,
        # Per-round ratios: the runs of one round ran minutes apart, so they share the machine's state.
        "rounds_spread": {
            "pipeline_over_ddp": spread([p / d for p, d in zip(pipe["samples_per_s_rounds"],
                                                               ddp["samples_per_s_rounds"])]),
            "pipeline_efficiency": spread(pipe["efficiency_rounds"]),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out_dir / "bench.md").write_text(table)
    print(table, flush=True)
    plot(report, out_dir / "bench.png")
    return report


def _partition(chosen: str | list[list[int]]) -> list[str]:
    """The cuts the local runs use: the config's explicit list, balanced-memory or balanced, else balanced-time."""
    keep = isinstance(chosen, list) or chosen in ("balanced-memory", "balanced")
    return [] if keep else ["local.partition=balanced-time"]


def _profile(config: Config, spec: DatasetSpec, nproc: int) -> NetworkProfile:
    """Profile as a stage will run: with its share of the cores."""
    import torch

    from pipeline.model.profile import profile_network

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        device = torch.device("cuda" if torch.cuda.is_available() and config.run.device != "cpu" else "cpu")
        return profile_network(config, spec, device)
    finally:
        torch.set_num_threads(before)


def _cuts(config: Config, spec: DatasetSpec, profile: NetworkProfile) -> list[int]:
    """An explicit list as given; balanced ones from the bench's one profile."""
    import torch

    from pipeline.model.cost import partition_cuts
    from pipeline.model.network import resolve_cuts

    if isinstance(config.local.partition, list) or config.local.partition == "equal":
        return resolve_cuts(config, spec, torch.device("cpu"))
    return partition_cuts(config, profile)


def title(report: dict[str, Any]) -> str:
    return (f"{report['arch']} on {report['dataset']}, batch {report['batch_size']}, {report['nproc']} processes, "
            f"{report['steps']} steps x {report['rounds']} rounds ({report['machine']})")


def ratio_line(report: dict[str, Any], key: str) -> str:
    spread_of = report["rounds_spread"][key]
    return f"{report[key]:.3f} (rounds: {spread_of['min']:.3f} - {spread_of['max']:.3f})"


def markdown(report: dict[str, Any]) -> str:
    mib = 1 << 20
    pipe = report["runs"]["pipeline"]
    load = report["load_average"]
    during = load["during"]
    lines = [
        f"{title(report)}; windows of {report['window']} steps, device {report['device']}",
        "",
        f"1-minute load average before: {load['before'][0]:.2f}"
        + (f"; during the runs: median {during['median']:.2f}, max {during['max']:.2f}" if during else ""),
        "",
    ]
    if report["busy_warning"]:
        lines += [f"**{report['busy_warning']}**", ""]
    lines += [
        ("| run | processes | modules | samples/s (median) | min - max over rounds | peak mem / process (MiB) "
         "| activation mem (MiB) | busy fraction |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["runs"].items():
        busy = " / ".join(f"{b:.2f}" for b in run["busy_fraction"])
        lines.append(
            f"| {name} | {run['processes']} | {run['modules']} | {run['samples_per_s']:.1f} | "
            f"{run['samples_per_s_min']:.1f} - {run['samples_per_s_max']:.1f} | "
            f"{run['peak_mem_bytes'] / mib:.0f} | {run['activation_mem_bytes'] / mib:.0f} | {busy} |"
        )
    lines += ["", "K x R layouts of the same processes (DDP is K = 1, efficiency against the slowest stage):", "",
              "| layout | K | R | samples/s | efficiency | peak mem / process (MiB) |", "|---|---|---|---|---|---|"]
    for row in report["layouts"]:
        efficiency = "-" if row["efficiency"] is None else f"{row['efficiency']:.3f}"
        lines.append(f"| {row['run']} | {row['K']} | {row['R']} | {row['samples_per_s']:.1f} | {efficiency} | "
                     f"{row['peak_mem_bytes_per_process'] / mib:.0f} |")
    lines += [
        "",
        f"- pipeline / DDP samples/s: {ratio_line(report, 'pipeline_over_ddp')}",
        f"- pipeline / E2E samples/s: {report['pipeline_over_e2e']:.3f}",
        f"- pipeline efficiency (measured / slowest-stage bound): {ratio_line(report, 'pipeline_efficiency')}",
        f"- largest module's activation memory / E2E's: {report['largest_stage_activation_over_e2e']:.3f}"
        f" (cuts: {report['partition']}" + (f", memory cap {report['memory_cap']}" if report["memory_cap"] else "")
        + ")",
        "- pipeline stage step seconds, measured / predicted by the profile: "
        + ", ".join(f"{measured:.3f} / {predicted:.3f}"
                    for measured, predicted in zip(pipe["stage_s"], pipe["predicted_stage_s"])),
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no bench.png (pip install -e '.[plot]')", flush=True)
        return
    runs = report["runs"]
    names = list(runs)
    rates = [runs[n]["samples_per_s"] for n in names]
    below = [runs[n]["samples_per_s"] - runs[n]["samples_per_s_min"] for n in names]
    above = [runs[n]["samples_per_s_max"] - runs[n]["samples_per_s"] for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    left.bar(names, rates, yerr=[below, above], capsize=4, color="tab:blue")
    for index, name in enumerate(names):  # above the error bar, which would cross a label on the bar
        run = runs[name]
        left.annotate(f"{run['samples_per_s']:.0f}\n({run['samples_per_s_min']:.0f}-{run['samples_per_s_max']:.0f})",
                      (index, run["samples_per_s_max"]), xytext=(0, 3), textcoords="offset points",
                      ha="center", va="bottom", fontsize=8)
    left.margins(y=0.2)
    left.set_ylabel("samples / s")
    left.set_title(f"throughput: median, min-max over {report['rounds']} rounds")
    bars = right.bar(names, [runs[n]["activation_mem_bytes"] / (1 << 20) for n in names], color="tab:orange")
    right.bar_label(bars, fmt="%.0f")
    right.set_ylabel("MiB")
    right.set_title("activation memory (largest module / rank)")
    figure.suptitle(
        f"{title(report)}\npipeline / DDP {ratio_line(report, 'pipeline_over_ddp')}, "
        f"pipeline efficiency {ratio_line(report, 'pipeline_efficiency')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--nproc", type=int, required=True, help="processes for DDP and the pipeline (K = N)")
        parser.add_argument("--steps", type=int, default=60, help="training steps per run")
        parser.add_argument("--window", type=int, default=10, help="steps per timed window")
        parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once")
        parser.add_argument("--out", default="runs/bench", help="output folder")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        if args.window < 1:
            raise BadInput(f"--window = {args.window} must be >= 1")
        run_bench(args.config, args.set, args.nproc, args.steps, args.window, Path(args.out), args.rounds)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
