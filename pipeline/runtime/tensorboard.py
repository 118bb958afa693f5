"""TensorBoard event files from the events a run logs to metrics.jsonl (run.tensorboard = true).

Each process writes under RUN_DIR/tensorboard/rank_<r>: TensorBoard reads one writer per folder
(two writers in one folder lose events), and it overlays the ranks as runs of one picture:
  tensorboard --logdir RUN_DIR/tensorboard
Needs the tensorboard package: pip install -e '.[tensorboard]'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import BadInput, writing

INSTALL = "pip install -e '.[tensorboard]' (or pip install tensorboard)"


class ScalarWriter(Protocol):
    """What the sink needs of torch.utils.tensorboard.SummaryWriter."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars(fields: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(tag, value, step) for one metrics.jsonl event; events and fields it does not chart give none.

    train: loss/module_<m>, train/lr and train/samples_per_s; eval: eval/test_accuracy and, for
    segmentation, eval/test_miou; stage: stage/busy_fraction/module_<m>.
    """
    event, step, module = fields.get("event"), int(fields.get("step", 0)), fields.get("module")
    found: list[tuple[str, float, int]] = []
    if event == "train":
        if "loss" in fields:
            found.append((f"loss/module_{module}", float(fields["loss"]), step))
        for key in ("lr", "samples_per_s"):
            if key in fields:
                found.append((f"train/{key}", float(fields[key]), step))
    elif event == "eval":
        for key in ("test_accuracy", "test_miou"):
            if fields.get(key) is not None:
                found.append((f"eval/{key}", float(fields[key]), step))
    elif event == "stage" and "busy_fraction" in fields:
        found.append((f"stage/busy_fraction/module_{module}", float(fields["busy_fraction"]), step))
    return found


class TensorBoardSink:
    """Takes the fields of each metrics.jsonl line (write(fields)) and adds them as TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, rank: int, writer: ScalarWriter | None = None, start_step: int = 0) -> None:
        self.log_dir = Path(run_dir) / "tensorboard" / f"rank_{rank}"
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise BadInput(f"run.tensorboard = true needs the tensorboard package: {INSTALL}; "
                               f"or set run.tensorboard = false") from None
            with writing(self.log_dir):
                # An earlier attempt's points past where this run starts are trained again: hidden, as
                # metrics.jsonl drops those lines (metrics.cut_metrics), so each step shows once.
                writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=start_step + 1)
        self.writer = writer
        # A sequential run logs lr and samples/s once per module for the same step: chart them once.
        self._last_step: dict[str, int] = {}

    # The event file is written by a background thread: its failure surfaces at the next call.
    def write(self, fields: dict[str, Any]) -> None:
        for tag, value, step in scalars(fields):
            if tag.startswith("train/"):
                if self._last_step.get(tag) == step:
                    continue
                self._last_step[tag] = step
            with writing(self.log_dir):
                self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        with writing(self.log_dir):
            self.writer.flush()

    def close(self) -> None:
        with writing(self.log_dir):
            self.writer.close()
