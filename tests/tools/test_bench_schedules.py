"""The schedule bench's figures and table, from summaries as runs write them (no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.tools.bench_schedules import buffered_steps, main, markdown, run_figures, stage_steps


def summary(rates: list[float], compute_s: float, accuracy: float | None, wall_s: float) -> dict[str, Any]:
    stages = [{"stage": k, "samples_per_s": rate, "compute_s": compute_s if k == 0 else 9.9}
              for k, rate in reversed(list(enumerate(rates)))]  # any order: rows follow the stage
    return {"stages": stages, "wall_s": wall_s, "test_accuracy": accuracy}


def test_figures_budget_and_table(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(line) for line in [
        {"event": "train", "module": 0, "step": 100}, {"event": "stage", "module": 0, "step": 100},
        {"event": "stage", "module": 1, "step": 100}]) + "\n")
    steps = stage_steps(metrics)
    assert steps == {0: 100, 1: 100}
    # Lockstep, batch 10: 100 steps at 50 samples/s = 20 s of training; stage 0 computes 0.1 s a step.
    lockstep = run_figures(summary([50.0, 50.0], compute_s=10.0, accuracy=0.5, wall_s=25.0), steps, batch=10)
    assert lockstep["stage_steps"] == [100, 100] and lockstep["steps_per_s"] == [5.0, 5.0]
    assert lockstep["train_s"] == 20.0 and lockstep["stage0_step_s"] == pytest.approx(0.1)
    assert buffered_steps(lockstep) == 200  # stage 0 alone fits 200 of its steps into those 20 s
    buffered = run_figures(summary([100.0, 40.0], compute_s=20.0, accuracy=0.55, wall_s=26.0), {0: 200, 1: 100}, 10)
    assert buffered["steps_per_s"] == [10.0, 4.0] and buffered["train_s"] == 25.0  # the stage that trained longest
    table = markdown({"config": "c.toml", "modules": 2, "batch_size": 10, "slow": 1, "factor": 1.5,
                      "machine": "2 CPU cores", "runs": {"lockstep": lockstep, "buffered": buffered}})
    assert "stage 1 slowed 1.5x" in table and "stage 0 trains 200 steps" in table
    assert "| lockstep | 100 / 100 | 5.00 / 5.00 | 50 | 20.0 | 25.0 | 50.00 % |" in table
    assert "| buffered | 200 / 100 | 10.00 / 4.00 | 100 | 25.0 | 26.0 | 55.00 % |" in table


def test_a_stage_out_of_range_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--slow", "4", "--out", str(tmp_path), "--set", "local.modules=2"]) == 2
    assert "--slow = 4 names no stage" in capsys.readouterr().err
