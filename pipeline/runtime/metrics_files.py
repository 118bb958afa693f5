"""Where a run's metrics lines live: one file per host (no torch: the plotting tool reads them)."""

from __future__ import annotations

import re
from pathlib import Path

METRICS = "metrics.jsonl"
_NODE_FILE = re.compile(r"metrics\.node(\d+)\.jsonl")


def metrics_file(run_dir: str | Path, node: int = 0) -> Path:
    """Where the processes of host ``node`` append their lines: metrics.jsonl on rank 0's host,
    metrics.node<N>.jsonl on the others (appends from several hosts to one file on a shared file
    system are not atomic: NFS can interleave or lose them)."""
    return Path(run_dir) / (METRICS if node == 0 else f"metrics.node{node}.jsonl")


def metrics_files(run_dir: str | Path) -> list[Path]:
    """Every host's metrics file of a run, rank 0's first (a one-host run has metrics.jsonl alone)."""
    run_dir = Path(run_dir)
    nodes = sorted((int(match.group(1)), path) for path in run_dir.glob("metrics.node*.jsonl")
                   if (match := _NODE_FILE.fullmatch(path.name)))
    return [path for path in [run_dir / METRICS, *(path for _, path in nodes)] if path.is_file()]
