"""python -m pipeline.bench --config FILE --nproc N [--steps S] [--window W] [--rounds R] [--out DIR]
                          [--classic-microbatches 2,4,8] [--checkpoint-segments 3,4]
   python -m pipeline.bench --config FILE --memory-only [--batch B] [--out DIR]

Runs on this machine and the same data: E2E in one process (all cores), DDP over N processes,
sequential local learning (one process, K = N), the pipeline over N processes (K = N), DDP with
activation checkpointing (pipeline/model/recompute.py; one row per --checkpoint-segments count,
by default the counts whose activation memory per process brackets the pipeline's largest
stage's) and the classic pipeline (the E2E network at the pipeline's cuts under torch.distributed.pipelining's
GPipe and 1F1B, one row per --classic-microbatches count; pipeline/tools/classic_pp.py). The
local runs share one set of cuts (balanced-time unless the config gives an explicit list or
balanced-memory). The runs alternate: each of --rounds rounds runs every mode once, in that
order, so that whatever else the machine does hits every mode alike. A run's throughput is the
median of its timed windows of --window steps after the first (warm-up) window; a mode's figure
is the median over rounds, reported with its min and max. The 1-minute load average is recorded
before and during the runs, with a warning when the machine was busy before starting.
Activation memory is what autograd keeps for backward, counted exactly (with checkpointing, or
what is alive while a segment is recomputed, whichever is more); bytes on the wire per
step are computed from the layout (pipeline/performance/traffic.py). Writes DIR/bench.json,
DIR/bench.md and, with matplotlib, DIR/bench.png.

--memory-only runs nothing timed: it counts the activation memory of E2E and of each module at
the config's cuts, at B samples per device (default data.batch_size), in one process — what a
network too large to time on this machine (DeepLab-V3 at 512 x 1024) is compared by.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch and the model code load inside run_bench only, so that --help answers at once.
from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config.loading import load_config
from pipeline.config.schema import Config, Cut
from pipeline.errors import BadInput, StageFailure
from pipeline.tools.plot import optional_pyplot

if TYPE_CHECKING:
    from pipeline.data.specs import DatasetSpec
    from pipeline.performance.cost import NetworkProfile

# Launches one run: (command, log file, list to append 1-minute load samples to) -> exit code.
Launcher = Callable[[list[str], Path, list[float]], int]


@dataclass(frozen=True)
class BenchRun:
    name: str
    mode: str
    processes: int
    modules: int
    schedule: str = ""  # classic_pp rows: the torch.distributed.pipelining schedule (gpipe, 1f1b)
    microbatches: int = 0  # classic_pp rows: microbatches per batch
    segments: int = 0  # ddp_checkpointed rows: precision.checkpoint_segments


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


CLASSIC_MICROBATCHES = (2, 4, 8)


def checkpointed_runs(nproc: int, segments: Sequence[int]) -> list[BenchRun]:
    """DDP over the same N processes with the E2E network's blocks recomputed over S segments, each S."""
    return [BenchRun(f"ddp_checkpointed_s{count}", "ddp", nproc, 1, segments=count) for count in segments]


def bracketing_segments(memory: dict[int, int], target: int) -> list[int]:
    """The segment counts whose activation memory brackets ``target``: the fewest segments that fit under it
    and the count below, which does not; with none fitting, the count that takes the least."""
    fitting = [count for count in sorted(memory) if memory[count] <= target]
    if not fitting:
        return [min(memory, key=lambda count: memory[count])]
    first = fitting[0]
    return [first - 1, first] if first - 1 in memory else [first]


def classic_runs(nproc: int, microbatches: Sequence[int]) -> list[BenchRun]:
    """The same network end to end under torch.distributed.pipelining: GPipe and 1F1B, each M."""
    return [BenchRun(f"classic_{kind}_m{count}", "classic_pp", nproc, nproc, kind, count)
            for kind in ("gpipe", "1f1b") for count in microbatches]


def layouts(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every K x R = N layout that ran, side by side (DDP is K = 1, the pipeline row K = N)."""
    rows = []
    for name, run in runs.items():
        if run["processes"] < 2 or run.get("mode") == "classic_pp" or run.get("checkpoint_segments"):
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


def classic_command(run: BenchRun, config_path: str | None, sets: list[str]) -> list[str]:
    args = ["-m", "pipeline.classic_pp"] + (["--config", config_path] if config_path else [])
    args += ["--schedule", run.schedule, "--microbatches", str(run.microbatches)]
    for item in sets:
        args += ["--set", item]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.processes}", *args]


def windows(metrics: Path, module: int, window: int) -> dict[int, dict[int, dict[str, Any]]]:
    """Timed windows: last step -> module -> its figures over the window (whole windows after the first).

    A module's train lines come every --window steps and, between them, on a time interval and at
    epoch ends; each line's rate and window_compute_s cover the steps since the module's previous
    line. A window's figures are its lines together: compute seconds summed, and samples/s over the
    window's time (each line's time is its steps over its rate).
    """
    parts: dict[int, dict[int, list[tuple[int, dict[str, Any]]]]] = {}  # last step -> module -> (steps, line)
    previous: dict[int, int] = {}
    for line in metrics.read_text().splitlines():
        item = json.loads(line)
        if item.get("event") != "train":
            continue
        owner, step = item["module"], item["step"]
        steps, previous[owner] = step - previous.get(owner, 0), step
        parts.setdefault(-(-step // window) * window, {}).setdefault(owner, []).append((steps, item))
    found: dict[int, dict[int, dict[str, Any]]] = {}
    for end, owners in parts.items():
        for owner, lines in owners.items():
            if sum(steps for steps, _ in lines) != window or lines[-1][1]["step"] != end:
                continue  # a partial window: the run stopped inside it
            seconds = sum(steps / max(line["samples_per_s"], 1e-9) for steps, line in lines)  # over one batch's samples
            summed = {"samples_per_s": round(window / seconds, 2)}
            if all("window_compute_s" in line for _, line in lines):
                summed["window_compute_s"] = sum(line["window_compute_s"] for _, line in lines)
            found.setdefault(end, {})[owner] = summed
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
        "peak_mem_bytes_per_process": [stage["peak_mem_bytes"] for stage in summary["stages"]],
        # classic_pp cannot split its schedule's step into compute and waits: it reports none
        "busy_fraction": [stage["busy_fraction"] for stage in summary["stages"] if "busy_fraction" in stage],
        "recv_wait_s": [stage["recv_wait_s"] for stage in summary["stages"] if "recv_wait_s" in stage],
        "send_wait_s": [stage["send_wait_s"] for stage in summary["stages"] if "send_wait_s" in stage],
        "cut_points": summary["cut_points"],
        "test_accuracy": summary["test_accuracy"],
    }
    if run.mode == "classic_pp":
        result["schedule"], result["microbatches"] = run.schedule, run.microbatches
    if run.segments:
        result["checkpoint_segments"] = run.segments
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


def schedule(nproc: int, rounds: int, microbatches: Sequence[int] = (),
             segments: Sequence[int] = ()) -> list[tuple[int, BenchRun]]:
    """(round, run) in the order they run: round 1 runs every mode, then round 2, ... (ABAB)."""
    runs = plan_runs(nproc) + checkpointed_runs(nproc, segments) + classic_runs(nproc, microbatches)
    return [(number, run) for number in range(1, rounds + 1) for run in runs]


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
              rounds: int = 3, launcher: Launcher = launch,
              classic_microbatches: Sequence[int] = CLASSIC_MICROBATCHES,
              checkpoint_segments: Sequence[int] | None = None) -> dict[str, Any]:
    if nproc < 2:
        raise BadInput(f"--nproc = {nproc}: the benchmark compares N processes; use --nproc 2 or more")
    if steps < 2 * window:
        raise BadInput(f"--steps = {steps} must be at least two windows (2 x --window = {2 * window})")
    if rounds < 1:
        raise BadInput(f"--rounds = {rounds} must be >= 1 (3 or more to see the spread)")
    from pipeline.config.cuts import written_cuts
    from pipeline.data.specs import dataset_spec
    from pipeline.performance.cost import context_plan, predicted_stage_seconds
    from pipeline.performance.profile import checkpointed_activation_bytes, module_activation_bytes
    from pipeline.runtime.host import keep_freed_host_memory, profiling_device

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
    spec.refuse_segmentation("the timed benchmark compares", "count its activation memory with --memory-only")
    for count in classic_microbatches:
        if count < 1 or base.data.batch_size % count:
            raise BadInput(f"--classic-microbatches: {count} does not divide data.batch_size = "
                           f"{base.data.batch_size}; give counts that do (e.g. 2,4,8)")
    units = base.arch.units
    for count in checkpoint_segments or ():
        if not 2 <= count <= units:
            raise BadInput(f"--checkpoint-segments: {count} segments of {base.model.arch}'s {units} blocks; give "
                           f"counts between 2 and {units}")
    profile = _profile(local, spec, nproc)
    cuts = _cuts(local, spec, profile)
    # The cuts of every K the layouts use: K = N's for the sequential and pipeline rows.
    flat_cuts, plans = {nproc: cuts}, {nproc: context_plan(local)}
    for run in plan_runs(nproc):
        if run.modules not in flat_cuts and run.modules > 1:
            fewer = load_config(config_path, [*sets, f"local.modules={run.modules}", "local.partition=balanced-time"])
            flat_cuts[run.modules], plans[run.modules] = _cuts(fewer, spec, profile), context_plan(fewer)
    explicit = {k: json.dumps(written_cuts(flat, local.arch)) for k, flat in flat_cuts.items()}
    batch = base.data.batch_size
    e2e_activation = module_activation_bytes(base, spec, [], batch)[0]
    ddp_activation = module_activation_bytes(base, spec, [], -(-batch // nproc))[0]
    local_activation = module_activation_bytes(local, spec, cuts, batch)
    # Checkpointed DDP holds a process's share of the batch, as DDP does; by default the counts that
    # bracket the pipeline's largest stage, the memory it is compared at.
    candidates = (range(2, units + 1) if checkpoint_segments is None else checkpoint_segments)
    checkpointed = {count: checkpointed_activation_bytes(base, spec, -(-batch // nproc), count)
                    for count in candidates}
    segments = (bracketing_segments(checkpointed, max(local_activation)) if checkpoint_segments is None
                else list(checkpoint_segments))

    def command_of(run: BenchRun, out: Path) -> list[str]:
        # classic_pp reads the pipeline's settings (threads per stage, timeout) as a pipeline run would
        mode = "pipeline" if run.mode == "classic_pp" else run.mode
        run_sets = [
            *sets, f"run.mode={mode}", f"run.out_dir={out}", f"train.max_steps={steps}", f"run.log_every={window}",
            "run.resume=\"\"", f"local.modules={run.modules}", "train.epochs=1000000",
            "run.overwrite=true",  # the bench owns its round folders: a second bench replaces them
        ]
        run_sets += (["local.context=R0", "local.partition=equal"] if run.modules == 1
                     else [f"local.partition={explicit[run.modules]}"])
        if run.processes > 1:
            run_sets.append(f"pipeline.threads_per_stage={max(1, cores // run.processes)}")
        if run.segments:
            run_sets.append(f"precision.checkpoint_segments={run.segments}")
        if run.mode == "classic_pp":
            return classic_command(run, config_path, run_sets)
        return command_for(run, config_path, run_sets)

    results, load_during = run_rounds(schedule(nproc, rounds, classic_microbatches, segments), out_dir, command_of,
                                      window, batch, launcher)
    results["e2e"]["activation_mem_bytes"] = e2e_activation
    results["ddp"]["activation_mem_bytes"] = ddp_activation
    for run in checkpointed_runs(nproc, segments):
        results[run.name]["activation_mem_bytes"] = checkpointed[run.segments]
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
    classic = classic_rows(config_path, sets, spec, cuts, batch, results, classic_runs(nproc, classic_microbatches))
    traffic = wire_bytes_per_step(config_path, sets, spec, flat_cuts, batch, nproc, results)
    idle = idle_fractions(results)
    best_classic = max(classic, key=lambda name: classic[name]["samples_per_s"], default=None)
    # the fastest checkpointed row that keeps no more activation memory per process than the pipeline's largest stage
    within = [run.name for run in checkpointed_runs(nproc, segments)
              if checkpointed[run.segments] <= max(local_activation)]
    best_checkpointed = max(within, key=lambda name: results[name]["samples_per_s"], default=None)
    pipe, ddp = results["pipeline"], results["ddp"]
    device = profiling_device(base.run.device).type
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
        "classic_pp": classic,
        "best_classic_pp": best_classic,
        "pipeline_over_classic_pp": (round(pipe["samples_per_s"] / classic[best_classic]["samples_per_s"], 3)
                                     if best_classic else None),
        "checkpoint_segments": segments,
        "best_ddp_checkpointed": best_checkpointed,
        "pipeline_over_ddp_checkpointed": (
            round(pipe["samples_per_s"] / results[best_checkpointed]["samples_per_s"], 3) if best_checkpointed
            else None),
        "wire_bytes_per_step": traffic,
        "idle_fraction": idle,
        "partition": local.local.partition,
        "memory_cap": local.local.memory_cap if local.local.partition == "balanced" else None,
        # Per-round ratios: the runs of one round ran minutes apart, so they share the machine's state.
        "rounds_spread": {
            "pipeline_over_ddp": spread([p / d for p, d in zip(pipe["samples_per_s_rounds"],
                                                               ddp["samples_per_s_rounds"])]),
            "pipeline_efficiency": spread(pipe["efficiency_rounds"]),
        },
    }
    write_report(out_dir, "bench", report, markdown, plot)
    return report


def write_report(out_dir: Path, name: str, report: dict[str, Any], table: Callable[[dict[str, Any]], str],
                 picture: Callable[[dict[str, Any], Path], None]) -> None:
    """OUT/NAME.json, OUT/NAME.md (also printed) and OUT/NAME.png of a tool's ``report``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (out_dir / f"{name}.md").write_text(text)
    print(text, flush=True)
    picture(report, out_dir / f"{name}.png")


def memory_report(config_path: str | None, sets: list[str], batch: int | None, out_dir: Path) -> dict[str, Any]:
    """E2E's and each module's activation memory at the config's cuts, at ``batch`` per device."""
    import torch

    from pipeline.config.cuts import cut_notation, written_cuts
    from pipeline.data.specs import dataset_spec
    from pipeline.model.network import resolve_cuts
    from pipeline.performance.profile import module_activation_bytes

    local = load_config(config_path, sets)
    if local.local.modules < 2:
        raise BadInput(f"--memory-only compares local modules with E2E, but local.modules = {local.local.modules}; "
                       "use a config with local.modules >= 2")
    base = load_config(config_path, [*sets, "local.modules=1", "local.partition=equal", "local.context=R0"])
    batch = local.data.batch_size if batch is None else batch
    if batch < 1:
        raise BadInput(f"--batch = {batch} must be >= 1")
    spec = dataset_spec(local)
    cuts = resolve_cuts(local, spec, torch.device("cpu"))
    e2e = module_activation_bytes(base, spec, [], batch)[0]
    modules = module_activation_bytes(local, spec, cuts, batch)
    height, width = spec.image_shape
    report = {
        "config": config_path, "overrides": sets, "memory_only": True, "arch": local.model.arch,
        "dataset": local.data.name, "image": [height, width], "batch_per_device": batch,
        "modules": local.local.modules, "cut_points": written_cuts(cuts, local.arch),
        "e2e_activation_mem_bytes": e2e, "module_activation_mem_bytes": modules,
        "largest_stage_activation_over_e2e": round(max(modules) / e2e, 3),
    }
    mib = 1 << 20
    table = "\n".join([
        f"{local.model.arch} on {local.data.name}, {height} x {width} images, batch {batch} per device: "
        "activation memory (what autograd keeps for backward)",
        "",
        f"| run | cut points ({cut_notation(local.arch)}) | activation mem per module (MiB) | largest / E2E |",
        "|---|---|---|---|",
        f"| e2e | - | {e2e / mib:.0f} | 1.000 |",
        f"| K = {local.local.modules} | {report['cut_points']} | {' / '.join(f'{m / mib:.0f}' for m in modules)} | "
        f"{report['largest_stage_activation_over_e2e']:.3f} |",
        "",
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench.md").write_text(table)
    print(table, flush=True)
    return report


def classic_rows(config_path: str | None, sets: list[str], spec: Any, cuts: list[int], batch: int,
                 results: dict[str, dict[str, Any]], runs: list[BenchRun]) -> dict[str, dict[str, Any]]:
    """The classic pipeline rows: activation memory (into ``results``) and their summary for bench.json."""
    from pipeline.model.network import make_net
    from pipeline.performance.traffic import bubble_fraction, classic_pp_bytes, wire_element_bytes
    from pipeline.tools.classic_pp import e2e_overrides, stage_activation_bytes

    e2e = load_config(config_path, e2e_overrides(sets))
    rows = {}
    for run in runs:
        per_stage = stage_activation_bytes(e2e, spec, cuts, batch, run.schedule, run.microbatches)  # type: ignore[arg-type]
        result = results[run.name]
        result["activation_mem_bytes"] = max(per_stage)
        result["module_activation_mem_bytes"] = per_stage
        rows[run.name] = {
            "schedule": run.schedule, "microbatches": run.microbatches, "samples_per_s": result["samples_per_s"],
            "samples_per_s_min": result["samples_per_s_min"], "samples_per_s_max": result["samples_per_s_max"],
            "peak_mem_bytes_per_process": result["peak_mem_bytes_per_process"],
            "activation_mem_bytes_per_stage": per_stage,
            "wire_bytes_per_step": classic_pp_bytes(make_net(e2e, spec), cuts, batch,
                                                    wire_element_bytes(e2e.pipeline.wire_dtype)),
            "idle_fraction": round(bubble_fraction(run.modules, run.microbatches), 4),
        }
    return rows


def wire_bytes_per_step(config_path: str | None, sets: list[str], spec: Any, flat_cuts: dict[int, list[int]],
                        batch: int, nproc: int, results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Bytes every row's processes send per step (pipeline/performance/traffic.py's model of each mode)."""
    import torch

    from pipeline.model.network import build_module, make_layout, make_net
    from pipeline.performance.traffic import classic_pp_bytes, ddp_bytes, local_pipeline_bytes, wire_element_bytes
    from pipeline.tools.classic_pp import e2e_overrides

    cpu = torch.device("cpu")
    e2e = load_config(config_path, e2e_overrides(sets))
    traffic = {}
    for name, run in results.items():
        modules, processes = run["modules"], run["processes"]
        if run["mode"] == "classic_pp":
            traffic[name] = classic_pp_bytes(make_net(e2e, spec), flat_cuts[modules], batch,
                                             wire_element_bytes(e2e.pipeline.wire_dtype))
        elif processes == 1:
            traffic[name] = 0
        elif modules == 1:
            traffic[name] = ddp_bytes(build_module(e2e, make_layout(e2e, spec, []), 0, cpu), processes)
        else:
            config = load_config(config_path, [*sets, f"local.modules={modules}", "local.partition=equal"])
            layout = make_layout(config, spec, flat_cuts[modules])
            element = wire_element_bytes(config.pipeline.wire_dtype)
            traffic[name] = local_pipeline_bytes(
                layout.plan, [layout.input_shape(k) for k in range(modules)],
                [build_module(config, layout, k, cpu) for k in range(modules)], batch, element, processes // modules)
    return traffic


def idle_fractions(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Measured for the runs that time compute and waits (1 - mean busy fraction; 0 for one process);
    the schedule's bubble, (K - 1) / (M + K - 1), for the classic rows, which cannot time them."""
    from pipeline.performance.traffic import bubble_fraction, measured_idle_fraction

    return {name: (round(bubble_fraction(run["modules"], run["microbatches"]), 4) if run["mode"] == "classic_pp"
                   else measured_idle_fraction(run["busy_fraction"]) if run["processes"] > 1 else 0.0)
            for name, run in results.items()}


def _partition(chosen: str | list[Cut]) -> list[str]:
    """The cuts the local runs use: the config's explicit list, balanced-memory or balanced, else balanced-time."""
    keep = isinstance(chosen, list) or chosen in ("balanced-memory", "balanced")
    return [] if keep else ["local.partition=balanced-time"]


def _profile(config: Config, spec: DatasetSpec, nproc: int) -> NetworkProfile:
    """Profile as a stage will run: with its share of the cores."""
    import torch

    from pipeline.performance.profile import profile_network
    from pipeline.runtime.host import profiling_device

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        return profile_network(config, spec, profiling_device(config.run.device))
    finally:
        torch.set_num_threads(before)


def _cuts(config: Config, spec: DatasetSpec, profile: NetworkProfile) -> list[int]:
    """An explicit list as given; balanced ones from the bench's one profile."""
    import torch

    from pipeline.model.network import resolve_cuts
    from pipeline.performance.cost import partition_cuts

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
        busy = " / ".join(f"{b:.2f}" for b in run["busy_fraction"]) or "-"
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
    lines += traffic_lines(report)
    lines += frontier_lines(report)
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
    ]
    lines.append(checkpointed_line(report))
    if report["best_classic_pp"]:
        lines.append(f"- pipeline / best classic pipeline ({report['best_classic_pp']}) samples/s: "
                     f"{report['pipeline_over_classic_pp']:.3f}")
    return "\n".join([*lines, ""])


def checkpointed_line(report: dict[str, Any]) -> str:
    """The pipeline against DDP with activation checkpointing at equal activation memory per process."""
    best, largest = report["best_ddp_checkpointed"], max(report["runs"]["pipeline"]["module_activation_mem_bytes"])
    if best is None:
        return (f"- pipeline / DDP with activation checkpointing at equal activation memory: none of the "
                f"checkpointed rows (segments {report['checkpoint_segments']}) fits in the pipeline's largest stage "
                f"({largest / (1 << 20):.0f} MiB)")
    return (f"- pipeline / DDP with activation checkpointing at equal activation memory ({best}, no more than the "
            f"pipeline's largest stage, {largest / (1 << 20):.0f} MiB): {report['pipeline_over_ddp_checkpointed']:.3f}")


def frontier(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(run, activation MiB per process, samples/s) of every row, least memory first: the memory-speed frontier."""
    runs = report["runs"]
    return sorted(((name, run["activation_mem_bytes"] / (1 << 20), run["samples_per_s"]) for name, run in runs.items()),
                  key=lambda row: (row[1], -row[2]))


def frontier_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "Samples/s against activation memory per process (the largest stage's for the pipelines), least "
             "memory first:", "", "| run | activation mem / process (MiB) | samples/s |", "|---|---|---|"]
    return lines + [f"| {name} | {memory:.0f} | {rate:.1f} |" for name, memory, rate in frontier(report)]


def traffic_lines(report: dict[str, Any]) -> list[str]:
    """Bytes on the wire per step and idle share of every row; the classic rows' idle is their bubble."""
    lines = ["", "Wire traffic (all processes, per step of one batch) and idle share of a process's time "
             "(measured: 1 - mean busy fraction; classic rows: the schedule's bubble (K-1)/(M+K-1)):", "",
             "| run | wire MiB / step | idle fraction |", "|---|---|---|"]
    for name in report["runs"]:
        model = " (bubble)" if name in report["classic_pp"] else ""
        lines.append(f"| {name} | {report['wire_bytes_per_step'][name] / (1 << 20):.2f} | "
                     f"{report['idle_fraction'][name]:.3f}{model} |")
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    plt = optional_pyplot("bench", "bench.png")
    if plt is None:
        return
    runs = report["runs"]
    names = list(runs)
    rates = [runs[n]["samples_per_s"] for n in names]
    below = [runs[n]["samples_per_s"] - runs[n]["samples_per_s_min"] for n in names]
    above = [runs[n]["samples_per_s_max"] - runs[n]["samples_per_s"] for n in names]
    figure, (left, right, memory_speed) = plt.subplots(1, 3, figsize=(16, 4.8))
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
    for name, mib, rate in frontier(report):
        memory_speed.scatter(mib, rate, color="tab:green")
        memory_speed.annotate(name, (mib, rate), xytext=(3, 3), textcoords="offset points", fontsize=7)
    memory_speed.set_xlabel("activation memory per process (MiB)")
    memory_speed.set_ylabel("samples / s")
    memory_speed.set_title("speed against memory: every row")
    classic = (f", pipeline / best classic PP {report['pipeline_over_classic_pp']:.3f}"
               if report["best_classic_pp"] else "")
    if report["best_ddp_checkpointed"]:
        classic += (f", pipeline / {report['best_ddp_checkpointed']} at equal memory "
                    f"{report['pipeline_over_ddp_checkpointed']:.3f}")
    figure.suptitle(
        f"{title(report)}\npipeline / DDP {ratio_line(report, 'pipeline_over_ddp')}, "
        f"pipeline efficiency {ratio_line(report, 'pipeline_efficiency')}{classic}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def whole_numbers(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise BadInput(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 2,4,8") from None


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--nproc", type=int, help="processes for DDP and the pipeline (K = N); required unless "
                                                      "--memory-only")
        parser.add_argument("--memory-only", action="store_true",
                            help="count activation memory only (E2E and each module at the config's cuts), no runs")
        parser.add_argument("--batch", type=int, help="--memory-only: samples per device (default data.batch_size)")
        parser.add_argument("--steps", type=int, default=60, help="training steps per run")
        parser.add_argument("--window", type=int, default=10, help="steps per timed window")
        parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once")
        parser.add_argument("--out", default="runs/bench", help="output folder")
        parser.add_argument("--checkpoint-segments",
                            help="segment counts of the DDP rows with activation checkpointing, comma-separated; "
                                 "default: the counts that bracket the pipeline's largest stage's activation memory")
        parser.add_argument("--classic-microbatches", default=",".join(map(str, CLASSIC_MICROBATCHES)),
                            help="microbatch counts of the classic pipeline rows (GPipe and 1F1B each), "
                                 "comma-separated; empty for none")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        if args.memory_only:
            memory_report(args.config, args.set, args.batch, Path(args.out))
            return
        if args.nproc is None:
            raise BadInput("--nproc is required: the processes for DDP and the pipeline (or --memory-only)")
        if args.window < 1:
            raise BadInput(f"--window = {args.window} must be >= 1")
        run_bench(args.config, args.set, args.nproc, args.steps, args.window, Path(args.out), args.rounds,
                  classic_microbatches=whole_numbers("--classic-microbatches", args.classic_microbatches),
                  checkpoint_segments=(None if args.checkpoint_segments is None
                                       else whole_numbers("--checkpoint-segments", args.checkpoint_segments)))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
