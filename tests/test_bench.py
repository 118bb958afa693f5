"""The benchmark's figures from run outputs, and its bad-argument handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench import BenchRun, command_for, figures, markdown, plan_runs

WINDOW, BATCH = 10, 128


def write_run(out: Path, modules: int, rates: list[float], computes: list[list[float]]) -> None:
    """A finished run's outputs: one train line per module per window (+ one partial window)."""
    out.mkdir(parents=True)
    stages = [{"rank": k, "module": k, "compute_s": 1.0, "recv_wait_s": 0.1 * k, "send_wait_s": 0.2,
               "busy_fraction": 0.9, "peak_mem_bytes": 1000 + k, "samples_per_s": 10.0} for k in range(modules)]
    (out / "summary.json").write_text(json.dumps({"stages": stages, "cut_points": [[1, 4]], "test_accuracy": 0.5}))
    lines = []
    for index, (rate, compute) in enumerate(zip(rates, computes)):
        for module in range(modules):
            lines.append({"event": "train", "rank": module, "module": module, "step": (index + 1) * WINDOW,
                          "samples_per_s": rate, "window_compute_s": compute[module]})
    lines.append({"event": "train", "rank": 0, "module": modules - 1, "step": len(rates) * WINDOW + 3,
                  "samples_per_s": 1.0, "window_compute_s": 9.0})
    lines.append({"event": "eval", "rank": modules - 1, "module": modules - 1, "step": 0, "test_accuracy": 0.5})
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_figures_skip_the_warm_up_window_and_take_medians(tmp_path: Path) -> None:
    # The first window (rate 5) is warm-up; the partial window at step 33 is not a whole window.
    write_run(tmp_path / "p", 2, [5.0, 300.0, 320.0, 310.0], [[9.0, 9.0], [4.0, 3.0], [4.0, 3.5], [4.2, 3.0]])
    result = figures(BenchRun("pipeline", "pipeline", 2, 2), tmp_path / "p", WINDOW, BATCH)
    assert result["samples_per_s"] == 310.0
    assert result["windows"] == 3
    # Bound per window = batch * window / slowest stage's compute: 320, 320, 304.76 -> median 320.
    assert result["bottleneck_samples_per_s"] == 320.0
    assert result["peak_mem_bytes"] == 1001
    assert result["recv_wait_s"] == [0.0, 0.1]


def test_too_few_windows_is_bad_input(tmp_path: Path) -> None:
    write_run(tmp_path / "e", 1, [5.0], [[1.0]])
    from pipeline.errors import BadInput

    with pytest.raises(BadInput, match="at least two windows"):
        figures(BenchRun("e2e", "sequential", 1, 1), tmp_path / "e", WINDOW, BATCH)


def test_plan_and_commands() -> None:
    runs = {run.name: run for run in plan_runs(4)}
    assert (runs["ddp"].processes, runs["ddp"].modules) == (4, 1)
    assert (runs["pipeline"].processes, runs["pipeline"].modules) == (4, 4)
    assert (runs["sequential"].processes, runs["sequential"].modules) == (1, 4)
    single = command_for(runs["e2e"], "c.toml", ["run.mode=sequential"])
    assert single[1:] == ["-m", "pipeline.train", "--config", "c.toml", "--set", "run.mode=sequential"]
    assert "--nproc-per-node=4" in command_for(runs["pipeline"], None, [])


def test_markdown_names_every_run_and_ratio() -> None:
    run = {"processes": 1, "modules": 1, "samples_per_s": 100.0, "peak_mem_bytes": 1 << 20,
           "activation_mem_bytes": 2 << 20, "busy_fraction": [1.0]}
    report = {"arch": "resnet32", "dataset": "fashion_mnist", "batch_size": 128, "nproc": 2, "steps": 60,
              "window": 10, "device": "cpu", "cpu_count": 2, "runs": {"e2e": run, "pipeline": run},
              "pipeline_over_ddp": 1.2, "pipeline_over_e2e": 1.0, "pipeline_efficiency": 0.99,
              "largest_stage_activation_over_e2e": 0.5}
    text = markdown(report)
    assert "| e2e | 1 | 1 | 100.0 | 1 | 2 | 1.00 |" in text and "| pipeline |" in text
    assert "pipeline / DDP samples/s: 1.200" in text


@pytest.mark.parametrize("args, message", [
    (["--nproc", "1"], "--nproc = 1"),
    (["--nproc", "2", "--steps", "5"], "--steps = 5 must be at least two windows"),
    (["--nproc", "two"], "invalid int value"),
])
def test_bad_arguments_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
