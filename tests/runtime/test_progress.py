"""What a person watching a run sees: the first line early, rates of real samples, a steady ETA."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.config.loading import load_config
from pipeline.runtime.assemble import run
from pipeline.runtime.metrics import Progress, percent
from pipeline.runtime.report import RunReport


def test_rate_counts_the_samples_trained_and_the_eta_is_smoothed(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    progress = Progress("p", first_step=0, total_steps=100)
    for _ in range(10):
        progress.advance(50)  # batches of 50 (a clamped batch), whatever the config said
    clock[0] += 10.0
    text, rate = progress.line(1, 10, [1.0])
    assert rate == pytest.approx(50.0) and "eta 0:01:30" in text  # 90 steps x 50 / 50 per s
    for _ in range(10):
        progress.advance(50)
    clock[0] += 1.0  # one fast window: 500 samples/s
    text, rate = progress.line(1, 20, [1.0])
    assert rate == pytest.approx(500.0)
    smoothed = 0.3 * 500 + 0.7 * 50  # 185 samples/s, not 500
    assert f"eta 0:00:{int(80 * 50 / smoothed):02d}" in text  # 21 s, where the last window alone says 8 s


def test_accuracy_reads_as_a_percentage() -> None:
    assert percent(0.85252) == "85.25 %" and percent(1.0) == "100.00 %"


def test_a_long_first_window_still_prints_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(RunReport, "FIRST_LINE_S", 0.0)
    config = load_config(None, ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu",
                                "run.log_every=1000", "train.max_steps=3", f"run.out_dir='{tmp_path}'"])
    run(config)
    out = capsys.readouterr().out
    assert "step 1/3 | loss" in out  # long before step 1000
    assert out.count("| loss") == 2  # the early line, then the epoch end's
    assert "test accuracy" in out and " %" in out.split("test accuracy", 1)[1].splitlines()[0]
    assert out.strip().splitlines()[-1].endswith(f"outputs in {tmp_path} (summary.json, metrics.jsonl, checkpoints/)")


def test_a_resumed_run_says_where_it_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu", "local.modules=2"]
    run(load_config(None, [*common, "train.max_steps=3", f"run.out_dir='{tmp_path / 'a'}'"]))
    capsys.readouterr()
    run(load_config(None, [*common, "train.max_steps=5", f"run.out_dir='{tmp_path / 'b'}'",
                           f"run.resume='{tmp_path / 'a'}'"]))
    where = tmp_path / "a" / "checkpoints" / "step_3"  # the set itself, whether named by run.resume or found
    assert f"resumed from {where} at epoch 1, batch 3 (step 3)" in capsys.readouterr().out



def test_a_slow_run_prints_on_a_time_interval_as_well(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """log_every counts steps: on a slow machine a line still comes every LINE_EVERY_S seconds."""
    monkeypatch.setattr(RunReport, "FIRST_LINE_S", 0.0)
    monkeypatch.setattr(RunReport, "LINE_EVERY_S", 0.0)
    config = load_config(None, ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu",
                                "run.log_every=1000", "train.max_steps=4", f"run.out_dir='{tmp_path}'"])
    run(config)
    out = capsys.readouterr().out
    assert [f"step {step}/4 | loss" in out for step in range(1, 5)] == [True] * 4
    lines = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(lines) == 4  # each step's line, its window the one step since the previous line
