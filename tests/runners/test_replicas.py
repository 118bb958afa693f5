"""K stages x R replicas over gloo equal one process that averages, per module, the gradients of
the same R batch shards (generalising DDP's equivalence to every K)."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import load_module_state, max_state_difference, tiny_config, torchrun

from pipeline.data.loader import make_loaders
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.packet import Packet
from pipeline.worker import ModuleWorker, make_worker

STEPS = 5


def emulate_replicas(tmp: Path, modules: int, replicas: int, overrides: list[str]) -> list[dict[str, object]]:
    """Module by module: per-shard batch norm, the mean of the shard gradients, running statistics
    of shard 0 (DDP broadcasts replica 0's buffers), each shard's output feeding the same shard."""
    config = tiny_config(tmp, "reference", f"local.modules={modules}", *overrides)
    device = torch.device("cpu")
    train, _ = make_loaders(config, device, processes=replicas)
    layout = make_layout(config, train.spec, resolve_cuts(config, train.spec, device))
    workers: list[ModuleWorker] = [make_worker(config, layout, k, device) for k in range(modules)]
    for step, (images, labels) in enumerate(itertools.islice(train.batches(1), STEPS), start=1):
        shards = zip(images.tensor_split(replicas), labels.tensor_split(replicas))
        packets = [Packet.from_batch(x, y) for x, y in shards]
        for worker in workers:
            worker.at_step(1, step)
            worker.module.train()
            worker.optimizer.zero_grad()
            following, kept = [], {}
            for shard, packet in enumerate(packets):
                inputs, output, loss = worker.module(packet)
                (loss / replicas).backward()
                if shard == 0:
                    kept = {name: buffer.clone() for name, buffer in worker.module.named_buffers()}
                if not worker.last:
                    following.append(worker.module.next_packet(packet, inputs, output))
            with torch.no_grad():
                for name, buffer in worker.module.named_buffers():
                    buffer.copy_(kept[name])
            worker.optimizer.step()
            packets = following
    return [worker.state_dict() for worker in workers]


@pytest.mark.parametrize("modules, replicas, placement, extra", [
    (2, 2, "chain", ["local.context=E", "local.reconstruct=true"]),
    (2, 2, "stage", ["local.context=R1", "local.loss=contrast"]),
    (4, 1, "chain", ["local.context=R1E", "local.reconstruct=true"]),
], ids=["K2xR2-E-decoder", "K2xR2-stage-placement-R1-contrast", "K4xR1-R1E-decoder"])
def test_k_by_r_equals_the_averaged_reference(tmp_path: Path, single_thread: None, modules: int, replicas: int,
                                              placement: str, extra: list[str]) -> None:
    out = tmp_path / "pipeline"
    done = torchrun(modules * replicas, [f"run.out_dir={out}", "run.mode=pipeline", f"local.modules={modules}",
                                         f"train.max_steps={STEPS}", f"pipeline.placement={placement}", *extra],
                    timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = emulate_replicas(tmp_path, modules, replicas, extra)
    for module in range(modules):
        saved = load_module_state(out, module)
        assert saved["position"]["step"] == STEPS
        assert max_state_difference(reference[module], saved["state"]) <= 1e-5, f"module {module} differs"
    summary = json.loads((out / "summary.json").read_text())
    cells = sorted((stage["stage"], stage["replica"]) for stage in summary["stages"])
    assert cells == [(k, r) for k in range(modules) for r in range(replicas)]
    assert summary["world_size"] == modules * replicas and 0 <= summary["test_accuracy"] <= 1


def test_a_replica_that_fails_ends_the_job_with_stage_and_replica_named(tmp_path: Path) -> None:
    started = time.monotonic()
    done = torchrun(4, [f"run.out_dir={tmp_path}", "run.mode=pipeline", "local.modules=2", "train.lr=1e30",
                        "run.log_every=1", "train.max_steps=200", "pipeline.timeout_s=20"], timeout=120)
    assert done.returncode != 0 and time.monotonic() - started < 90
    assert re.search(r"error: stage on rank \d \(module \d, replica \d\) failed: .*loss is nan", done.stderr)


def test_a_run_resumes_with_another_r(tmp_path: Path, single_thread: None) -> None:
    """Checkpoints are per module, written by replica 0: R = 2 -> R = 1 (sequential) picks up where it stopped,
    from replica 0's weights."""
    from pipeline.runners.run import run

    first = tmp_path / "r2"
    done = torchrun(4, [f"run.out_dir={first}", "run.mode=pipeline", "local.modules=2", "train.max_steps=3"],
                    timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = run(tiny_config(tmp_path, "r1", "local.modules=2", "train.max_steps=5", f"run.resume={first}"))
    assert summary is not None and summary["steps"] == 5
    for module in range(2):
        before, after = load_module_state(first, module), load_module_state(tmp_path / "r1", module)
        assert after["position"]["step"] == 5 and max_state_difference(before["state"], after["state"]) > 0
