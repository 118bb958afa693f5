"""torchrun --max-restarts: ranks SIGKILLed three times (once in the middle of a save) and the job still ends
bit for bit where the uninterrupted one does; a SIGTERM ends every stage at one set, exit 3, and the same
command goes on. The costly tests of the suite: one K = 2 and one K x R = 2 x 2 job killed, one K = 2 job
stopped, a few dozen tiny steps each."""

from __future__ import annotations

import functools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from distributed_helpers import RESTARTED_JOB, SHARED_JOBS, assert_same_checkpoints, torchrun_command

from pipeline.runtime import checkpoint

SLOW_SAVE = Path(__file__).resolve().parent / "slow_save"  # its sitecustomize widens saves to 0.3 s on request
REPO = Path(__file__).resolve().parents[2]
JOB = RESTARTED_JOB  # 64 batches of 16 per epoch: 80 steps cross an epoch end; a set every 4 steps
SEQUENTIAL = [*JOB, "run.mode=sequential"]  # JOB in one process: the reference of the K = 2 pipelines
RESUMED = re.compile(r"\[stage 0( replica 0)?\] resumed from .* \(step (\d+)\)")
TRAINING = re.compile(r"\[stage 0( replica 0)?\] epoch \d+ step (\d+)/")
T = TypeVar("T")


@dataclass
class Console:
    """torchrun's output as it comes, each line with the time it came."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    def read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append((time.monotonic(), line))

    def after(self, since: float, pattern: re.Pattern[str]) -> tuple[float, re.Match[str]] | None:
        for when, line in list(self.lines):
            found = pattern.search(line)
            if when >= since and found:
                return when, found
        return None

    def last_step(self) -> int:
        steps = [int(found.group(2)) for _, line in list(self.lines) if (found := TRAINING.search(line))]
        return max(steps, default=0)


@dataclass
class Restart:
    killed_at_step: int  # the newest step stage 0 had reported
    resumed_at_step: int
    seconds_to_training: float  # from the kill to stage 0's first reported step of the next attempt
    mid_save: bool


def workers(agent: psutil.Process) -> list[psutil.Process]:
    return [child for child in agent.children() if "pipeline.train" in " ".join(child.cmdline())]


def stop_job(job: subprocess.Popen[str]) -> None:
    """A job a test gave up on: its workers first (a SIGKILLed agent leaves them running), then the agent."""
    if job.poll() is None:
        for worker in workers(psutil.Process(job.pid)):
            worker.kill()
        job.kill()
        job.wait()


def wait_for(condition: Callable[[], T | None], what: str, timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def temporary_file(out: Path) -> Path | None:
    """A module file being written: its writer's pid ends its name (checkpoint._atomic_write)."""
    return next(iter(sorted((out / "checkpoints").glob("step_*/module_*.pt.tmp*"))), None)


def newer_set(out: Path, step: int) -> int | None:
    """The newest complete set's step where it is past ``step``."""
    sets = checkpoint.complete_sets(out)
    return sets[-1][0] if sets and sets[-1][0] > step else None


def killed_job(out: Path, processes: int, overrides: list[str], kills: int = 3,
               seed: int = 0) -> tuple[subprocess.CompletedProcess[str], list[Restart]]:
    """The job under torchrun --max-restarts ``kills``, a random worker SIGKILLed ``kills`` times (the second
    one while a module file is being written); each kill waits for the previous restart to train."""
    rng = random.Random(seed)
    command = torchrun_command(processes, [*overrides, f"run.out_dir={out}"], options=(f"--max-restarts={kills}",))
    slow_saves = out.parent / f"{out.name}.slow_saves"  # while it exists, each save takes 0.3 s (slow_save/)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_SAVE_WHILE": str(slow_saves),
           "PYTHONPATH": os.pathsep.join([str(SLOW_SAVE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = Console()
    reader = threading.Thread(target=console.read, args=(job.stdout,), daemon=True)
    reader.start()
    agent, restarts, since, resumed_at = psutil.Process(job.pid), [], 0.0, 0
    try:
        for kill in range(kills):
            wait_for(functools.partial(console.after, since, TRAINING), "the attempt to train")
            wait_for(functools.partial(newer_set, out, resumed_at), "a set newer than the one the attempt resumed from")
            mid_save = kill == 1
            if mid_save:
                slow_saves.touch()
                writing = wait_for(functools.partial(temporary_file, out), "a checkpoint being written")
                victim = psutil.Process(int(str(writing).rsplit(".tmp", 1)[1]))
            else:
                time.sleep(rng.uniform(0.0, 1.0))
                victim = rng.choice(workers(agent))
            killed_at = console.last_step()
            victim.kill()
            slow_saves.unlink(missing_ok=True)
            since = time.monotonic()
            resumed = wait_for(functools.partial(console.after, since, RESUMED), "the restarted job to resume")
            training = wait_for(functools.partial(console.after, resumed[0], TRAINING), "the restarted job to train")
            resumed_at = int(resumed[1].group(2))
            restarts.append(Restart(killed_at, resumed_at, training[0] - since, mid_save))
        job.wait(timeout=300)
    finally:
        stop_job(job)
    reader.join(timeout=10)
    output = "".join(line for _, line in console.lines)
    return subprocess.CompletedProcess(command, job.returncode, output, ""), restarts


def check_restarts(done: subprocess.CompletedProcess[str], restarts: list[Restart]) -> None:
    assert done.returncode == 0, done.stdout[-3000:]
    assert restarts and any(restart.mid_save for restart in restarts)
    for restart in restarts:
        assert restart.resumed_at_step % 4 == 0 or restart.resumed_at_step == 64  # a save point or the epoch end
        # Lost: the steps since the newest complete set (4 apart), and while the last stage is still writing
        # its share of the next set, the steps stage 0 went on with (up to a set and the links' queues).
        assert restart.killed_at_step - restart.resumed_at_step <= 2 * 4 + 2 * 2, restart


@pytest.mark.slow
def test_a_pipeline_killed_three_times_ends_equal_to_the_straight_run(
        tmp_path: Path, single_thread: None, sequential_reference: Callable[[list[str]], tuple[Path, Any]]) -> None:
    done, restarts = killed_job(tmp_path / "killed", 2, JOB)
    check_restarts(done, restarts)
    reference, _ = sequential_reference(SEQUENTIAL)  # pipeline == sequential bit for bit
    assert_same_checkpoints(tmp_path / "killed", reference, 2)
    assert [step for step, _ in checkpoint.complete_sets(tmp_path / "killed")][-1] == 80


@pytest.mark.slow
def test_a_k_by_r_job_killed_three_times_ends_equal_to_the_straight_job(
        tmp_path: Path, pipeline_job: Callable[[int, list[str]], Path]) -> None:
    processes, overrides = SHARED_JOBS["K2xR2 straight, as the killed one"]  # JOB for 40 steps
    done, restarts = killed_job(tmp_path / "killed", processes, overrides, seed=1)
    check_restarts(done, restarts)
    assert_same_checkpoints(tmp_path / "killed", pipeline_job(processes, overrides), 2)


@pytest.mark.slow
def test_a_sigterm_to_every_rank_ends_them_at_one_set_and_the_same_command_goes_on(
        tmp_path: Path, single_thread: None, sequential_reference: Callable[[list[str]], tuple[Path, Any]]) -> None:
    """A preemption: SIGTERM to every worker (torchrun's agent, signalled itself, passes it on the same way;
    its own report then names no exit codes, so the workers are signalled here to see theirs)."""
    out = tmp_path / "preempted"
    command = torchrun_command(2, [*JOB, f"run.out_dir={out}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = Console()
    reader = threading.Thread(target=console.read, args=(job.stdout,), daemon=True)
    reader.start()
    try:
        wait_for(functools.partial(console.after, 0.0, re.compile(r"\[stage 0\] epoch 1 step 6/")), "training")
        for worker in workers(psutil.Process(job.pid)):
            worker.send_signal(signal.SIGTERM)
        job.wait(timeout=60)
    finally:
        stop_job(job)
    reader.join(timeout=10)
    said = "".join(line for _, line in console.lines)
    stopped = [int(step) for step in re.findall(r"stopped by SIGTERM after step (\d+)", said)]
    assert len(stopped) == 2 and stopped[0] == stopped[1] < 80, said[-3000:]  # both stages, at one step
    assert job.returncode != 0 and "exitcode  : 3" in said, said[-3000:]  # torchrun's report of its workers
    assert [step for step, _ in checkpoint.complete_sets(out)][-1] == stopped[0]
    assert not (out / "summary.json").exists()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped[0]}'}" in again.stdout
    reference, _ = sequential_reference(SEQUENTIAL)  # the killed pipeline's reference too
    assert_same_checkpoints(out, reference, 2)


if __name__ == "__main__":  # the closing note's figures: python tests/runtime/test_restarts.py OUT PROCESSES KILLS
    target, processes, kills = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    job = [*JOB, f"train.max_steps={20 * kills + 40}", f"train.epochs={kills + 2}"]
    done, restarts = killed_job(target, processes, job, kills=kills)
    for restart in restarts:
        print(restart)
    print(f"exit {done.returncode}; {len(restarts)} restarts; kill -> training again "
          f"{min(r.seconds_to_training for r in restarts):.1f}..{max(r.seconds_to_training for r in restarts):.1f} s; "
          f"steps lost {min(r.killed_at_step - r.resumed_at_step for r in restarts)}.."
          f"{max(r.killed_at_step - r.resumed_at_step for r in restarts)}")
