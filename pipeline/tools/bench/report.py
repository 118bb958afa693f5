"""The report: bench.json (every run's figures and the model's beside them, the ratios that compare the modes)
and bench.md, its tables, also printed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tools.bench.launch import Load
from pipeline.tools.bench.results import spread
from pipeline.tools.bench.runs import BenchRun, checkpointed_runs

if TYPE_CHECKING:  # the estimates load torch; the report needs only their figures
    from pipeline.tools.bench.estimates import Estimates


def bench_json(model: Estimates, load: Load, runs: list[BenchRun], results: dict[str, Any],
               traffic: dict[str, int], idle: dict[str, float]) -> dict[str, Any]:
    """bench.json of the timed benchmark: what was asked, the machine, the figures of each of ``runs``
    (``results``, the model's activation memory and predictions added), bytes on the wire and idle share per
    run (``traffic``, ``idle``), and the ratios between the runs."""
    request, local = model.request, model.local.local
    pipe, ddp = results["pipeline"], results["ddp"]
    classic = classic_rows(results, traffic, idle, [run for run in runs if run.mode == "classic_pp"])
    best_classic = max(classic, key=lambda name: classic[name]["samples_per_s"], default=None)
    best_checkpointed = best_ddp_checkpointed(model, results)
    return {
        "config": request.config_path,
        "overrides": request.sets,
        "nproc": request.nproc,
        "steps": request.steps,
        "window": request.window,
        "rounds": request.rounds,
        "batch_size": model.batch,
        "arch": model.base.model.arch,
        "dataset": model.base.data.name,
        "device": model.device.type,
        "cpu_count": load.cores,
        "machine": model.machine,
        "load_average": {"before": [round(value, 2) for value in load.before],
                         "during": spread(load.during) if load.during else None},
        "busy_warning": load.warning,
        "runs": results,
        "layouts": layouts(results),
        "pipeline_over_ddp": round(pipe["samples_per_s"] / ddp["samples_per_s"], 3),
        "pipeline_over_e2e": round(pipe["samples_per_s"] / results["e2e"]["samples_per_s"], 3),
        "pipeline_efficiency": round(pipe["samples_per_s"] / pipe["bottleneck_samples_per_s"], 3),
        "largest_stage_activation_over_e2e": round(max(model.local_activation) / model.e2e_activation, 3),
        "classic_pp": classic,
        "best_classic_pp": best_classic,
        "pipeline_over_classic_pp": (round(pipe["samples_per_s"] / classic[best_classic]["samples_per_s"], 3)
                                     if best_classic else None),
        "checkpoint_segments": model.segments,
        "best_ddp_checkpointed": best_checkpointed,
        "pipeline_over_ddp_checkpointed": (
            round(pipe["samples_per_s"] / results[best_checkpointed]["samples_per_s"], 3) if best_checkpointed
            else None),
        "wire_bytes_per_step": traffic,
        "idle_fraction": idle,
        "partition": local.partition,
        "memory_cap": local.memory_cap if local.partition == "balanced" else None,
        # Per-round ratios: the runs of one round ran minutes apart, so they share the machine's state.
        "rounds_spread": {
            "pipeline_over_ddp": spread([p / d for p, d in zip(pipe["samples_per_s_rounds"],
                                                               ddp["samples_per_s_rounds"])]),
            "pipeline_efficiency": spread(pipe["efficiency_rounds"]),
        },
    }


def classic_rows(results: dict[str, dict[str, Any]], traffic: dict[str, int], idle: dict[str, float],
                 runs: list[BenchRun]) -> dict[str, dict[str, Any]]:
    """The classic pipeline rows as bench.json sums them up beside the others."""
    rows = {}
    for run in runs:
        measured = results[run.name]
        rows[run.name] = {
            "schedule": run.schedule, "microbatches": run.microbatches, "samples_per_s": measured["samples_per_s"],
            "samples_per_s_min": measured["samples_per_s_min"], "samples_per_s_max": measured["samples_per_s_max"],
            "peak_mem_bytes_per_process": measured["peak_mem_bytes_per_process"],
            "activation_mem_bytes_per_stage": measured["module_activation_mem_bytes"],
            "wire_bytes_per_step": traffic[run.name], "idle_fraction": idle[run.name],
        }
    return rows


def best_ddp_checkpointed(model: Estimates, results: dict[str, dict[str, Any]]) -> str | None:
    """The fastest checkpointed DDP row that keeps no more activation memory per process than the pipeline's
    largest stage."""
    within = [run.name for run in checkpointed_runs(model.request.nproc, model.segments)
              if model.checkpointed[run.segments] <= max(model.local_activation)]
    return max(within, key=lambda name: results[name]["samples_per_s"], default=None)


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


def write_report(out_dir: Path, name: str, report: dict[str, Any], table: Callable[[dict[str, Any]], str],
                 picture: Callable[[dict[str, Any], Path], None] | None = None) -> None:
    """OUT/NAME.json, OUT/NAME.md (also printed) and, where the tool draws one, OUT/NAME.png of its ``report``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = table(report)
    (out_dir / f"{name}.md").write_text(text)
    print(text, flush=True)
    if picture is not None:
        picture(report, out_dir / f"{name}.png")
