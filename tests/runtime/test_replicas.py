"""K stages x R replicas over gloo equal one process that averages, per module, the gradients of
the same R batch shards (generalising DDP's equivalence to every K)."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from distributed_helpers import (
    REPLICA_STEPS,
    SHARED_JOBS,
    load_module_state,
    max_state_difference,
    tiny_config,
    torchrun,
)

from pipeline.config.schema import Config
from pipeline.data.loader import make_loaders
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.packet import Packet
from pipeline.runtime.worker import ModuleWorker, make_worker

STEPS = REPLICA_STEPS


def emulate_replicas(config: Config, replicas: int) -> list[dict[str, object]]:
    """Module by module: per-shard batch norm, the mean of the shard gradients, running statistics
    of shard 0 (DDP broadcasts replica 0's buffers), each shard's output feeding the same shard."""
    modules, steps = config.local.modules, config.train.max_steps
    device = torch.device("cpu")
    train, _ = make_loaders(config.data, config.model, config.run.seed, device, processes=replicas)
    layout = make_layout(config, train.spec, resolve_cuts(config, train.spec, device))
    workers: list[ModuleWorker] = [make_worker(config, layout, k, device) for k in range(modules)]
    for step, (images, labels) in enumerate(itertools.islice(train.batches(1), steps), start=1):
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


# id -> (R, the job's overrides). The K4xR1 case is test_stage's K4-R2E-decoder job itself: with
# R = 1 the averaged reference is the sequential run.
CASES = {
    "K2xR2-E-decoder": (2, SHARED_JOBS["K2xR2-E-decoder"][1]),
    "K2xR2-stage-placement-R1-contrast": (2, SHARED_JOBS["K2xR2-stage-placement-R1-contrast"][1]),
    "K4xR1-R2E-decoder": (1, SHARED_JOBS["equivalence K4-R2E-decoder"][1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_k_by_r_equals_the_averaged_reference(tmp_path: Path, single_thread: None,
                                              pipeline_job: Callable[[int, list[str]], Path], case: str) -> None:
    replicas, overrides = CASES[case]
    config = tiny_config(tmp_path, "reference", *overrides)
    modules, steps = config.local.modules, config.train.max_steps
    out = pipeline_job(modules * replicas, overrides)  # launched once per session
    reference = emulate_replicas(config, replicas)
    for module in range(modules):
        saved = load_module_state(out, module)
        assert saved["position"]["step"] == steps
        assert max_state_difference(reference[module], saved["state"]) <= 1e-5, f"module {module} differs"
    summary = json.loads((out / "summary.json").read_text())
    cells = sorted((stage["stage"], stage["replica"]) for stage in summary["stages"])
    assert cells == [(k, r) for k in range(modules) for r in range(replicas)]
    assert summary["world_size"] == modules * replicas and 0 <= summary["test_accuracy"] <= 1


@pytest.mark.slow
def test_a_replica_that_fails_ends_the_job_with_stage_and_replica_named(tmp_path: Path) -> None:
    started = time.monotonic()
    done = torchrun(4, [f"run.out_dir={tmp_path}", "run.mode=pipeline", "local.modules=2", "train.lr=1e30",
                        "run.log_every=1", "train.max_steps=200", "pipeline.timeout_s=20"], timeout=120)
    assert done.returncode != 0 and time.monotonic() - started < 90
    assert re.search(r"error: stage on rank \d \(module \d, replica \d\) failed: .*loss is nan", done.stderr)


@pytest.mark.slow  # reads the torchrun job of the slow tests above
def test_a_run_resumes_with_another_r(tmp_path: Path, single_thread: None,
                                      pipeline_job: Callable[[int, list[str]], Path]) -> None:
    """Checkpoints are per module, written by replica 0: R = 2 -> R = 1 (sequential) picks up where it stopped,
    from replica 0's weights."""
    from pipeline.runtime.assemble import run

    replicas, overrides = CASES["K2xR2-E-decoder"]
    first = pipeline_job(2 * replicas, overrides)  # the equivalence test's job: STEPS steps at R = 2
    summary = run(tiny_config(tmp_path, "r1", *overrides, f"train.max_steps={STEPS + 2}", f"run.resume={first}"))
    assert summary is not None and summary["steps"] == STEPS + 2
    for module in range(2):
        before, after = load_module_state(first, module), load_module_state(tmp_path / "r1", module)
        assert before["position"]["step"] == STEPS
        assert after["position"]["step"] == STEPS + 2 and max_state_difference(before["state"], after["state"]) > 0
