"""Mid-epoch checkpoint sets (run.checkpoint_every, run.checkpoint_minutes, run.stop_signal) and a job that
resumes by itself from its own out_dir: every mode picks up bit for bit where the uninterrupted run goes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from distributed_helpers import assert_same_checkpoints, tiny_config
from threaded import run_threaded

from pipeline.cli import EXIT_PREEMPTED
from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.data.contract import WHOLE
from pipeline.data.loader import make_loaders
from pipeline.errors import BadInput
from pipeline.runtime import checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.messages import Stop, Train
from pipeline.runtime.preemption import AGREE_EVERY, SaveRequests, StopFlag
from pipeline.runtime.run_order import Position, RunLength, SavePoint, TrainStep, events
from pipeline.runtime.source import BatchSource
from pipeline.train import prepare_out_dir

REPO = Path(__file__).resolve().parents[2]
# 1024 synthetic samples / 128 = 8 batches per epoch: sets at steps 3 and 6 inside epoch 1, 8 at its
# end, 9 inside epoch 2, 12 at the run's end.
MID_EPOCH = ["data.batch_size=128", "train.epochs=2", "train.max_steps=12", "run.checkpoint_every=3",
             "run.keep_checkpoints=5"]


def test_save_points_fall_every_n_steps_but_not_where_a_set_is_written_anyway() -> None:
    found = [(type(e).__name__, e.resume_at.step) for e in events(Position(), 2, 4, 7, every=2)
             if not isinstance(e, TrainStep)]
    assert found == [("SavePoint", 2), ("EpochEnd", 4), ("SavePoint", 6), ("EpochEnd", 7)]
    resumed = [e for e in events(Position(1, 2, 2), 2, 4, 7, every=2) if isinstance(e, SavePoint)]
    assert resumed == [SavePoint(Position(2, 2, 6))]  # the next batch to train after step 6


def test_requests_follow_the_clock_the_flag_and_the_other_replicas() -> None:
    now = [0.0]
    flag = StopFlag()
    alone = SaveRequests(flag, minutes=1.0, agree=None, device=torch.device("cpu"), clock=lambda: now[0])
    assert alone.poll(1) == (False, False)
    now[0] = 61.0
    assert alone.poll(2) == (True, False)
    alone.saved()
    assert alone.poll(3) == (False, False)
    other_replica = torch.tensor([1, 1])  # another replica of the first stage got the signal
    replicated = SaveRequests(flag, 0.0, lambda votes: votes + other_replica, torch.device("cpu"))
    assert replicated.poll(AGREE_EVERY - 1) == (False, False)  # replicas agree only every AGREE_EVERY steps
    assert replicated.poll(AGREE_EVERY) == (True, True)
    flag.raised.set()
    assert alone.poll(4) == (True, True)


def test_a_stop_request_ends_the_run_after_a_save_point(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "source", "data.batch_size=128")
    train, test = make_loaders(config.data, config.model, config.run.seed, torch.device("cpu"))
    flag = StopFlag()
    requests = SaveRequests(flag, 0.0, None, torch.device("cpu"))
    source = BatchSource(train, test, Position(), RunLength(2, len(train), 0), WHOLE, every=0, requests=requests)
    kinds = []
    for _ in range(3):
        message = source.get()
        assert isinstance(message, Train)
        kinds.append(message.step)
    flag.raised.set()
    assert source.get() == SavePoint(Position(1, 3, 3))
    assert source.get() == Stop(preempted=True)
    assert kinds == [1, 2, 3]


def straight_and_killed(tmp_path: Path, name: str, overrides: list[str], run_job: Callable[[Config], object],
                        killed_after: int) -> tuple[Path, Path]:
    """The uninterrupted run, and a copy of it as a kill right after the set of step ``killed_after`` leaves it
    (later sets and the summary gone), resumed by itself with the same config."""
    straight = tiny_config(tmp_path, f"{name}-straight", *overrides)
    run_job(straight)
    killed = tmp_path / f"{name}-killed"
    shutil.copytree(straight.run.out_dir, killed)
    (killed / "summary.json").unlink()
    for step, folder in checkpoint.complete_sets(killed):
        if step > killed_after:
            shutil.rmtree(folder)
    again = tiny_config(tmp_path, f"{name}-killed", *overrides)
    with prepare_out_dir(again) as claimed:
        assert claimed.run.resume == str(killed)  # its own folder, its own config: resumed, nothing to add
        run_job(claimed)
    return Path(straight.run.out_dir), killed


def no_step_twice(run_dir: Path) -> None:
    """Two attempts' lines never mix: each (event, module, step) is logged once."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(line["event"], line.get("module"), line.get("step")) for line in lines if line["event"] == "train"]
    assert keys and len(keys) == len(set(keys))


@pytest.mark.slow
def test_a_sequential_run_resumed_mid_epoch_by_itself_equals_the_straight_run(tmp_path: Path,
                                                                               single_thread: None) -> None:
    straight, killed = straight_and_killed(tmp_path, "seq", ["local.modules=2", *MID_EPOCH], run, killed_after=6)
    assert [step for step, _ in checkpoint.complete_sets(straight)] == [3, 6, 8, 9, 12]
    assert_same_checkpoints(straight, killed, 2)
    no_step_twice(killed)


def threaded(config: Config) -> None:
    _, errors = run_threaded(config)
    assert errors == [None] * config.local.modules, errors


@pytest.mark.slow
def test_a_pipeline_resumed_mid_epoch_by_itself_equals_the_straight_run(tmp_path: Path, single_thread: None) -> None:
    overrides = ["local.modules=3", "local.context=R1", "run.mode=pipeline", *MID_EPOCH]
    straight, killed = straight_and_killed(tmp_path, "pipe", overrides, threaded, killed_after=9)
    assert_same_checkpoints(straight, killed, 3)
    no_step_twice(killed)


@pytest.mark.slow
def test_a_buffered_pipeline_resumes_by_itself_from_a_save_point(tmp_path: Path, single_thread: None) -> None:
    """Buffered modules each run at their own pace: a set is a consistent snapshot, not a replayable one."""
    overrides = ["local.modules=2", "run.mode=pipeline", "pipeline.schedule=buffered", "pipeline.buffer_batches=3",
                 *MID_EPOCH]
    _, killed = straight_and_killed(tmp_path, "buffered", overrides, threaded, killed_after=3)
    assert [step for step, _ in checkpoint.complete_sets(killed)][-1] == 12
    assert (killed / "summary.json").is_file()  # it ran to its end


def test_timed_sets_are_complete_and_leave_the_result_alone(tmp_path: Path, single_thread: None) -> None:
    """run.checkpoint_minutes so short that the clock asks before every step: a set at every step."""
    common = ["local.modules=2", "train.max_steps=4", "run.keep_checkpoints=10"]
    run(tiny_config(tmp_path, "straight", *common))
    run(tiny_config(tmp_path, "timed", *common, "run.checkpoint_minutes=1e-9"))
    assert [step for step, _ in checkpoint.complete_sets(tmp_path / "timed")] == [1, 2, 3, 4]
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "timed", 2)


def test_another_config_in_the_folder_is_refused_with_the_keys_that_differ(tmp_path: Path) -> None:
    first = tiny_config(tmp_path, "run", "local.modules=2", "train.max_steps=3")
    run(first)
    def outputs() -> list[tuple[Path, int]]:  # what the run wrote; .lock is the job's lock, taken by each start
        return sorted((path, path.stat().st_mtime_ns) for path in Path(first.run.out_dir).rglob("*")
                      if path.name != ".lock")

    listing = outputs()
    other = tiny_config(tmp_path, "run", "local.modules=2", "train.max_steps=3", "train.lr=0.2",
                        "run.checkpoint_every=2")  # how often it saves is no difference; the rate is
    refusal = r"train.lr = 0.05 there, 0.2 here\); run its config to continue"
    with pytest.raises(BadInput, match=refusal) as err, prepare_out_dir(other):
        pass
    assert "\n" not in str(err.value) and "run.overwrite = true" in str(err.value)
    assert outputs() == listing


def train_overrides(out: Path) -> list[str]:
    return ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=16", "run.log_every=2",
            "train.schedule=constant", "train.lr=0.05", "local.modules=2", "train.epochs=1", "train.max_steps=60",
            f"run.out_dir={out}"]


def train_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *(arg for item in train_overrides(out) for arg in ("--set", item))]


def start(command: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_training(process: subprocess.Popen[str], out: Path) -> None:
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run never began training"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stop_signal_leaves_a_set_and_exit_3_and_the_restart_ends_equal(tmp_path: Path, single_thread: None) -> None:
    stopped = start(train_command(tmp_path / "stopped"))
    wait_for_training(stopped, tmp_path / "stopped")
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=60)
    assert stopped.returncode == EXIT_PREEMPTED, err
    steps = [step for step, _ in checkpoint.complete_sets(tmp_path / "stopped")]
    assert len(steps) == 1 and 0 < steps[0] < 60, steps
    assert f"after step {steps[0]}" in err.splitlines()[-1] and "start the same command again" in err
    assert not (tmp_path / "stopped" / "summary.json").exists()
    again = start(train_command(tmp_path / "stopped"))
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints' / f'step_{steps[0]}'}" in out
    assert run(load_config(None, train_overrides(tmp_path / "straight"))) is not None  # one thread, as the CLI's
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "stopped", 2)


def test_a_second_signal_ends_the_process_unless_it_is_the_same_stop_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)
    now = [100.0]
    flag = StopFlag(clock=lambda: now[0])
    flag.handle(signal.SIGTERM, None)
    assert flag
    now[0] += 0.01  # the same stop again: Slurm signalled torchrun's agent too, which passes it on
    flag.handle(signal.SIGTERM, None)
    now[0] += StopFlag.REPEAT_AFTER_S
    with pytest.raises(SystemExit) as left:
        flag.handle(signal.SIGTERM, None)
    assert left.value.code == 128 + signal.SIGTERM
