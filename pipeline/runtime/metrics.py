"""What a run reports: metrics.jsonl lines, per-process stage figures, summary.json, progress."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config.cuts import written_cuts
from pipeline.config.schema import Config, LocalConfig
from pipeline.errors import StageFailure, writing
from pipeline.model.methods.registry import method_named
from pipeline.runtime.metrics_files import metrics_file, metrics_files


class EventSink(Protocol):
    def write(self, fields: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Appends one JSON object per line; the ranks of one host append whole lines to the same file.

    A sink (TensorBoard, pipeline/runtime/tensorboard.py) gets the same events as they are written.
    """

    def __init__(self, run_dir: str | Path, rank: int, sink: EventSink | None = None, node: int = 0) -> None:
        self.path = metrics_file(run_dir, node)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.sink = sink

    def write(self, **fields: Any) -> None:
        event = {"rank": self.rank, "time": round(time.time(), 3), **fields}
        with writing(self.path), open(self.path, "a") as handle:  # one write per line: O_APPEND keeps lines whole
            handle.write(json.dumps(event) + "\n")
        if self.sink is not None:
            self.sink.write(event)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def cut_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the metrics lines after ``step`` (all of them at step 0, and a line cut short), in every
    host's file, before a run that starts at ``step`` appends its own: they belong to an attempt
    whose history this run replaces (an interrupted or restarted one), and one file holds one
    history. Returns how many lines went."""
    return sum(_cut_file(path, step) for path in metrics_files(run_dir))


def _cut_file(path: Path, step: int) -> int:
    kept, dropped = [], 0
    with writing(path):
        for line in path.read_text().splitlines():
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = None
            logged = item.get("step", 0) if isinstance(item, dict) else None
            if step > 0 and isinstance(logged, int) and logged <= step:
                kept.append(line)
            elif line.strip():
                dropped += 1
        if dropped:
            temporary = path.with_suffix(".tmp")
            temporary.write_text("".join(f"{line}\n" for line in kept))
            temporary.replace(path)
    return dropped


def peak_resident_bytes(status: Path = Path("/proc/self/status")) -> int:
    """This program's peak resident memory. Linux keeps getrusage's ru_maxrss across execve, so a run
    launched by a large parent (the benchmark, which profiles the network first) would report the parent's
    peak; VmHWM belongs to the address space exec made. ru_maxrss where there is no /proc."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class DeviceMemory:
    """A process's memory figures over its training loop, from ``start`` on.

    GPU: ``peak_mem_bytes`` is the allocator's peak minus what was allocated at ``start`` (the
    resident data set and the weights held before training do not count: the loop's own
    activations, gradients and optimizer state do); ``peak_reserved_bytes`` the caching
    allocator's peak reserved (everything it held, those included); ``device_used_bytes`` what the
    device holds when asked (``torch.cuda.mem_get_info``: the CUDA context, NCCL's buffers and
    any other process on the GPU included, none of which the allocator sees). CPU: the process's
    peak resident set for all three (it cannot be reset).
    """

    device: torch.device
    held_at_start: int = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.held_at_start = int(torch.cuda.memory_allocated(self.device))

    def figures(self) -> dict[str, int]:
        if self.device.type != "cuda":
            resident = peak_resident_bytes()
            return {"peak_mem_bytes": resident, "peak_reserved_bytes": resident, "device_used_bytes": resident}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(self.device)) - self.held_at_start,
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                "device_used_bytes": int(total - free)}


@dataclass
class StageStats:
    """Seconds one process spent computing and waiting on its links while training.

    Compute is timed around each training step: on the host clock on CPU, with CUDA events on
    a GPU (read only when a figure is asked for, so the hot path never waits for the device).
    """

    rank: int
    module: int | str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    recv_wait_s: float = 0.0
    send_wait_s: float = 0.0
    samples: int = 0
    train_s: float = 0.0  # wall time spent in training epochs (evaluation excluded)
    _compute_s: float = 0.0
    _logged_compute_s: float = 0.0
    _started: Any = None
    _events: list[Any] = field(default_factory=list)
    memory: DeviceMemory = field(init=False)

    def __post_init__(self) -> None:
        self.memory = DeviceMemory(self.device)

    def begin_compute(self) -> None:
        if self.device.type == "cuda":
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record()
        else:
            self._started = time.perf_counter()

    def end_compute(self) -> None:
        if self.device.type == "cuda":
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._events.append((self._started, ended))
        else:
            self._compute_s += time.perf_counter() - self._started

    @property
    def compute_s(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._compute_s += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
            self._events.clear()
        return self._compute_s

    def window_compute_s(self) -> float:
        """Compute seconds since the previous call: one timed window's worth."""
        total = self.compute_s
        window, self._logged_compute_s = total - self._logged_compute_s, total
        return round(window, 5)

    def report(self) -> dict[str, Any]:
        wall = max(self.train_s, 1e-9)
        return {
            "rank": self.rank,
            "module": self.module,
            "compute_s": round(self.compute_s, 4),
            "recv_wait_s": round(self.recv_wait_s, 4),
            "send_wait_s": round(self.send_wait_s, 4),
            "busy_fraction": round(min(1.0, self.compute_s / wall), 4),
            **self.memory.figures(),
            "samples_per_s": round(self.samples / wall, 2),
        }


def method_name(local: LocalConfig) -> str:
    if local.modules == 1:
        return "e2e"
    if local.context != "R0":
        return "contsup"
    if local.reconstruct:
        return "infopro"
    method = method_named(local.loss)
    if method.standalone:
        return method.summary_name
    return "greedy_sl" if local.aux.startswith("0c") else "dgl"


def write_summary(run_dir: str | Path, config: Config, world_size: int, cuts: list[int], steps: int,
                  epochs_done: int, scores: dict[str, Any], train_samples: int, train_s: float,
                  wall_s: float, stages: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {
        "mode": config.run.mode,
        "world_size": world_size,
        "modules": config.local.modules,
        "method": method_name(config.local),
        "context": config.local.context,
        "loss": method_named(config.local.loss).summary_name,
        "aux": config.local.aux,
        "reconstruct": config.local.reconstruct,
        "arch": config.model.arch,
        "dataset": config.data.name,
        "batch_size": config.data.batch_size,
        "steps": steps,
        "epochs": epochs_done,
        # test_accuracy (pixel accuracy for segmentation, with test_miou and per-class test_iou): None
        # when nothing was evaluated
        "test_accuracy": None,
        **scores,
        "train_samples_per_s": round(train_samples / max(train_s, 1e-9), 2),
        "wall_s": round(wall_s, 3),
        "cut_points": written_cuts(cuts, config.arch),
        "stages": stages,
        "config": config.to_dict(),
    }
    return save_summary(run_dir, summary)


def save_summary(run_dir: str | Path, summary: dict[str, Any]) -> dict[str, Any]:
    """RUN_DIR/summary.json, whole or not at all: a reader never sees half a file."""
    path = Path(run_dir) / "summary.json"
    temporary = path.with_suffix(".tmp")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(summary, indent=2) + "\n")
            temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return summary


def percent(fraction: float) -> str:
    """Accuracy as people read it, with the same digits on the console, in bench.md and docs/measurements.md."""
    return f"{100.0 * fraction:.2f} %"


class Progress:
    """Step, per-module losses, samples/s and ETA: the rate of the samples trained since the last
    line; the ETA from a smoothed rate, so one slow window does not swing it."""

    SMOOTHING = 0.3  # weight of the newest window in the ETA's rate

    def __init__(self, label: str, first_step: int, total_steps: int) -> None:
        self.label = label
        self.total = total_steps
        self.mark_time = time.perf_counter()
        self.samples = 0  # trained since the last line
        self.steps = 0
        self.smoothed: float | None = None  # samples/s

    def advance(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (evaluation, checkpoints) out of the next rate."""
        self.mark_time += seconds

    def seconds_since_line(self) -> float:
        return time.perf_counter() - self.mark_time

    def line(self, epoch: int, step: int, losses: list[float]) -> tuple[str, float]:
        now = time.perf_counter()
        rate = self.samples / max(now - self.mark_time, 1e-9)
        per_step = self.samples / max(self.steps, 1)
        self.smoothed = rate if self.smoothed is None else self.SMOOTHING * rate + (1 - self.SMOOTHING) * self.smoothed
        self.mark_time, self.samples, self.steps = now, 0, 0
        eta = max(self.total - step, 0) * per_step / max(self.smoothed, 1e-9)  # a buffered module may pass the total
        text = " ".join(f"{loss:.3f}" for loss in losses)
        return (f"[{self.label}] epoch {epoch} step {step}/{self.total} | loss {text} | "
                f"{rate:.0f} samples/s | eta {_clock(eta)}"), rate


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


class LossMeter:
    """Sums losses on the device; reading them (one host sync) happens only at log time.

    Each module's mean is over its own steps: in the buffered schedule modules take different numbers.
    """

    def __init__(self, modules: list[int]) -> None:
        self.modules = modules
        self.sums: list[torch.Tensor | float] = [0.0] * len(modules)
        self.counts = [0] * len(modules)

    @property
    def count(self) -> int:
        """Steps since the last read, of the module that took most."""
        return max(self.counts)

    def add(self, slot: int, loss: torch.Tensor) -> None:
        self.sums[slot] = self.sums[slot] + loss.float()
        self.counts[slot] += 1

    def means(self, step: int) -> list[float]:
        """Mean loss per module since the last call; a diverged loss stops the run."""
        values = [float(total) / max(count, 1) for total, count in zip(self.sums, self.counts)]
        self.sums = [0.0] * len(self.sums)
        self.counts = [0] * len(self.counts)
        for module, value in zip(self.modules, values):
            if not math.isfinite(value):
                raise StageFailure(
                    f"module {module}'s loss is {value} by step {step}; lower train.lr or check the data"
                )
        return values
