"""Stage loops in one process: the pipeline's schedule, control messages, failures and deadlines.

The equivalence cases mirror the torchrun ones in test_stage.py: K stage loops on threads,
built by the same ``assemble``, end with the sequential run's parameters and accuracy.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import (
    EQUIVALENCE_CASES,
    EQUIVALENCE_IDS,
    EQUIVALENCE_STEPS,
    assert_same_checkpoints,
    equivalence_overrides,
    load_module_state,
    max_state_difference,
    tiny_config,
)
from threaded import run_threaded

from pipeline.data.contract import WHOLE, Part
from pipeline.errors import StageFailure
from pipeline.runtime import checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.links import MemoryLink
from pipeline.runtime.messages import Eval, Message, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import EpochEnd, Position, RunLength
from pipeline.runtime.source import BatchSource
from pipeline.runtime.stage_loop import StageLoop

STEPS = EQUIVALENCE_STEPS


@pytest.mark.parametrize("modules, extra", EQUIVALENCE_CASES, ids=EQUIVALENCE_IDS)
def test_threaded_pipeline_equals_sequential(tmp_path: Path, single_thread: None,
                                             sequential_reference: Callable[[list[str]], tuple[Path, dict[str, Any]]],
                                             modules: int, extra: list[str]) -> None:
    overrides = equivalence_overrides(modules, extra)
    reference_dir, reference = sequential_reference(overrides)  # test_stage's reference too
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "run.mode=pipeline"))
    assert errors == [None] * modules
    assert_same_checkpoints(reference_dir, tmp_path / "threads", modules)
    summary = summaries[0]
    assert summary is not None and summaries[1:] == [None] * (modules - 1)  # rank 0 writes
    assert summary["steps"] == STEPS == reference["steps"]
    assert summary["test_accuracy"] == reference["test_accuracy"]
    assert [(s["stage"], s["replica"]) for s in summary["stages"]] == [(k, 0) for k in range(modules)]
    logged = [json.loads(line) for line in (tmp_path / "threads" / "metrics.jsonl").read_text().splitlines()]
    trained = {(line["module"], line["step"]) for line in logged if line["event"] == "train"}
    assert trained == {(module, step) for module in range(modules) for step in (4, 8, 12)}



@pytest.mark.slow
def test_resume_crosses_modes(tmp_path: Path, single_thread: None) -> None:
    """Sequential 5 steps -> pipeline to 9 -> sequential to 14 equals 14 straight steps."""
    common = ["local.modules=2", "local.context=R1", "local.reconstruct=true"]
    run(tiny_config(tmp_path, "straight", *common, "train.max_steps=14", "train.epochs=1"))
    run(tiny_config(tmp_path, "part1", *common, "train.max_steps=5"))
    _, errors = run_threaded(tiny_config(tmp_path, "part2", *common, "train.max_steps=9", "run.mode=pipeline",
                                         f"run.resume={tmp_path / 'part1'}"))
    assert errors == [None, None]
    run(tiny_config(tmp_path, "part3", *common, "train.max_steps=14", f"run.resume={tmp_path / 'part2'}"))
    for module in range(2):
        a, b = load_module_state(tmp_path / "straight", module), load_module_state(tmp_path / "part3", module)
        assert a["position"] == b["position"]
        assert max_state_difference(a["state"], b["state"]) <= 1e-5, f"module {module} differs"


# ---- the schedule, with mock stages ---------------------------------------------------------------


class FakeLoader:
    """Batches of labels only: what BatchSource needs to walk the events."""

    def __init__(self, batches: int, size: int) -> None:
        self.count, self.size = batches, size

    def __len__(self) -> int:
        return self.count

    def batch_samples(self, index: int) -> int:
        return self.size

    def batches(self, epoch: int, start: int = 0, part: Part = WHOLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in range(start, self.count):
            yield torch.full((self.size, 1), float(epoch * 100 + index)), torch.zeros(self.size, dtype=torch.int64)


class Recorder:
    """A mock module: records what it saw, passes it on (or fails, or stalls, on request)."""

    def __init__(self, fail_at: int = 0, stall_at: int = 0, stall_s: float = 0.0) -> None:
        self.seen: list[tuple[Any, ...]] = []
        self.fail_at, self.stall_at, self.stall_s = fail_at, stall_at, stall_s

    def handle(self, message: Message) -> Message | None:
        if isinstance(message, Train):
            self.seen.append(("train", message.epoch, message.step, float(message.packet.features[0, 0])))
            if message.step == self.fail_at:
                raise RuntimeError(f"boom at step {message.step}")
            if message.step == self.stall_at:
                time.sleep(self.stall_s)
        elif isinstance(message, Eval):
            self.seen.append(("eval", message.epoch))
        elif isinstance(message, EpochEnd):
            self.seen.append(("end", message.epoch, message.resume_at.step, message.final))
        else:
            self.seen.append(("stop",))
        return message


class NullReport:
    """The loop's report with nothing behind it: it only counts the calls."""

    def __init__(self) -> None:
        from pipeline.runtime.metrics import StageStats

        self.stats = StageStats(rank=0, module=0)
        self.trained_steps: list[int] = []
        self.ends = 0

    def trained(self, message: Train, seconds: float, waited: float, sent: float) -> None:
        self.trained_steps.append(message.step)

    def paused(self, seconds: float, evaluating: bool) -> None:
        pass

    def epoch_end(self, event: EpochEnd) -> None:
        self.ends += 1


def _chain(stages: list[Recorder], length: RunLength, start: Position | None = None, depth: int = 2,
           timeout_s: float = 5.0) -> tuple[list[NullReport], list[BaseException | None], float]:
    """Run mock stages on threads: stage 0 reads a BatchSource, the rest MemoryLinks."""
    links = [MemoryLink(k, k + 1, depth, timeout_s) for k in range(len(stages) - 1)]
    source = BatchSource(FakeLoader(length.batches, 4), FakeLoader(2, 3), start or Position(), length,  # type: ignore[arg-type]
                         WHOLE)
    reports = [NullReport() for _ in stages]
    errors: list[BaseException | None] = [None] * len(stages)

    def body(k: int) -> None:
        inbox = source if k == 0 else links[k - 1]
        outbox = links[k] if k < len(stages) - 1 else None
        try:
            StageLoop(inbox, [stages[k]], outbox, reports[k]).run()  # type: ignore[arg-type]
        except BaseException as err:  # noqa: BLE001 -- the harness reports every failure
            errors[k] = err
            for link in (links[k - 1] if k > 0 else None, outbox):
                if link is not None:
                    link.break_with(err)

    started = time.monotonic()
    threads = [threading.Thread(target=body, args=(k,)) for k in range(len(stages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a stage loop hangs"
    return reports, errors, time.monotonic() - started


def test_every_stage_sees_the_sequential_order() -> None:
    stages = [Recorder() for _ in range(3)]
    reports, errors, _ = _chain(stages, RunLength(epochs=2, batches=3, max_steps=5))
    assert errors == [None, None, None]
    expected = [
        ("train", 1, 1, 100.0), ("train", 1, 2, 101.0), ("train", 1, 3, 102.0),
        ("eval", 1), ("eval", 1), ("end", 1, 3, False),
        ("train", 2, 4, 200.0), ("train", 2, 5, 201.0),
        ("eval", 2), ("eval", 2), ("end", 2, 5, True), ("stop",),
    ]
    assert [stage.seen for stage in stages] == [expected] * 3
    assert [r.trained_steps for r in reports] == [[1, 2, 3, 4, 5]] * 3 and [r.ends for r in reports] == [2] * 3


def test_a_resumed_chain_starts_at_its_position() -> None:
    stages = [Recorder(), Recorder()]
    _chain(stages, RunLength(epochs=2, batches=3, max_steps=0), start=Position(epoch=2, batch=1, step=4))
    assert [item for item in stages[1].seen if item[0] == "train"] == [("train", 2, 5, 201.0), ("train", 2, 6, 202.0)]
    assert stages[1].seen[-2:] == [("end", 2, 6, True), ("stop",)]


def test_a_failing_stage_ends_its_neighbours_with_its_cause() -> None:
    stages = [Recorder(), Recorder(fail_at=3), Recorder()]
    _, errors, elapsed = _chain(stages, RunLength(epochs=5, batches=50, max_steps=0), timeout_s=20.0)
    assert isinstance(errors[1], RuntimeError) and "boom at step 3" in str(errors[1])
    for neighbour in (0, 2):
        err = errors[neighbour]
        assert isinstance(err, StageFailure) and "stage 1 failed" in str(err)
        assert err.__cause__ is errors[1]  # the cause travels with the failure
    assert elapsed < 10  # well before the 20 s deadline: the break is seen, not waited out
    assert stages[2].seen[-1] == ("train", 1, 2, 101.0)  # nothing after the failure got through


@pytest.mark.slow
def test_a_stalled_consumer_trips_the_producers_deadline() -> None:
    stages = [Recorder(), Recorder(stall_at=2, stall_s=3.0)]
    _, errors, _ = _chain(stages, RunLength(epochs=1, batches=20, max_steps=0), depth=1, timeout_s=0.5)
    assert isinstance(errors[0], StageFailure)
    assert "stage 1 took no message for 0.5 s (pipeline.timeout_s)" in str(errors[0])


@pytest.mark.slow
def test_a_stalled_producer_trips_the_consumers_deadline() -> None:
    stages = [Recorder(stall_at=2, stall_s=3.0), Recorder()]
    _, errors, _ = _chain(stages, RunLength(epochs=1, batches=20, max_steps=0), timeout_s=0.5)
    assert isinstance(errors[1], StageFailure)
    assert "no message from stage 0 for 0.5 s (pipeline.timeout_s)" in str(errors[1])


def test_the_queue_is_bounded() -> None:
    link = MemoryLink(0, 1, depth=2, timeout_s=0.2)
    packet = Packet(torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1))
    link.put(Train(1, 1, 1, packet))
    link.put(Train(1, 2, 1, packet))
    with pytest.raises(StageFailure, match="took no message"):
        link.put(Train(1, 3, 1, packet))
    assert [link.get().step for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    link.put(Stop())
    assert isinstance(link.get(), Stop)


@pytest.mark.slow
def test_a_stage_dying_between_two_modules_saves_leaves_the_last_complete_set(tmp_path, single_thread, monkeypatch):
    """Stage 0 saved step 12, stage 1 died saving it: no set at 12, and the resume equals a straight run."""
    overrides = ["local.modules=2", "data.batch_size=128", "train.epochs=2", f"train.max_steps={STEPS}",
                 "run.mode=pipeline"]  # 8 batches per epoch: sets at steps 8 and 12
    real, names = torch.save, []

    def save(obj, f, *args, **kwargs):
        names.append(Path(getattr(f, "name", f)).name)  # checkpoint.save passes an open file
        if sum(name.startswith("module_1.") for name in names) == 2:
            raise OSError(28, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    _, errors = run_threaded(tiny_config(tmp_path, "crashed", *overrides))
    monkeypatch.undo()
    assert isinstance(errors[1], StageFailure) and "no space left on device" in str(errors[1])
    assert errors[0] is not None  # stage 0 waited for stage 1's save and learnt it failed
    assert [step for step, _ in checkpoint.complete_sets(tmp_path / "crashed")] == [8]
    _, errors = run_threaded(tiny_config(tmp_path, "crashed", *overrides, f"run.resume={tmp_path / 'crashed'}"))
    assert errors == [None, None]
    run(tiny_config(tmp_path, "straight", *overrides[:-1]))
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "crashed", 2)


def test_a_pipeline_stage_that_cannot_write_its_checkpoint_names_the_file(tmp_path, single_thread, file_size_limit):
    """Module 1's 600 kB file passes the limit, module 0's 137 kB one does not: stage 1 names its file
    and the OS's reason (torch's zip writer reports it as a RuntimeError), nothing is half-written."""
    out = tmp_path / "limited"
    with file_size_limit(300 * 1024):
        _, errors = run_threaded(tiny_config(tmp_path, "limited", "local.modules=2", "data.batch_size=8",
                                             "train.max_steps=3", "run.mode=pipeline"))
    assert isinstance(errors[1], StageFailure)
    assert str(errors[1]).startswith(f"cannot write {out / 'checkpoints' / 'step_3' / 'module_1.pt'}: file too large")
    assert errors[0] is not None  # stage 0 waited for the set and learnt it failed
    assert checkpoint.complete_sets(out) == []
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]
