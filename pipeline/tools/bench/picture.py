"""The report's picture, bench.png: throughput with its spread over the rounds, activation memory, and speed
against memory for every row (with matplotlib; without it the report says so and draws nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tools.bench.report import frontier, ratio_line, title
from pipeline.tools.plot import optional_pyplot


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
