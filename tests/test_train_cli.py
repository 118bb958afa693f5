"""python -m pipeline.train: exit codes, one-line errors, and a tiny run's files (docs/design.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.runtime import checkpoint
from pipeline.train import main, parse_config

REPO = Path(__file__).resolve().parents[1]
STAGE_KEYS = {"rank", "module", "compute_s", "recv_wait_s", "send_wait_s", "busy_fraction", "peak_mem_bytes",
              "samples_per_s"}
SUMMARY_KEYS = {"mode", "world_size", "modules", "method", "context", "loss", "dataset", "steps", "epochs",
                "test_accuracy", "train_samples_per_s", "wall_s", "cut_points", "stages"}


def train_cli(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_config_file_exits_2(tmp_path):
    missing = tmp_path / "no_such.toml"
    assert_one_line_error(train_cli("--config", str(missing), cwd=tmp_path), str(missing), "does not exist")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--set", "nonsense"], ["nonsense", "key=value"]),
        (["--set", "local.modulez=2"], ["local.modulez"]),
        (["--set", "local.modules=2", "--set", "local.context=R5"], ["local.context"]),
        (["--bogus"], ["--bogus", "--help"]),
    ],
    ids=["set-syntax", "set-unknown-key", "set-bad-value", "unknown-flag"],
)
def test_bad_arguments_exit_2(tmp_path, args, needles):
    assert_one_line_error(train_cli(*args, cwd=tmp_path), *needles)


@pytest.mark.parametrize("value, needle", [("model.arch=resnet6000002", "resnet1202"),
                                           ("run.seed=" + "9" * 5000, "too long to read"),
                                           ("local.partition=" + "[" * 5000 + "]" * 5000, "nested too deep")],
                         ids=["deep-network", "huge-int", "deep-nesting"])
def test_parser_limits_exit_2(tmp_path, value, needle):
    assert_one_line_error(train_cli("--set", value, cwd=tmp_path), needle)


def test_bad_input_in_process_returns_2(tmp_path, capsys):
    assert main(["--set", "run.mode=nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: run.mode") and captured.err.count("\n") == 1


def test_under_torchrun_the_line_is_also_the_root_cause_of_its_report(tmp_path, capsys, monkeypatch):
    """torchrun reads TORCHELASTIC_ERROR_FILE of a failed process into its report's "Root Cause"."""
    error_file = tmp_path / "attempt_0" / "0" / "error.json"
    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["--set", "run.mode=nope"]) == 2
    line = capsys.readouterr().err.strip()
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    assert ProcessFailure(0, 1, 2, str(error_file)).message == line  # what torchrun's report will print


def test_parse_config_reads_file_and_sets(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[local]\nmodules = 3\n")
    config = parse_config(["--config", str(path), "--set", "run.seed=4", "--set", "local.context=R1"])
    assert config.local.modules == 3 and config.run.seed == 4 and config.local.context == "R1"


@pytest.mark.slow
def test_a_tiny_sequential_run(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "tiny.toml"
    path.write_text(
        "[data]\nname = \"synthetic\"\nbatch_size = 8\n"
        "[model]\narch = \"resnet8\"\n"
        "[local]\nmodules = 2\n"
        "[train]\nmax_steps = 3\n"
    )
    done = train_cli("--config", str(path), "--set", f"run.out_dir={out}", "--set", "run.device=cpu",
                     "--set", "run.log_every=1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr

    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["mode"] == "sequential" and summary["world_size"] == 1
    assert summary["modules"] == 2 and summary["steps"] == 3
    assert summary["dataset"] == "synthetic"
    assert summary["cut_points"] == [[1, 0]]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["train_samples_per_s"] > 0 and summary["wall_s"] > 0
    assert len(summary["stages"]) == 1
    stage = summary["stages"][0]
    assert stage.keys() >= STAGE_KEYS
    assert stage["rank"] == 0 and stage["compute_s"] > 0 and stage["peak_mem_bytes"] > 0
    assert 0.0 <= stage["busy_fraction"] <= 1.0 and stage["samples_per_s"] > 0

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert {(line["step"], line["module"]) for line in train} == {(s, m) for s in (1, 2, 3) for m in (0, 1)}
    assert all({"rank", "module", "step", "epoch", "loss", "lr"} <= line.keys() for line in train)

    for module in range(2):
        payload = torch.load(checkpoint.newest_module_file(out, module), weights_only=True)
        assert payload["position"]["step"] == 3
        assert payload["state"]["module"]
    assert not checkpoint.module_file(checkpoint.find_set(out), 2).exists()


def test_a_failure_is_one_line_and_its_traceback_is_in_the_error_log(tmp_path: Path, capsys) -> None:
    """In this process (the command's own main; test_a_tiny_sequential_run runs the real command)."""
    out = tmp_path / "run"
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
                 "--set", "train.lr=1e30", "--set", "train.schedule=constant", "--set", "run.log_every=1",
                 "--set", "train.max_steps=20", "--set", f"run.out_dir='{out}'"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    log = out / "errors" / "rank_0.log"
    assert lines[0].startswith("error: module") and "loss is nan" in lines[0]
    assert lines[0].endswith(f"(traceback: {log})")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "StageFailure" in text and "means(" in text


def test_bad_input_found_during_the_run_is_logged_too(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", f"run.out_dir='{out}'",
                 "--set", f"run.resume='{tmp_path / 'nowhere'}'"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "run.resume: no complete checkpoint" in lines[0] and "(traceback: " in lines[0]
    assert "BadInput" in (out / "errors" / "rank_0.log").read_text()


def test_a_multi_line_message_reaches_the_terminal_as_its_first_line() -> None:
    from pipeline.errors import StageFailure, errors_logged, first_line

    assert first_line("\n  Weights only load failed.\nIn PyTorch 2.6 ...\n") == "Weights only load failed."
    with pytest.raises(StageFailure) as caught, errors_logged("/proc/definitely/not/writable"):
        raise RuntimeError("CUDA error: an illegal memory access\nCompile with TORCH_USE_CUDA_DSA")
    assert str(caught.value) == ("RuntimeError: CUDA error: an illegal memory access (no traceback saved: cannot "
                                 "write /proc/definitely/not/writable/errors/rank_0.log: no such file or directory)")
    assert isinstance(caught.value.__cause__, RuntimeError)


# ---- one job per out_dir; another run's outputs are kept (issue 14) -----------------------------------

TINY_RUN = ("--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
            "--set", "local.modules=2", "--set", "run.device=cpu", "--set", "train.schedule=constant")


def tiny_main(out: Path, *sets: str) -> int:
    return main([*TINY_RUN, "--set", f"run.out_dir='{out}'", *(arg for item in sets for arg in ("--set", item))])


@pytest.mark.slow
def test_a_second_job_on_the_same_out_dir_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-m", "pipeline.train", *TINY_RUN, "--set", f"run.out_dir='{out}'",
                              "--set", "train.max_steps=100000", "--set", "train.epochs=1000"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():  # training has begun
            assert time.monotonic() < deadline and first.poll() is None, "the first job never started training"
            time.sleep(0.2)
        capsys.readouterr()
        assert tiny_main(out, "train.max_steps=2") == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"is in use by another job (pid {first.pid})" in error
    finally:
        first.kill()
        first.wait()
    assert tiny_main(out, "train.max_steps=2", "run.overwrite=true") == 0  # the lock went with the first job


def test_another_runs_outputs_are_refused_unless_resumed_or_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert tiny_main(out, "train.max_steps=2") == 0
    capsys.readouterr()
    assert tiny_main(out, "train.max_steps=2") == 0  # the same config again: its own folder, resumed (issue 26)
    assert "nothing to train" in capsys.readouterr().out
    assert tiny_main(out, "train.max_steps=2", "local.context=E") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "local.context = \"R0\" there, \"E\" here" in error
    assert "run.overwrite = true" in error and "run.resume" in error
    marker = out / "checkpoints" / "step_2" / "COMPLETE"
    written = json.loads(marker.read_text())
    del written["config"]  # a set written before the marker recorded its config: whose it is cannot be told
    marker.write_text(json.dumps(written))
    assert tiny_main(out, "train.max_steps=2") == 2
    assert "holds another run's outputs (summary.json, checkpoints, metrics.jsonl)" in capsys.readouterr().err
    assert tiny_main(out, "train.max_steps=4", f"run.resume='{out}'") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert tiny_main(out, "train.max_steps=3", "run.overwrite=true") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert [step for step, _ in checkpoint.complete_sets(out)] == [3]  # the replaced run's sets are gone


@pytest.mark.parametrize("launcher", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_a_restarted_attempt_goes_on_from_its_own_sets_whatever_its_first_attempt_was_told(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, launcher: str) -> None:
    """run.overwrite cleared the folder once, and run.resume named another: a restart continues this job."""
    out, other = tmp_path / "run", tmp_path / "other"
    assert tiny_main(other, "train.max_steps=2") == 0
    assert tiny_main(out, "train.max_steps=2") == 0
    assert tiny_main(out, "train.max_steps=4", "run.overwrite=true") == 0  # cleared, then 4 steps of its own
    monkeypatch.setenv(launcher, "1")
    capsys.readouterr()
    assert tiny_main(out, "train.max_steps=4", "run.overwrite=true") == 0
    assert "nothing to train" in capsys.readouterr().out  # its own sets were kept, not cleared again
    assert [step for step, _ in checkpoint.complete_sets(out)] == [4]
    monkeypatch.delenv(launcher)
    resumed = tmp_path / "resumed"
    assert tiny_main(resumed, "train.max_steps=3", f"run.resume='{other}'") == 0  # 1 step on from other's 2
    assert tiny_main(resumed, "train.max_steps=3", f"run.resume='{other}'") == 2  # by hand: which one is meant?
    monkeypatch.setenv(launcher, "1")
    capsys.readouterr()
    assert tiny_main(resumed, "train.max_steps=3", f"run.resume='{other}'") == 0
    assert f"{resumed} is at step 3, where this run ends" in capsys.readouterr().out  # its own set, not other's


def test_check_refuses_an_out_dir_the_run_would_refuse(tmp_path: Path, capsys) -> None:
    """The launchers run --check before torchrun: a refusal there is not retried --max-restarts times."""
    out = tmp_path / "run"
    assert tiny_main(out, "train.max_steps=2") == 0
    capsys.readouterr()
    check = [*TINY_RUN, "--set", f"run.out_dir='{out}'", "--set", "train.max_steps=2", "--check"]
    assert main(check) == 0  # its own folder: the run would resume it
    assert main([*check, "--set", "local.context=E"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "local.context = \"R0\" there, \"E\" here" in error
    assert [step for step, _ in checkpoint.complete_sets(out)] == [2]  # --check changed nothing


def test_resuming_a_finished_run_leaves_its_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert tiny_main(out, "train.max_steps=3") == 0
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert tiny_main(out, "train.max_steps=3", f"run.resume='{out}'") == 0
    said = capsys.readouterr().out
    assert "is at step 3, where this run ends" in said and "nothing to train" in said
    assert (out / "summary.json").read_bytes() == before


# Runs `python -m MODULE ARGS...` in one interpreter, then says whether torch was imported.
HELP_PROBE = """
import runpy, sys
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit:
    pass
print("torch loaded:", "torch" in sys.modules)
"""


def test_reading_a_config_table_needs_no_torch():
    """The launchers read rows and configs many times (launch/reproduce.sh): without torch, each read
    takes a fraction of a second instead of seconds; every network family's config is read."""
    configs = ["configs/published/cityscapes/infopro_k2.toml", "configs/published/imagenet/resnet101_e2e.toml",
               "configs/published/cifar10_resnet32/infopro_contrast_k4.toml"]
    probe = ("import sys; from pipeline.config.loading import load_config\n"
             f"for path in {configs!r}: load_config(path)\n"
             "print('torch loaded:', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch loaded: False"


@pytest.mark.parametrize("module, args, needles", [
    ("pipeline.train", ["--help"], ["--set local.modules=8", "read as TOML", "--check"]),
    ("pipeline.bench", ["--help"], ["--rounds ROUNDS", "(default: 3)", "(default: runs/bench)",
                                    "--set local.modules=8"]),
    ("pipeline.reproduce", ["collect", "--help"], ["(default: auto)"]),
])
def test_help_answers_without_torch_and_shows_defaults(module, args, needles):
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, module, *args], capture_output=True, text=True,
                          check=False, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m " + module)
    assert done.stdout.rstrip().endswith("torch loaded: False"), "--help must not wait for torch to import"
    text = " ".join(done.stdout.split())  # argparse wraps to the terminal width
    for needle in needles:
        assert needle in text


@pytest.mark.parametrize("args", [["--conf", "x.toml"], ["--se", "run.seed=1"], ["--chec"]],
                         ids=["conf", "se", "chec"])
def test_abbreviated_options_are_not_accepted(tmp_path, args):
    assert_one_line_error(train_cli(*args, cwd=tmp_path), f"unrecognized arguments: {args[0]}")


def test_check_prints_the_resolved_config_and_trains_nothing(tmp_path):
    out = tmp_path / "never"
    done = train_cli("--check", "--config", str(REPO / "configs/quickstart.toml"), "--set", "local.modules=8",
                     "--set", f"run.out_dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "local.modules = 8" in lines and 'data.name = "fashion_mnist"' in lines
    assert f"run.out_dir = {json.dumps(str(out))}" in lines
    assert not out.exists()
    # each line is itself a valid override
    config = parse_config([arg for line in lines for arg in ("--set", line.replace(" = ", "=", 1))])
    assert config.local.modules == 8 and config.local.context == "R1E"


def test_check_rejects_what_the_run_would_reject(tmp_path):
    done = train_cli("--check", "--config", str(REPO / "configs/quickstart.toml"), "--set", "run.mode=ddp",
                     cwd=tmp_path)
    assert_one_line_error(done, "run.mode = 'ddp'", "local.modules = 1")


def test_check_says_what_the_run_would_say_before_training(tmp_path, capsys):
    """A missing data folder fails --check as it fails the run (exit 2, one line); warnings print too."""
    missing = tmp_path / "nowhere"
    assert main(["--check", "--config", str(REPO / "configs/quickstart.toml"), "--set", f"data.root={missing}"]) == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"error: fashion_mnist: the folder {str(missing)!r} does not exist (data.root = {str(missing)!r}); "
                    "install Debian's package: apt-get install dataset-fashion-mnist (or set data.root to a folder "
                    "with the IDX files)")
    assert main(["--set", f"data.root={missing}", "--set", f"run.out_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().startswith(line)  # the run's line, before it reads anything
    assert main(["--check", "--no-data-check", "--set", f"data.root={missing}"]) == 0  # what the launchers run
    capsys.readouterr()
    assert main(["--check", "--set", "data.name=synthetic", "--set", "pipeline.queue_depth=4"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("warning: pipeline.queue_depth has no effect with run.mode = 'sequential' (no links "
                            "between stages)\n")
    assert "pipeline.queue_depth = 4" in captured.out.splitlines()


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C during training step ``step`` (1-based), as the terminal's SIGINT raises it."""
    from pipeline.runtime.report import RunReport

    trained = RunReport.trained

    def trained_then_interrupted(report, *args, **kwargs):
        trained(report, *args, **kwargs)
        if report.steps == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunReport, "trained", trained_then_interrupted)


@pytest.mark.slow
def test_an_interrupted_run_says_what_was_saved_and_a_rerun_never_mixes_two_attempts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    command = ["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=128",
               "--set", "train.schedule=constant", "--set", "train.epochs=2", "--set", "train.max_steps=12",
               "--set", "run.log_every=2", "--set", f"run.out_dir={out}"]  # 8 batches an epoch: a set at step 8
    interrupt_at(monkeypatch, 3)
    assert main(command) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted: no checkpoint written yet (one is written at each epoch end, every run.checkpoint_every "
        "steps and when the run is stopped by run.stop_signal); the same command starts over")
    monkeypatch.undo()
    interrupt_at(monkeypatch, 11)
    assert main(command) == 1  # the same command started over: the first attempt's lines went
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the last complete checkpoint is step 8 ({out / 'checkpoints' / 'step_8'}); continue from it "
        f"by running the same command")
    monkeypatch.undo()
    assert main(command) == 0
    assert "removed 1 metrics.jsonl line(s) after step 8" in capsys.readouterr().out  # the attempt's step 10
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [line["step"] for line in train] == [2, 4, 6, 8, 10, 12]  # one history: each step once


def readme_setup() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Set up and run"):text.index("\n## ", text.index("## Set up and run") + 3)]


def test_readme_setup_uses_a_venv_and_installs_torch_before_the_package():
    setup = readme_setup()
    commands = [line.strip() for line in setup.splitlines() if line.strip().startswith(("python3 ", "pip ", "apt-get"))]
    assert "python3 -m venv .venv && . .venv/bin/activate" in commands
    cpu_torch = commands.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    package = commands.index("pip install -e .")
    assert commands.index("python3 -m venv .venv && . .venv/bin/activate") < cpu_torch < package
    assert commands.index("pip install torch") < package, "the GPU build, too, comes before the package"
    assert "Expect about 85 % test accuracy" in " ".join(setup.split())  # the figure a user checks their run by


def test_readme_quick_start_commands_parse(tmp_path):
    lines = [line.split("#")[0].split() for line in readme_setup().splitlines()
             if line.startswith("python -m pipeline.")]
    train = next(words for words in lines if words[2] == "pipeline.train")
    checked = train_cli(*train[3:], "--check", cwd=REPO)
    assert checked.returncode == 0 and "local.modules = 4" in checked.stdout, checked.stderr
    plot = next(words for words in lines if words[2] == "pipeline.plot")
    assert plot[3:] == ["runs/quickstart"], "plots the run.out_dir the quick start writes"
    assert 'run.out_dir = "runs/quickstart"' in checked.stdout
