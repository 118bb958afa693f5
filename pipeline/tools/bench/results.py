"""Reading a run's results: its timed windows from metrics.jsonl, its figures with its summary.json, and a
mode's figures over the rounds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.tools.bench.runs import BenchRun


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
