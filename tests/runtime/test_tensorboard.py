"""pipeline.runtime.tensorboard: metrics.jsonl events become TensorBoard scalars, read back from the event files."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import BadInput, StageFailure
from pipeline.runtime.tensorboard import TensorBoardSink, scalars

# What a K = 2 sequential run logs at steps 10 and 20: a train line per module (same lr and rate),
# an eval line, then each process's stage figures.
EVENTS = [
    {"event": "train", "rank": 0, "module": 0, "step": 10, "loss": 2.5, "lr": 0.1, "samples_per_s": 300.0},
    {"event": "train", "rank": 0, "module": 1, "step": 10, "loss": 2.25, "lr": 0.1, "samples_per_s": 300.0},
    {"event": "train", "rank": 0, "module": 0, "step": 20, "loss": 2.0, "lr": 0.05, "samples_per_s": 320.0},
    {"event": "train", "rank": 0, "module": 1, "step": 20, "loss": 1.75, "lr": 0.05, "samples_per_s": 320.0},
    {"event": "eval", "rank": 0, "module": 1, "epoch": 1, "step": 20, "test_accuracy": 0.625},
    {"event": "stage", "rank": 0, "module": 1, "step": 20, "busy_fraction": 0.875},
    {"event": "resume", "rank": 0, "step": 20},
]


class FakeWriter:
    def __init__(self) -> None:
        self.added: list[tuple[str, float, int | None]] = []
        self.closed = False

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.added.append((tag, scalar_value, global_step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_events_map_to_tags() -> None:
    assert scalars(EVENTS[0]) == [("loss/module_0", 2.5, 10), ("train/lr", 0.1, 10),
                                  ("train/samples_per_s", 300.0, 10)]
    assert scalars(EVENTS[4]) == [("eval/test_accuracy", 0.625, 20)]
    segmentation = {"event": "eval", "step": 7, "test_accuracy": 0.9, "test_miou": 0.5, "test_iou": [0.5, None]}
    assert scalars(segmentation) == [("eval/test_accuracy", 0.9, 7), ("eval/test_miou", 0.5, 7)]
    assert scalars({**segmentation, "test_miou": None}) == [("eval/test_accuracy", 0.9, 7)]
    assert scalars(EVENTS[5]) == [("stage/busy_fraction/module_1", 0.875, 20)]
    assert scalars(EVENTS[6]) == []


def test_lr_and_rate_are_charted_once_per_step(tmp_path: Path) -> None:
    writer = FakeWriter()
    sink = TensorBoardSink(tmp_path, 0, writer)
    for event in EVENTS:
        sink.write(event)
    sink.close()
    tags = [tag for tag, _, _ in writer.added]
    assert tags.count("train/lr") == 2 and tags.count("train/samples_per_s") == 2
    assert tags.count("loss/module_0") == 2 and tags.count("loss/module_1") == 2
    assert writer.closed and sink.log_dir == tmp_path / "tensorboard" / "rank_0"


def test_a_resumed_run_hides_the_earlier_attempts_points_past_its_start(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardSink(tmp_path, 0)
    for step in (10, 20, 30):
        first.write({"event": "train", "module": 0, "step": step, "loss": float(step)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = TensorBoardSink(tmp_path, 0, start_step=20)
    resumed.write({"event": "train", "module": 0, "step": 30, "loss": -1.0})
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard" / "rank_0"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss/module_0")] == [(10, 10.0), (20, 20.0), (30, -1.0)]


def test_event_files_read_back_with_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path, 1)
    for event in EVENTS:
        sink.write(event)
    sink.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard" / "rank_1"))
    accumulator.Reload()
    assert {"loss/module_0", "loss/module_1", "train/lr", "train/samples_per_s", "eval/test_accuracy",
            "stage/busy_fraction/module_1"} <= set(accumulator.Tags()["scalars"])
    assert [(e.step, e.value) for e in accumulator.Scalars("loss/module_1")] == [(10, 2.25), (20, 1.75)]
    assert [(e.step, e.value) for e in accumulator.Scalars("train/lr")] == [(10, pytest.approx(0.1)),
                                                                             (20, pytest.approx(0.05))]
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/test_accuracy")] == [(20, 0.625)]


def test_missing_tensorboard_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now raises ImportError
    with pytest.raises(BadInput, match=r"needs the tensorboard package: pip install -e '\.\[tensorboard\]'"):
        TensorBoardSink(tmp_path, 0)
    assert not (tmp_path / "tensorboard").exists()


def test_a_run_with_run_tensorboard_writes_what_metrics_jsonl_holds(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config.loading import load_config
    from pipeline.runtime.assemble import run

    run(load_config(None, ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu",
                           "local.modules=2", "run.log_every=2", "train.max_steps=4", "run.tensorboard=true",
                           f"run.out_dir='{tmp_path}'"]))
    accumulator = EventAccumulator(str(tmp_path / "tensorboard" / "rank_0"))
    accumulator.Reload()
    assert {"loss/module_0", "loss/module_1", "train/lr", "eval/test_accuracy",
            "stage/busy_fraction/module_0"} <= set(accumulator.Tags()["scalars"])
    assert [e.step for e in accumulator.Scalars("loss/module_1")] == [2, 4]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # tensorboard's thread dies
def test_an_event_file_that_cannot_be_written_names_its_folder(tmp_path: Path, file_size_limit) -> None:
    """The event file is written by tensorboard's background thread: its failure surfaces at the next call."""
    before = set(threading.enumerate())
    sink = TensorBoardSink(tmp_path, 0)
    with file_size_limit(4096), pytest.raises(StageFailure) as caught:
        for step in range(1, 2001):
            sink.write({**EVENTS[0], "step": step})
        sink.flush()
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'tensorboard' / 'rank_0'}: file too large")
    for thread in set(threading.enumerate()) - before:  # its writer thread ends here, not in a later test
        thread.join(10)
