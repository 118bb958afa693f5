"""The buffered schedule: a pipeline run, replayed in one process from its record, ends equal.

Stage loops on threads (the same ``assemble`` as under torchrun, in-memory links) and one small
torchrun job record which buffered batch each module trained on; sequential mode (replay.py)
replays the record and must end with the same parameters and test accuracy. A straggler makes
the record interesting: modules downstream of a slow one reuse batches, the slow one skips some.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import load_module_state, max_state_difference, tiny_config, torchrun
from threaded import run_threaded

from pipeline.errors import BadInput, Preempted
from pipeline.runtime import assemble, checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.preemption import StopFlag
from pipeline.runtime.run_order import Position, RunLength
from pipeline.runtime.schedule_trace import read_schedule
from pipeline.runtime.schedules import Ended, Trained, seeded_schedule
from pipeline.runtime.topology import Topology

# 16 batches of 64 per epoch: an epoch end with evaluation at step 16, the run's end at 20.
BUFFERED = ["data.batch_size=64", "train.epochs=2", "train.max_steps=20", "pipeline.schedule=buffered",
            "pipeline.buffer_batches=3"]

# (K, overrides, a module that reuses batches, a module that skips some): a straggler sets both.
CASES = [
    (2, ["local.context=E", "local.reconstruct=true", "pipeline.slowdown=[2.0, 1.0]"], 1, None),
    (3, ["local.context=R1E", "local.reconstruct=true", "pipeline.slowdown=[1.0, 2.5, 1.0]",
         "pipeline.max_reuse=4"], 2, 1),
]


def schedule_lines(run_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == "schedule"]


def assert_replay_equal(tmp_path: Path, recorded: str, modules: int, overrides: list[str],
                        accuracy: float | None) -> None:
    replayed = run(tiny_config(tmp_path, "replayed", *overrides, "run.mode=sequential",
                               f"pipeline.replay={tmp_path / recorded / 'metrics.jsonl'}"))
    assert replayed is not None and replayed["test_accuracy"] == accuracy
    for module in range(modules):
        a = load_module_state(tmp_path / recorded, module)
        b = load_module_state(tmp_path / "replayed", module)
        assert a["position"] == b["position"]
        assert max_state_difference(a["state"], b["state"]) == 0.0, f"module {module} differs"  # bit for bit on CPU
    # The replay records the same schedule it replayed.
    def steps(name: str) -> list[str]:
        lines = schedule_lines(tmp_path / name)
        return sorted(json.dumps({k: v for k, v in line.items() if k not in ("rank", "time")}) for line in lines)
    assert steps(recorded) == steps("replayed")


@pytest.mark.slow
@pytest.mark.parametrize("modules, extra, reuses, skips", CASES, ids=["K2-E-decoder", "K3-R1E-decoder-reuse4"])
def test_threaded_buffered_run_replays_to_the_same_parameters(tmp_path: Path, single_thread: None, modules: int,
                                                              extra: list[str], reuses: int,
                                                              skips: int | None) -> None:
    overrides = [f"local.modules={modules}", *BUFFERED, *extra]
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "run.mode=pipeline"))
    assert errors == [None] * modules
    summary = summaries[0]
    assert summary is not None
    plans = read_schedule(tmp_path / "threads" / "metrics.jsonl", modules)
    assert [item for item in plans[0] if isinstance(item, Trained)] == [Trained(step, 1) for step in range(1, 21)]
    for plan in plans:
        assert [item for item in plan if isinstance(item, Ended)] == [Ended(1), Ended(2)]  # every module evaluated
    used = [[item for item in plan if isinstance(item, Trained)] for plan in plans]
    # Not lockstep: a module faster than the one before it reuses batches; a slow one skips some.
    assert max(item.use for item in used[reuses]) > 1
    if skips is not None:
        assert len({item.entry for item in used[skips]}) < len(used[skips - 1])
    if modules == 3:
        assert max(item.use for plan in used[1:] for item in plan) <= 4  # pipeline.max_reuse
    assert_replay_equal(tmp_path, "threads", modules, overrides, summary["test_accuracy"])


@pytest.mark.slow
def test_torchrun_buffered_run_replays_to_the_same_parameters(tmp_path: Path) -> None:
    overrides = ["local.modules=2", *BUFFERED, "local.context=R1E", "pipeline.slowdown=[1.0, 2.0]",
                 "run.mode=pipeline", f"run.out_dir={tmp_path / 'torchrun'}"]
    done = torchrun(2, overrides, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    plans = read_schedule(tmp_path / "torchrun" / "metrics.jsonl", 2)
    assert len([item for item in plans[0] if isinstance(item, Trained)]) == 20
    assert len({item.entry for item in plans[1] if isinstance(item, Trained)}) < 20  # the slow stage skips some
    assert_replay_equal(tmp_path, "torchrun", 2, [o for o in overrides if not o.startswith("run.")],
                        summary["test_accuracy"])


@pytest.mark.slow
def test_a_buffered_run_resumes_at_an_epoch_end(tmp_path: Path, single_thread: None) -> None:
    """The buffers are not saved: the resumed run starts them empty, each module counting from the step."""
    overrides = ["local.modules=2", *BUFFERED, "local.context=R1", "run.mode=pipeline"]
    _, errors = run_threaded(tiny_config(tmp_path, "first", *overrides))
    assert errors == [None, None]
    _, errors = run_threaded(tiny_config(tmp_path, "resumed", *overrides, f"run.resume={tmp_path / 'first'}",
                                         "run.resume_step=16"))
    assert errors == [None, None]
    for module in range(2):
        assert load_module_state(tmp_path / "resumed", module)["position"] == \
            load_module_state(tmp_path / "first", module)["position"]
    lines = schedule_lines(tmp_path / "resumed")
    assert [line["step"] for line in lines if line["module"] == 0 and "entry" in line] == [17, 18, 19, 20]
    first = min(line["step"] for line in lines if line["module"] == 1 and "entry" in line)
    assert first == 17 and all(line["entry"] >= 17 for line in lines if "entry" in line)  # nothing from before


@pytest.mark.slow
def test_the_seeded_order_is_reproducible_and_replays(tmp_path: Path, single_thread: None) -> None:
    overrides = ["local.modules=3", *BUFFERED, "local.context=R1", "pipeline.slowdown=[1.0, 1.5, 1.0]"]
    first = run(tiny_config(tmp_path, "seeded", *overrides))
    second = run(tiny_config(tmp_path, "seeded_again", *overrides))
    assert first is not None and second is not None
    assert first["test_accuracy"] == second["test_accuracy"]
    for module in range(3):
        a, b = load_module_state(tmp_path / "seeded", module), load_module_state(tmp_path / "seeded_again", module)
        assert max_state_difference(a["state"], b["state"]) == 0.0
    assert_replay_equal(tmp_path, "seeded", 3, overrides, first["test_accuracy"])


def test_seeded_speeds_set_the_step_counts() -> None:
    """A module twice as slow as its upstream takes about half its steps, the one after it reuses them."""
    plans = seeded_schedule(Position(), RunLength(epochs=1, batches=400, max_steps=0), 3, [1.0, 2.0, 1.0],
                            capacity=30, max_reuse=0, seed=3)
    steps = [sum(isinstance(item, Trained) for item in plan) for plan in plans]
    assert steps[0] == 400 and 180 <= steps[1] <= 220 and steps[2] >= 380
    assert max(item.use for item in plans[2] if isinstance(item, Trained)) >= 2
    assert all(plan[-1] == Ended(1) for plan in plans)
    limited = seeded_schedule(Position(), RunLength(1, 400, 0), 3, [1.0, 2.0, 1.0], 30, max_reuse=1, seed=3)
    assert all(item.use == 1 for plan in limited for item in plan if isinstance(item, Trained))


def test_a_record_of_another_config_is_refused(tmp_path: Path) -> None:
    record = tmp_path / "metrics.jsonl"
    record.write_text(json.dumps({"event": "schedule", "module": 1, "step": 1, "entry": 99, "use": 1}) + "\n")
    config = tiny_config(tmp_path, "bad", "local.modules=2", *BUFFERED, f"pipeline.replay={record}")
    with pytest.raises(BadInput, match="module 0: expected Trained"):
        run(config)
    with pytest.raises(BadInput, match="names module 1, but local.modules = 1|needs local.modules >= 2"):
        read_schedule(record, 1)
    with pytest.raises(BadInput, match="cannot be read"):
        read_schedule(tmp_path / "missing.jsonl", 2)
    record.write_text(json.dumps({"event": "schedule", "module": 0, "step": 1, "entry": 1}) + "\n")
    with pytest.raises(BadInput, match="line 1 is not a schedule record"):
        read_schedule(record, 2)


def test_an_unreadable_record_is_refused_before_the_out_dir_is_touched(tmp_path: Path) -> None:
    """The record is read before a start clears what an earlier attempt left in run.out_dir."""
    config = tiny_config(tmp_path, "kept", "local.modules=2", *BUFFERED, f"pipeline.replay={tmp_path / 'missing'}")
    left = Path(config.run.out_dir) / "metrics.jsonl"
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    with pytest.raises(BadInput, match="cannot be read"):
        run(config)
    assert left.read_text() == json.dumps({"event": "train", "step": 1}) + "\n"


def test_a_record_over_two_hosts_is_read_from_both_files(tmp_path: Path) -> None:
    """Module 1 ran on the second host: naming the run's metrics.jsonl replays both modules."""
    def record(module: int) -> str:
        return "".join(json.dumps({"event": "schedule", "module": module, "step": step, "entry": step, "use": 1}) + "\n"
                       for step in (1, 2))

    (tmp_path / "metrics.jsonl").write_text(record(0))
    (tmp_path / "metrics.node1.jsonl").write_text(record(1))
    plans = read_schedule(tmp_path / "metrics.jsonl", 2)
    assert plans == [[Trained(1, 1), Trained(2, 1)]] * 2
    (tmp_path / "metrics.node1.jsonl").write_text(record(1).replace('"step": 2', '"step": 3'))
    with pytest.raises(BadInput, match=r"metrics\.node1\.jsonl line 2: module 1 step 3 does not follow step 1"):
        read_schedule(tmp_path / "metrics.jsonl", 2)


def test_data_replicas_are_refused_with_the_buffered_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WORLD_SIZE = 2K gives R = 2 by default: one line, before any data is read or any group formed."""
    def four_processes(*args: object, **kwargs: object) -> Topology:
        return Topology(0, 4, torch.device("cpu"), 2, 2, (0,))

    monkeypatch.setattr(assemble, "from_env", four_processes)
    config = tiny_config(tmp_path, "replicas", "local.modules=2", *BUFFERED, "run.mode=pipeline")
    with pytest.raises(BadInput, match="runs one chain, but there are 2 replicas"):
        run(config)


class StopsAfter(StopFlag):
    """A stop signal that arrives once the first stage has asked ``polls`` times."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls = polls

    def __bool__(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_a_stop_signal_ends_a_replayed_run_at_a_set_not_as_a_record_mismatch(tmp_path: Path, single_thread: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    @contextlib.contextmanager
    def signalled(name: str) -> Iterator[StopFlag]:
        yield StopsAfter(4)

    monkeypatch.setattr(assemble, "stop_signal", signalled)
    config = tiny_config(tmp_path, "stopped", *BUFFERED, "local.modules=2")
    with pytest.raises(Preempted, match="stopped by SIGTERM after step"):
        run(config)
    steps = [step for step, _ in checkpoint.complete_sets(tmp_path / "stopped")]
    assert len(steps) == 1 and 0 < steps[0] < 20
