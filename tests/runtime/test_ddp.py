"""DDP over gloo equals one process that averages the gradients of the same batch shards."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from distributed_helpers import (
    DDP_STEPS,
    SHARED_JOBS,
    assert_same_checkpoints,
    load_module_state,
    max_state_difference,
    tiny_config,
    torchrun,
)

from pipeline.config.loading import load_config
from pipeline.data.loader import make_loaders
from pipeline.errors import BadInput
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.runtime.data_parallel import DataParallel
from pipeline.runtime.messages import Eval
from pipeline.runtime.packet import Packet
from pipeline.runtime.stage_loop import ModuleStage
from pipeline.runtime.topology import Solo, Topology
from pipeline.runtime.worker import make_worker

WORLD, DDP_JOB = SHARED_JOBS["ddp"]
STEPS = DDP_STEPS


def emulate_ddp(tmp: Path) -> dict[str, object]:
    """Per-shard batch norm, mean of the shard gradients, running statistics from shard 0."""
    config = tiny_config(tmp, "reference")
    device = torch.device("cpu")
    train, _ = make_loaders(config.data, config.model, config.run.seed, device)
    layout = make_layout(config, train.spec, resolve_cuts(config, train.spec, device))
    worker = make_worker(config, layout, 0, device)
    module, optimizer = worker.module, worker.optimizer
    worker.at_step(1, 1)
    module.train()
    for images, labels in itertools.islice(train.batches(1), STEPS):
        optimizer.zero_grad()
        kept: dict[str, torch.Tensor] = {}
        for rank, (x, y) in enumerate(zip(images.tensor_split(WORLD), labels.tensor_split(WORLD))):
            if rank == 1:
                kept = {name: buffer.clone() for name, buffer in module.named_buffers()}
            _, _, loss = module(Packet.from_batch(x, y))
            (loss / WORLD).backward()
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(kept[name])
        optimizer.step()
    return worker.state_dict()


@pytest.fixture(scope="module")
def ddp_run(pipeline_job: Callable[[int, list[str]], Path]) -> Path:
    """One DDP job of WORLD processes, STEPS steps (a set at step 3 too): the tests below read its outputs."""
    return pipeline_job(WORLD, DDP_JOB)


@pytest.mark.slow
def test_ddp_matches_single_process(ddp_run: Path, tmp_path: Path, single_thread: None) -> None:
    out = ddp_run
    saved = load_module_state(out, 0)
    assert saved["position"]["step"] == STEPS
    assert max_state_difference(emulate_ddp(tmp_path), saved["state"]) <= 1e-5
    assert not checkpoint.module_file(checkpoint.find_set(out), 1).exists()


@pytest.mark.slow
def test_a_ddp_job_started_again_resumes_by_itself_mid_epoch(ddp_run: Path, tmp_path: Path) -> None:
    """As a kill right after the set of step 3 leaves it: the same command goes on from there, bit for bit."""
    killed = tmp_path / "killed"
    shutil.copytree(ddp_run, killed)
    (killed / "summary.json").unlink()
    shutil.rmtree(checkpoint.step_dir(killed, STEPS))
    done = torchrun(WORLD, [f"run.out_dir={killed}", *DDP_JOB])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {checkpoint.step_dir(killed, 3)} at epoch 1, batch 3 (step 3)" in done.stdout
    assert_same_checkpoints(ddp_run, killed, 1)


def test_ddp_refuses_local_modules() -> None:
    """Refused where every process reads the config (how such a line ends a torchrun job: test_stage.py's
    test_world_size_must_be_k_times_r)."""
    with pytest.raises(BadInput, match=re.escape("run.mode = 'ddp' trains end to end; set local.modules = 1")):
        load_config(None, ["run.mode=ddp", "local.modules=2"])


class RecordingCollectives(Solo):
    def __init__(self) -> None:
        self.broadcast: list[int] = []

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        self.broadcast.append(tensor.data_ptr())


def test_replicas_evaluate_with_replica_0_buffers(tmp_path: Path) -> None:
    """At the switch from training to evaluation every buffer is broadcast from replica 0, once."""
    config = tiny_config(tmp_path, "unit")
    device = torch.device("cpu")
    test = make_loaders(config.data, config.model, config.run.seed, device)[1]
    layout = make_layout(config, test.spec, resolve_cuts(config, test.spec, device))
    worker = make_worker(config, layout, 0, device)
    comm = RecordingCollectives()
    topology = Topology(3, 4, device, 1, 4, (0,), comm=comm)
    stage = ModuleStage(worker, 0, None, None, DataParallel(topology).adopt_replica_0_buffers)  # type: ignore[arg-type]
    images, labels = next(iter(test.batches(0)))
    worker.module.train()
    stage.handle(Eval(1, Packet.from_batch(images, labels)))
    stage.handle(Eval(1, Packet.from_batch(images, labels)))  # still evaluating: nothing more to sync
    buffers = [buffer.data_ptr() for buffer in worker.module.buffers()]
    assert buffers and comm.broadcast == buffers


@pytest.mark.slow  # reads the torchrun job of the slow tests above
def test_ddp_accuracy_is_replica_0s_model_on_the_whole_test_set(ddp_run: Path, tmp_path: Path,
                                                                single_thread: None) -> None:
    """Each replica evaluates its shard of the test set with replica 0's statistics: the summed count
    is what replica 0's checkpoint scores alone. (On this tiny synthetic run the drift of replica 1's
    statistics rarely flips a prediction, so the unit test above is the one that catches a missing sync.)"""
    out = ddp_run
    config = tiny_config(tmp_path, "check")
    device = torch.device("cpu")
    test = make_loaders(config.data, config.model, config.run.seed, device)[1]
    layout = make_layout(config, test.spec, resolve_cuts(config, test.spec, device))
    worker = make_worker(config, layout, 0, device)
    worker.load_state_dict(load_module_state(out, 0)["state"])  # type: ignore[arg-type]
    correct = sum(int(worker.eval_step(Packet.from_batch(x, y))) for x, y in test.batches(0))  # type: ignore[call-overload]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(correct / test.samples, abs=1e-9)


def test_stage_figures_report_allocated_and_reserved_peaks() -> None:
    from pipeline.runtime.metrics import StageStats

    stats = StageStats(0, 0)
    stats.memory.start()  # CPU: nothing to reset, the resident-set peak stays
    report = stats.report()
    assert report["peak_mem_bytes"] > 0 and report["peak_reserved_bytes"] >= report["peak_mem_bytes"]
    assert report["device_used_bytes"] == report["peak_mem_bytes"]


def test_gpu_peak_leaves_out_what_was_allocated_at_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mocked torch.cuda: 3 GiB resident at the start (data set, weights), the allocator's peak 5 GiB
    later: the loop's peak is 2 GiB; the device's own figure (context, NCCL) comes from mem_get_info."""
    from pipeline.runtime.metrics import DeviceMemory

    gib = 1 << 30
    state = {"allocated": 3 * gib, "peak": 7 * gib}

    def reset(device: torch.device) -> None:
        state["peak"] = state["allocated"]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 6 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    memory = DeviceMemory(torch.device("cuda", 0))
    memory.start()
    state["peak"] = 5 * gib
    assert memory.figures() == {"peak_mem_bytes": 2 * gib, "peak_reserved_bytes": 6 * gib,
                                "device_used_bytes": 10 * gib}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_peaks_start_after_set_up() -> None:
    from pipeline.runtime.metrics import StageStats

    device = torch.device("cuda")
    resident = torch.empty(64 << 20, dtype=torch.uint8, device=device)  # a resident data set: 64 MiB
    stats = StageStats(0, 0, device)
    stats.memory.start()
    step = torch.empty(1 << 20, dtype=torch.uint8, device=device)
    report = stats.report()
    assert (1 << 20) <= report["peak_mem_bytes"] < (2 << 20)  # the step's MiB, not the data set's
    assert report["peak_reserved_bytes"] >= (65 << 20) and report["device_used_bytes"] > report["peak_reserved_bytes"]
    del step, resident
