"""DDP over gloo equals one process that averages the gradients of the same batch shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from distributed_helpers import load_module_state, max_state_difference, tiny_config, torchrun

from pipeline import checkpoint
from pipeline.data.loader import make_loaders
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.packet import Packet
from pipeline.worker import make_worker

STEPS, WORLD = 6, 2


def emulate_ddp(tmp: Path) -> dict[str, object]:
    """Per-shard batch norm, mean of the shard gradients, running statistics from shard 0."""
    config = tiny_config(tmp, "reference")
    device = torch.device("cpu")
    train, _ = make_loaders(config, device)
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


def test_ddp_matches_single_process(tmp_path: Path, single_thread: None) -> None:
    out = tmp_path / "ddp"
    done = torchrun(WORLD, [f"run.out_dir={out}", "run.mode=ddp", f"train.max_steps={STEPS}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = load_module_state(out, 0)
    assert saved["position"]["step"] == STEPS
    assert max_state_difference(emulate_ddp(tmp_path), saved["state"]) <= 1e-5
    assert not checkpoint.module_file(checkpoint.find_set(out), 1).exists()


def test_ddp_refuses_local_modules(tmp_path: Path) -> None:
    done = torchrun(WORLD, [f"run.out_dir={tmp_path}", "run.mode=ddp", "local.modules=2"], timeout=60)
    assert done.returncode != 0
    assert "run.mode = 'ddp' trains end to end; set local.modules = 1" in done.stderr
