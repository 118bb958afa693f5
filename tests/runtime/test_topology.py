"""The K x R layout, the jobs that do not fit, GPU checks before any process group, group deadlines."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.config.loading import load_config
from pipeline.errors import BadInput
from pipeline.runtime import host
from pipeline.runtime.host import cpu_share, profiling_device, resolve_device
from pipeline.runtime.topology import Topology, from_env, layout_replicas, place, process_groups, single_process


@pytest.mark.parametrize("placement, expected", [
    ("chain", [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]),  # each replica's chain together
    ("stage", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),  # each stage's replicas together
])
def test_rank_to_stage_and_replica(placement: str, expected: list[tuple[int, int]]) -> None:
    assert [place(rank, 3, 2, placement) for rank in range(6)] == expected
    topologies = [Topology(rank, 6, None, 3, 2, (expected[rank][0],), placement=placement)  # type: ignore[arg-type]
                  for rank in range(6)]
    for rank, topology in enumerate(topologies):
        assert (topology.stage, topology.replica) == expected[rank]
        assert topology.rank_of(*expected[rank]) == rank
        assert topology.writer == (expected[rank][1] == 0)
    assert topologies[0].last_rank == expected.index((2, 0))


def test_hosts_are_numbered_in_rank_order() -> None:
    """Which metrics file a process appends to (pipeline/runtime/metrics_files.py): rank 0's host is 0."""
    processes = [("b", 10), ("b", 11), ("a", 12), ("a", 13), ("c", 14)]
    nodes = [Topology(rank, 5, torch.device("cpu"), 5, 1, (rank,), processes=processes).node for rank in range(5)]
    assert nodes == [0, 0, 1, 1, 2]
    assert Topology(0, 1, torch.device("cpu"), 2, 1, (0, 1)).node == 0  # one process: no host list


def test_replicas_are_derived_or_checked() -> None:
    assert layout_replicas(8, 2, 0) == 4 and layout_replicas(8, 2, 4) == 4 and layout_replicas(3, 3, 0) == 1
    with pytest.raises(BadInput, match="WORLD_SIZE is 6, not a multiple of local.modules = 4"):
        layout_replicas(6, 4, 0)
    with pytest.raises(BadInput, match=r"pipeline.replicas = 3 x local.modules = 2 needs WORLD_SIZE = 6, but it is 8"):
        layout_replicas(8, 2, 3)


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, size: int, local_size: int) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", size), ("LOCAL_RANK", rank % local_size),
                        ("LOCAL_WORLD_SIZE", local_size)):
        monkeypatch.setenv(name, str(value))


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def _no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a GPU check must come before any process group")
    monkeypatch.setattr(dist, "init_process_group", refuse)


@pytest.mark.parametrize("mode, modules", [("pipeline", 4), ("ddp", 1)])
def test_more_processes_on_a_node_than_gpus_is_bad_input(monkeypatch: pytest.MonkeyPatch, mode: str,
                                                          modules: int) -> None:
    _gpus(monkeypatch, 2)
    _no_process_group(monkeypatch)
    _torchrun_env(monkeypatch, 1, 4, 4)
    config = load_config(None, ["run.device=auto", f"local.modules={modules}"])
    with pytest.raises(BadInput, match=r"4 processes on this node \(LOCAL_WORLD_SIZE\) but 2 GPU\(s\) visible"):
        from_env(mode, config.run, config.pipeline, modules)
    _torchrun_env(monkeypatch, 1, 4, 2)  # two nodes of two GPUs each: fine
    topology = from_env(mode, config.run, config.pipeline, modules)
    assert topology.device == torch.device("cuda", 1)


def test_bf16_on_a_gpu_without_bf16_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 1, bf16=False)
    _no_process_group(monkeypatch)
    _torchrun_env(monkeypatch, 0, 1, 1)
    config = load_config(None, ["precision.amp=bf16", "local.modules=1"])
    with pytest.raises(BadInput, match="precision.amp = 'bf16' but this GPU has no bf16 support"):
        from_env("ddp", config.run, config.pipeline, 1, config.precision.amp)
    with pytest.raises(BadInput, match="no bf16 support"):
        single_process(config.run, 1, "bf16")
    assert single_process(config.run, 1, "none").device.type == "cuda"
    assert resolve_device("cpu", amp="bf16") == torch.device("cpu")  # CPU autocast has bf16


def test_cuda_with_every_gpu_hidden_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(BadInput, match="CUDA_VISIBLE_DEVICES is empty, which hides every GPU"):
        resolve_device("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(BadInput, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_tool_profiles_on_a_gpu_where_there_is_one_and_refuses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner and the bench profile in their own process: a run.device = 'cuda' config is planned
    on the CPU of a host without GPUs (a run of it, resolve_device, is refused), 'cpu' stays on the CPU."""
    _gpus(monkeypatch, 0)
    assert [profiling_device(wanted).type for wanted in ("auto", "cuda", "cpu")] == ["cpu", "cpu", "cpu"]
    _gpus(monkeypatch, 2)
    assert [profiling_device(wanted).type for wanted in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]


def test_a_process_takes_its_share_of_the_cores_it_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cores of the process's affinity mask, not the machine's: a job pinned to 4 of 64 cores gives each of
    its 2 processes 2 threads; pipeline.threads_per_stage, where set, wins; never fewer than one."""
    monkeypatch.setattr(host, "_available_cores", lambda: [8, 9, 10, 11])
    assert [cpu_share(processes, 0) for processes in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert cpu_share(2, 3) == 3


@pytest.mark.slow
def test_bad_gpu_input_exits_2_with_one_line(tmp_path: Path) -> None:
    """run.device = cuda with CUDA_VISIBLE_DEVICES empty, through the command line: one line, exit 2."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--set", "run.device=cuda", "--set",
                           "data.name=synthetic", "--set", f"run.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "CUDA_VISIBLE_DEVICES is empty" in done.stderr


def test_every_group_gets_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """process_groups passes pipeline.timeout_s + 60 s to the job and to every link and replica group."""
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init", k["timeout"])))
    monkeypatch.setattr(dist, "new_group", lambda ranks, **k: calls.append((f"group {ranks}", k.get("timeout")))
                        or object())
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "all_gather_object", lambda every, item, **k: every.__setitem__(slice(None), [item] * 4))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: None)
    monkeypatch.setattr(dist, "recv", lambda tensor, src, group: None)
    topology = Topology(1, 4, torch.device("cpu"), 2, 2, (1,))
    with process_groups(topology, 37.0) as joined:
        assert set(joined.links) == {0} and joined.replica_group is not None
        assert len(joined.processes) == 4 and joined.processes[1][1] == os.getpid()  # where each rank runs
    deadline = datetime.timedelta(seconds=37 + 60)  # the links' deadline fires first, then the groups'
    assert calls == [("init", deadline), ("group [0, 1]", deadline), ("group [2, 3]", deadline),
                     ("group [0, 2]", deadline), ("group [1, 3]", deadline)]


def test_each_link_is_warmed_up_once_in_chain_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middle stage of a 3-stage chain (replica 1, chain placement: ranks 3, 4, 5) first receives
    from module 0 on link 0, then sends to module 2 on link 1: NCCL's pair communicators exist before
    the courier starts, and no two ranks wait on each other in a cycle."""
    calls: list[tuple[str, int, str]] = []
    monkeypatch.setattr(dist, "recv", lambda tensor, src, group: calls.append(("recv", src, group)))
    monkeypatch.setattr(dist, "send", lambda tensor, dst, group: calls.append(("send", dst, group)))
    from pipeline.runtime.topology import warm_links

    middle = Topology(4, 6, torch.device("cpu"), 3, 2, (1,), links={0: "link 0", 1: "link 1"})  # type: ignore[dict-item]
    warm_links(middle)
    assert calls == [("recv", 3, "link 0"), ("send", 5, "link 1")]
    calls.clear()
    warm_links(Topology(0, 6, torch.device("cpu"), 3, 2, (0,), links={0: "link 0"}))  # type: ignore[dict-item]
    warm_links(Topology(2, 6, torch.device("cpu"), 3, 2, (2,), links={1: "link 1"}))  # type: ignore[dict-item]
    assert calls == [("send", 1, "link 0"), ("recv", 1, "link 1")]
