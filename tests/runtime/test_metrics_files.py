"""Metrics lines of a job over several hosts: one file per host, read back together."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.runtime.metrics import MetricsLog, cut_metrics
from pipeline.runtime.metrics_files import metrics_file, metrics_files


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_host_appends_to_its_own_file(tmp_path: Path) -> None:
    """Appends from several hosts to one file on NFS are not atomic: no two hosts share a file."""
    for rank, node in [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]:
        MetricsLog(tmp_path, rank, node=node).write(event="train", step=1)
    assert [line["rank"] for line in lines(tmp_path / "metrics.jsonl")] == [0, 1]
    assert [line["rank"] for line in lines(tmp_path / "metrics.node1.jsonl")] == [2, 3]
    assert [line["rank"] for line in lines(tmp_path / "metrics.node2.jsonl")] == [4]
    assert metrics_file(tmp_path) == tmp_path / "metrics.jsonl"


def test_every_hosts_file_is_found_rank_0s_first_then_by_host_number(tmp_path: Path) -> None:
    for name in ["metrics.node10.jsonl", "metrics.node2.jsonl", "metrics.jsonl", "metrics.nodeX.jsonl",
                 "metrics.node1.jsonl.tmp"]:
        (tmp_path / name).write_text("")
    assert [path.name for path in metrics_files(tmp_path)] == ["metrics.jsonl", "metrics.node2.jsonl",
                                                               "metrics.node10.jsonl"]
    assert metrics_files(tmp_path / "missing") == []


def test_a_restart_cuts_every_hosts_file(tmp_path: Path) -> None:
    for node in (0, 1):
        log = MetricsLog(tmp_path, node, node=node)
        for step in (4, 8, 12):
            log.write(event="train", step=step)
    assert cut_metrics(tmp_path, 8) == 2
    assert [line["step"] for line in lines(tmp_path / "metrics.jsonl")] == [4, 8]
    assert [line["step"] for line in lines(tmp_path / "metrics.node1.jsonl")] == [4, 8]
