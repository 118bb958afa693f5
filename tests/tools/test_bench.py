"""The benchmark's figures from run outputs, and its bad-argument handling."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import StageFailure
from pipeline.tools.bench.cli import main
from pipeline.tools.bench.launch import busy_warning, classic_command, command_for, run_rounds
from pipeline.tools.bench.memory_only import memory_report
from pipeline.tools.bench.picture import plot
from pipeline.tools.bench.report import markdown
from pipeline.tools.bench.results import figures
from pipeline.tools.bench.runs import (
    CLASSIC_MICROBATCHES,
    BenchRun,
    bracketing_segments,
    classic_runs,
    plan_runs,
    schedule,
)
from pipeline.tools.bench.timed import run_bench
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

REPO = Path(__file__).resolve().parents[2]

WINDOW, BATCH = 10, 128


def write_run(out: Path, modules: int, rates: list[float], computes: list[list[float]], timed: bool = True) -> None:
    """A finished run's outputs: one train line per module per window (+ one partial window).

    ``timed``: the stages report compute and waits (every mode but the classic pipeline)."""
    out.mkdir(parents=True, exist_ok=True)
    stages = [{"rank": k, "module": k, "peak_mem_bytes": 1000 + k, "samples_per_s": 10.0} for k in range(modules)]
    if timed:
        stages = [{**stage, "compute_s": 1.0, "recv_wait_s": 0.1 * k, "send_wait_s": 0.2, "busy_fraction": 0.9}
                  for k, stage in enumerate(stages)]
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
    # each stage's step: the median of its windows' compute seconds over the window's steps
    assert result["stage_s"] == [0.4, 0.3]


def test_progress_lines_between_window_ends_are_counted_into_their_windows(tmp_path: Path) -> None:
    """Progress lines also come on a time interval: each line's compute covers the steps since the
    previous line, not --window steps (the bench once divided by 10 and reported 0.227 s per batch
    for stages busy 0.61 s per batch)."""
    write_run(tmp_path / "p", 2, [], [])
    steps = [8, 10, 16, 20, 24, 30, 32, 40, 48, 50, 56, 60]  # the lines: every 8 s and every 10 steps
    per_step = [0.61, 0.63]
    lines = [{"event": "train", "rank": module, "module": module, "step": step, "samples_per_s": 208.0,
              "window_compute_s": round(per_step[module] * (step - before), 5)}
             for module in range(2) for before, step in zip([0, *steps], steps)]
    (tmp_path / "p" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = figures(BenchRun("pipeline", "pipeline", 2, 2), tmp_path / "p", WINDOW, BATCH)
    assert result["windows"] == 5  # steps 20 .. 60; the first window is warm-up
    assert result["stage_s"] == [0.61, 0.63]
    assert result["samples_per_s"] == 208.0
    assert result["bottleneck_samples_per_s"] == round(BATCH / 0.63, 2)


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


def test_rounds_alternate_every_mode() -> None:
    order = [(number, run.name) for number, run in schedule(2, 3)]
    modes = ["e2e", "ddp", "sequential", "pipeline"]
    assert order == [(number, name) for number in (1, 2, 3) for name in modes]


def out_dir_of(command: list[str]) -> Path:
    (item,) = [arg for arg in command if arg.startswith("run.out_dir=")]
    return Path(item.split("=", 1)[1])


# samples/s each mode reaches in rounds 1, 2, 3: round 2 is the noisy one for every mode.
RATES = {"e2e": [100.0, 50.0, 110.0], "ddp": [200.0, 90.0, 220.0], "sequential": [95.0, 40.0, 90.0],
         "pipeline": [300.0, 120.0, 310.0]}
# the classic rows: 1F1B with 8 microbatches is the fastest, at 250 samples/s
RATES.update({run.name: [(200.0 if run.schedule == "1f1b" else 150.0) + 50 * run.microbatches / 8] * 3
              for run in classic_runs(2, CLASSIC_MICROBATCHES)})


# every checkpointed DDP row: slower than DDP, as recomputation costs a forward
CHECKPOINTED_RATES = [150.0, 75.0, 160.0]


def fake_launcher(ran: list[tuple[int, str]], batch: int = BATCH) -> object:
    def launch(command: list[str], log: Path, load: list[float]) -> int:
        out = out_dir_of(command)
        number, name = int(out.parent.name.split("-")[1]), out.name
        ran.append((number, name))
        run = {r.name: r for r in plan_runs(2) + classic_runs(2, CLASSIC_MICROBATCHES)}.get(
            name, BenchRun(name, "ddp", 2, 1))
        rate = RATES.get(name, CHECKPOINTED_RATES)[number - 1]
        # compute seconds per window such that the pipeline's bound is 1.25 x its rate
        write_run(out, run.modules, [rate] * 3, [[batch * WINDOW / (1.25 * rate)] * run.modules] * 3,
                  timed=run.mode != "classic_pp")
        log.write_text("ok\n")
        load.append(0.25)
        return 0

    return launch


def command_of(run: BenchRun, out: Path) -> list[str]:
    return command_for(run, "my config.toml", [f"run.out_dir={out}"])


def test_run_rounds_takes_medians_and_spread_per_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[tuple[int, str]] = []
    results, load = run_rounds(schedule(2, 3), tmp_path, command_of, WINDOW, BATCH,
                               fake_launcher(ran))  # type: ignore[arg-type]
    assert ran == [(number, run.name) for number, run in schedule(2, 3)]
    assert results["pipeline"]["samples_per_s"] == 300.0
    assert (results["pipeline"]["samples_per_s_min"], results["pipeline"]["samples_per_s_max"]) == (120.0, 310.0)
    assert results["sequential"]["samples_per_s"] == 90.0 and results["sequential"]["rounds"] == 3
    assert results["pipeline"]["efficiency_rounds"] == [0.8, 0.8, 0.8]
    assert len(load) >= 12 and (tmp_path / "round-3" / "pipeline.log").is_file()
    # every printed command pastes back into a shell as the same argv
    printed = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if "python" in line]
    assert len(printed) == 12
    assert shlex.split(printed[0]) == command_of(plan_runs(2)[0], tmp_path / "round-1" / "e2e")
    assert "'my config.toml'" in printed[0]


def test_a_failed_run_names_its_round_and_log(tmp_path: Path) -> None:
    def failing(command: list[str], log: Path, load: list[float]) -> int:
        return 3 if "round-2" in str(out_dir_of(command)) else fake(command, log, load)

    fake = fake_launcher([])
    with pytest.raises(StageFailure, match=r"e2e \(round 2\) failed with exit code 3; see .*round-2/e2e.log"):
        run_rounds(schedule(2, 2), tmp_path, command_of, WINDOW, BATCH, failing)  # type: ignore[operator]


def test_busy_machine_warning() -> None:
    assert busy_warning(0.9, 2) is None
    warning = busy_warning(1.5, 2)
    assert warning is not None and "1.50 on 2 cores" in warning and "idle" in warning


TINY_BENCH = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu"]


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    """A whole benchmark on a tiny config with the runs faked (their outputs written, not trained)."""
    out = tmp_path_factory.mktemp("bench")
    report = run_bench(None, TINY_BENCH, 2, 20, WINDOW, out, rounds=3,
                       launcher=fake_launcher([], batch=8))  # type: ignore[arg-type]
    return report, out


def test_bench_json_keeps_its_keys_and_adds_the_spread(bench_report: tuple[dict[str, object], Path]) -> None:
    report, out = bench_report
    saved = json.loads((out / "bench.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["pipeline_over_ddp"] == 1.5 and saved["pipeline_efficiency"] == 0.8
    assert 0 < saved["largest_stage_activation_over_e2e"] <= 1
    pipeline = saved["runs"]["pipeline"]
    assert len(pipeline["stage_s"]) == len(pipeline["predicted_stage_s"]) == 2
    assert all(seconds > 0 for seconds in pipeline["predicted_stage_s"])
    assert saved["partition"] == "balanced-time" and saved["memory_cap"] is None
    assert saved["rounds"] == 3 and saved["rounds_spread"]["pipeline_over_ddp"] == {
        "median": round(310 / 220, 3), "min": round(120 / 90, 3), "max": 1.5}
    assert len(saved["load_average"]["before"]) == 3 and saved["load_average"]["during"]["max"] >= 0
    assert saved["machine"].startswith(f"{os.cpu_count()} CPU cores")
    text = (out / "bench.md").read_text()
    assert "| pipeline | 2 | 2 | 300.0 | 120.0 - 310.0 |" in text
    assert "pipeline / DDP samples/s: 1.500 (rounds: 1.333 - 1.500)" in text
    assert "1-minute load average before:" in text


def test_balanced_cuts_under_a_memory_cap_are_benched_and_reported(tmp_path: Path) -> None:
    report = run_bench(None, [*TINY_BENCH, "local.partition=balanced", "local.memory_cap=0.9"], 2, 20, WINDOW,
                       tmp_path, rounds=1, launcher=fake_launcher([], batch=8))  # type: ignore[arg-type]
    assert report["partition"] == "balanced" and report["memory_cap"] == 0.9
    assert report["largest_stage_activation_over_e2e"] <= 0.9
    assert "(cuts: balanced, memory cap 0.9)" in (tmp_path / "bench.md").read_text()


def test_markdown_shows_the_busy_warning(bench_report: tuple[dict[str, object], Path]) -> None:
    report = {**bench_report[0], "busy_warning": "warning: the machine was busy"}
    assert "**warning: the machine was busy**" in markdown(report)


def test_plot_has_a_title_and_labelled_bars(bench_report: tuple[dict[str, object], Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved: list[matplotlib.figure.Figure] = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (saved.append(self), real_savefig(self, *a, **k))[1])
    plot(bench_report[0], tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    (figure,) = saved
    heading = figure.get_suptitle()
    assert "resnet8 on synthetic, batch 8, 2 processes, 20 steps x 3 rounds" in heading
    assert f"{os.cpu_count()} CPU cores" in heading
    assert "pipeline / DDP 1.500" in heading and "pipeline efficiency 0.800" in heading
    labels = [text.get_text() for axes in figure.axes for text in axes.texts]
    assert "300\n(120-310)" in labels and "200\n(90-220)" in labels and "5" in labels, labels


@pytest.mark.parametrize("args, message", [
    (["--nproc", "1"], "--nproc = 1"),
    (["--nproc", "2", "--steps", "5"], "--steps = 5 must be at least two windows"),
    (["--nproc", "two"], "invalid int value"),
    (["--nproc", "2", "--rounds", "0"], "--rounds = 0 must be >= 1"),
    (["--nproc", "2", "--round", "2"], "unrecognized arguments: --round"),
    (["--nproc", "2", "--classic-microbatches", "3"], "--classic-microbatches: 3 does not divide data.batch_size"),
    (["--nproc", "2", "--classic-microbatches", "2,four"], "--classic-microbatches '2,four': give whole numbers"),
    (["--nproc", "2", "--checkpoint-segments", "1"], "--checkpoint-segments: 1 segments of resnet32's"),
    (["--nproc", "2", "--checkpoint-segments", "x"], "--checkpoint-segments 'x': give whole numbers"),
    ([], "--nproc is required"),
    (["--memory-only"], "--memory-only compares local modules with E2E, but local.modules = 1"),
    (["--memory-only", "--batch", "0", "--set", "local.modules=2"], "--batch = 0 must be >= 1"),
])
def test_bad_arguments_exit_2(args: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*args, "--out", str(tmp_path)]) == 2  # what python -m pipeline.bench exits with
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_exits_2_with_the_line_and_no_traceback(tmp_path: Path) -> None:
    """The cases above as the whole process (the shim, the module run as __main__): one is enough."""
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", "--nproc", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert done.returncode == 2
    assert "--nproc = 1" in done.stderr and "Traceback" not in done.stderr


def test_every_k_by_r_layout_of_n_processes_is_planned_and_reported() -> None:
    from pipeline.tools.bench.report import layouts

    runs = {run.name: run for run in plan_runs(8)}
    assert {(run.modules, run.processes // run.modules) for run in runs.values() if run.processes == 8} == {
        (1, 8), (8, 1), (2, 4), (4, 2)}
    assert [run.name for run in plan_runs(2)] == ["e2e", "ddp", "sequential", "pipeline"]  # K2xR1 and K1xR2
    figures = {name: {"processes": run.processes, "modules": run.modules, "samples_per_s": 100.0 + run.modules,
                      "peak_mem_bytes": 1 << 20, **({"bottleneck_samples_per_s": 200.0} if run.modules > 1 else {})}
               for name, run in runs.items()}
    rows = layouts(figures)
    assert [(row["K"], row["R"]) for row in rows] == [(8, 1), (4, 2), (2, 4), (1, 8)]
    assert rows[0]["efficiency"] == 0.54 and rows[-1]["efficiency"] is None


def test_classic_rows_run_after_the_others_under_torchrun() -> None:
    order = [run.name for _, run in schedule(2, 1, [2, 8])]
    assert order == ["e2e", "ddp", "sequential", "pipeline", "classic_gpipe_m2", "classic_gpipe_m8",
                     "classic_1f1b_m2", "classic_1f1b_m8"]
    (run,) = [run for _, run in schedule(2, 1, [4]) if run.name == "classic_1f1b_m4"]
    command = classic_command(run, "c.toml", ["local.modules=2"])
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert command[6:] == ["pipeline.classic_pp", "--config", "c.toml", "--schedule", "1f1b", "--microbatches", "4",
                           "--set", "local.modules=2"]


def test_bench_reports_the_classic_pipeline_beside_the_others(bench_report: tuple[dict[str, object], Path]) -> None:
    out = bench_report[1]
    saved = json.loads((out / "bench.json").read_text())
    classic = saved["classic_pp"]
    assert set(classic) == {run.name for run in classic_runs(2, CLASSIC_MICROBATCHES)}
    assert saved["best_classic_pp"] == "classic_1f1b_m8" and classic["classic_1f1b_m8"]["samples_per_s"] == 250.0
    assert saved["pipeline_over_classic_pp"] == 1.2
    row = classic["classic_gpipe_m2"]
    assert row["idle_fraction"] == round(1 / 3, 4) and row["peak_mem_bytes_per_process"] == [1000, 1001]
    # GPipe keeps every microbatch's activations, 1F1B at most K - k of them on stage k
    one_f = classic["classic_1f1b_m2"]["activation_mem_bytes_per_stage"]
    assert row["activation_mem_bytes_per_stage"][1] == one_f[1] * 2
    # every row has its traffic: none in one process, activations + gradients for classic, packets for the pipeline
    traffic = saved["wire_bytes_per_step"]
    assert set(traffic) == set(saved["runs"]) and traffic["e2e"] == traffic["sequential"] == 0
    assert traffic["classic_gpipe_m2"] == traffic["classic_1f1b_m8"] > traffic["pipeline"] > 0 and traffic["ddp"] > 0
    assert saved["idle_fraction"]["pipeline"] == 0.1 and saved["idle_fraction"]["e2e"] == 0.0
    assert saved["idle_fraction"]["classic_1f1b_m8"] == round(1 / 9, 4)
    assert saved["runs"]["classic_1f1b_m8"]["busy_fraction"] == []
    text = (out / "bench.md").read_text()
    assert "| classic_1f1b_m8 | 2 | 2 | 250.0 | 250.0 - 250.0 |" in text and "| - |" in text
    assert "| classic_gpipe_m4 | " in text and "0.200 (bubble) |" in text
    assert "pipeline / best classic pipeline (classic_1f1b_m8) samples/s: 1.200" in text
    assert saved["layouts"] and all(not row["run"].startswith("classic") for row in saved["layouts"])


def test_memory_only_counts_e2e_and_every_module_without_running(tmp_path: Path) -> None:
    from pipeline.config.loading import load_config
    from pipeline.data.specs import dataset_spec
    from pipeline.performance.activations import module_activation_bytes

    sets = [*TINY_BENCH, "local.modules=2", "local.partition=[[2, 0]]"]
    report = memory_report(None, sets, 3, tmp_path)
    config = load_config(None, sets)
    spec = dataset_spec(config.data, config.model)
    e2e = module_activation_bytes(load_config(None, [*TINY_BENCH, "local.modules=1"]), spec, [], 3)[0]
    modules = module_activation_bytes(config, spec, [2], 3)  # [2, 0]: after the stem and stage 1's one block
    assert report["e2e_activation_mem_bytes"] == e2e and report["module_activation_mem_bytes"] == modules
    assert report["largest_stage_activation_over_e2e"] == round(max(modules) / e2e, 3) < 1
    assert report["cut_points"] == [[2, 0]] and report["batch_per_device"] == 3
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert f"{report['largest_stage_activation_over_e2e']:.3f} |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("config, arch, modules, context", [
    ("configs/fashion_mnist/base.toml", "vit_tiny", 4, "R1E"),  # the closing note's: a ViT on Fashion-MNIST
    (None, "vgg11_bn", 3, "R0"),
    (None, MAPS_THEN_VECTORS, 3, "R0"),  # its equal cuts start module 2 at vectors, which ContSup cannot reach
])
def test_memory_only_counts_any_network_at_its_block_index_cuts(config: str | None, arch: str, modules: int,
                                                                 context: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tools.bench.cli import main

    data = [] if config else ["--set", "data.name=synthetic"]
    sets = [*data, "--set", f"model.arch={arch}", "--set", f"local.modules={modules}", "--set",
            f"local.context={context}"]
    assert main([*(["--config", str(REPO / config)] if config else []), *sets, "--memory-only", "--batch", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    cuts = report["cut_points"]
    assert len(cuts) == modules - 1 and all(isinstance(cut, int) for cut in cuts) and cuts == sorted(set(cuts))
    per_module, e2e = report["module_activation_mem_bytes"], report["e2e_activation_mem_bytes"]
    assert len(per_module) == modules and min(per_module) > 0 and e2e > 0
    assert report["largest_stage_activation_over_e2e"] == round(max(per_module) / e2e, 3)  # the closing note's figure
    text = capsys.readouterr().out
    assert "| run | cut points (block index) |" in text and f"| K = {modules} | {cuts} |" in text


def test_default_segment_counts_bracket_the_pipelines_largest_stage() -> None:
    memory = {2: 900, 3: 700, 4: 500, 5: 450, 6: 480}
    assert bracketing_segments(memory, 600) == [3, 4]  # 3 does not fit, 4 is the fewest that does
    assert bracketing_segments(memory, 1000) == [2]  # plain halving fits already
    assert bracketing_segments(memory, 100) == [5]  # none fits: the least memory


def test_checkpointed_ddp_rows_are_run_counted_and_compared_at_equal_memory(
        bench_report: tuple[dict[str, object], Path]) -> None:
    out = bench_report[1]
    saved = json.loads((out / "bench.json").read_text())
    segments = saved["checkpoint_segments"]
    names = [f"ddp_checkpointed_s{count}" for count in segments]
    assert all(name in saved["runs"] for name in names)
    pipeline_largest = max(saved["runs"]["pipeline"]["module_activation_mem_bytes"])
    for name in names:
        row = saved["runs"][name]
        assert row["mode"] == "ddp" and row["checkpoint_segments"] == int(name.rsplit("s", 1)[1])
        assert 0 < row["activation_mem_bytes"] < saved["runs"]["ddp"]["activation_mem_bytes"]
    # at batch 4 per process even plain DDP keeps less than the pipeline's largest stage: 2 segments bracket it
    assert segments == [2] and saved["runs"]["ddp_checkpointed_s2"]["activation_mem_bytes"] <= pipeline_largest
    assert saved["best_ddp_checkpointed"] == "ddp_checkpointed_s2"
    assert saved["pipeline_over_ddp_checkpointed"] == round(300 / 150, 3)
    assert all(row["run"] not in names for row in saved["layouts"])  # the K x R table keeps plain layouts
    text = (out / "bench.md").read_text()
    frontier = text.split("least memory first:")[1].split("\n\n")[1].splitlines()[2:]
    memories = [float(line.split(" | ")[1]) for line in frontier]
    assert len(frontier) == len(saved["runs"]) and memories == sorted(memories)
    assert "pipeline / DDP with activation checkpointing at equal activation memory" in text


def test_checkpoint_segments_given_run_as_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[tuple[int, str]] = []
    report = run_bench(None, TINY_BENCH, 2, 20, WINDOW, tmp_path, rounds=1, launcher=fake_launcher(ran, batch=8),  # type: ignore[arg-type]
                       classic_microbatches=(), checkpoint_segments=[2, 4])
    assert [name for _, name in ran] == ["e2e", "ddp", "sequential", "pipeline", "ddp_checkpointed_s2",
                                         "ddp_checkpointed_s4"]
    (printed,) = [line for line in capsys.readouterr().out.splitlines() if "round 1/1 ddp_checkpointed_s4: " in line
                  and "python" in line]
    command = shlex.split(printed.split(": ", 1)[1])
    assert "precision.checkpoint_segments=4" in command and "run.mode=ddp" in command
    assert "--nproc-per-node=2" in command and report["checkpoint_segments"] == [2, 4]


def test_no_checkpointed_row_within_the_pipelines_memory_is_said(bench_report: tuple[dict[str, object], Path]) -> None:
    report = {**bench_report[0], "best_ddp_checkpointed": None, "pipeline_over_ddp_checkpointed": None}
    assert "none of the checkpointed rows (segments [2]) fits in the pipeline's largest stage" in markdown(report)


def test_plan_and_bench_agree_under_a_bf16_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One model sizes a packet: from one profile, the planner's K = N x 1 layout predicts the bench's pipeline
    row (its stage seconds, its cuts, the bytes its link carries, the codec's header aside), both on a bf16 wire."""
    import math
    from dataclasses import replace

    import torch

    from pipeline.config.loading import load_config
    from pipeline.data.specs import dataset_spec
    from pipeline.model.context import ContextPlan
    from pipeline.performance import profile as profiling
    from pipeline.performance.cost import sent_bytes
    from pipeline.performance.traffic import LABEL_BYTES, header_bytes
    from pipeline.tools.plan import Cluster, plan_layouts

    sets = [*TINY_BENCH, "local.modules=2", "local.context=R1E", "pipeline.wire_dtype=bf16"]
    config = load_config(None, sets)
    measured = profiling.profile_network(config, dataset_spec(config.data, config.model), torch.device("cpu"))
    assert measured.wire_element_bytes == 2
    monkeypatch.setattr(profiling, "profile_network", lambda *_: measured)  # the bench profiles no second time
    report = run_bench(None, sets, 2, 20, WINDOW, tmp_path, rounds=1, launcher=fake_launcher([], batch=8),  # type: ignore[arg-type]
                       classic_microbatches=(), checkpoint_segments=[2])
    local, plan = config.local, ContextPlan.of(config.local)
    cluster = Cluster(devices=2, memory_bytes=math.inf, link_bytes_per_s=measured.copy_bytes_per_s,
                      queue_depth=config.pipeline.queue_depth)
    (pipe,) = [layout for layout in plan_layouts(measured, local.context_depth, local.context_image, local.reconstruct,
                                                 8, cluster) if layout.modules == 2]
    assert report["runs"]["pipeline"]["predicted_stage_s"] == [round(seconds, 4) for seconds in pipe.stage_seconds]
    assert report["wire_bytes_per_step"]["pipeline"] == header_bytes(plan, 1) + pipe.link_bytes
    # the floats (features, image, register) travel in bf16: half the bytes an fp32 wire sends at the same cut
    labels = 8 * LABEL_BYTES
    fp32 = sent_bytes(replace(measured, wire_element_bytes=4), plan, 0, pipe.cuts[0] + 1, 8)
    assert fp32 - labels == 2 * (pipe.link_bytes - labels) > 0
