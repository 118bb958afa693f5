"""The run plan: what the benchmark was asked, which runs it makes, and in which order they run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """What the command line asked for."""

    config_path: str | None
    sets: list[str]
    nproc: int
    steps: int
    window: int
    rounds: int


@dataclass(frozen=True)
class BenchRun:
    name: str
    mode: str
    processes: int
    modules: int
    schedule: str = ""  # classic_pp rows: the torch.distributed.pipelining schedule (gpipe, 1f1b)
    microbatches: int = 0  # classic_pp rows: microbatches per batch
    segments: int = 0  # ddp_checkpointed rows: precision.checkpoint_segments

    @property
    def replicas(self) -> int:
        """Copies of the pipeline the processes hold (DDP's K = 1 x R = N; one process holds the one copy)."""
        return max(1, self.processes // self.modules)


CLASSIC_MICROBATCHES = (2, 4, 8)


def plan_runs(nproc: int) -> list[BenchRun]:
    """E2E, DDP (K = 1 x R = N), sequential and pipeline (K = N x R = 1), then every other K x R = N."""
    mixed = [BenchRun(f"pipeline_k{k}xr{nproc // k}", "pipeline", nproc, k)
             for k in range(2, nproc) if nproc % k == 0]
    return [
        BenchRun("e2e", "sequential", 1, 1),
        BenchRun("ddp", "ddp", nproc, 1),
        BenchRun("sequential", "sequential", 1, nproc),
        BenchRun("pipeline", "pipeline", nproc, nproc),
        *mixed,
    ]


def checkpointed_runs(nproc: int, segments: Sequence[int]) -> list[BenchRun]:
    """DDP over the same N processes with the E2E network's blocks recomputed over S segments, each S."""
    return [BenchRun(f"ddp_checkpointed_s{count}", "ddp", nproc, 1, segments=count) for count in segments]


def bracketing_segments(memory: dict[int, int], target: int) -> list[int]:
    """The segment counts whose activation memory brackets ``target``: the fewest segments that fit under it
    and the count below, which does not; with none fitting, the count that takes the least."""
    fitting = [count for count in sorted(memory) if memory[count] <= target]
    if not fitting:
        return [min(memory, key=lambda count: memory[count])]
    first = fitting[0]
    return [first - 1, first] if first - 1 in memory else [first]


def classic_runs(nproc: int, microbatches: Sequence[int]) -> list[BenchRun]:
    """The same network end to end under torch.distributed.pipelining: GPipe and 1F1B, each M."""
    return [BenchRun(f"classic_{kind}_m{count}", "classic_pp", nproc, nproc, kind, count)
            for kind in ("gpipe", "1f1b") for count in microbatches]


def every_run(nproc: int, microbatches: Sequence[int] = (), segments: Sequence[int] = ()) -> list[BenchRun]:
    """Every run of one round, in the order it runs them."""
    return plan_runs(nproc) + checkpointed_runs(nproc, segments) + classic_runs(nproc, microbatches)


def schedule(nproc: int, rounds: int, microbatches: Sequence[int] = (),
             segments: Sequence[int] = ()) -> list[tuple[int, BenchRun]]:
    """(round, run) in the order they run: round 1 runs every mode, then round 2, ... (ABAB)."""
    runs = every_run(nproc, microbatches, segments)
    return [(number, run) for number in range(1, rounds + 1) for run in runs]
