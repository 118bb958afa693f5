"""The sequential run (pipeline.runtime.assemble in one process) and the event order of pipeline.runtime.run_order."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.data.loader import make_loaders
from pipeline.data.specs import dataset_spec
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import EpochEnd, Position, TrainStep, events, total_steps
from pipeline.runtime.worker import make_worker
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

CPU = torch.device("cpu")


def load_checkpoint(out_dir, module):
    return torch.load(checkpoint.newest_module_file(out_dir, module), weights_only=True)


# ---- events ------------------------------------------------------------------------------------


def test_events_full_epochs():
    stream = list(events(Position(), epochs=2, batches=3, max_steps=0))
    steps = [e for e in stream if isinstance(e, TrainStep)]
    ends = [e for e in stream if isinstance(e, EpochEnd)]
    assert [(s.epoch, s.batch, s.step) for s in steps] == [
        (1, 0, 1), (1, 1, 2), (1, 2, 3), (2, 0, 4), (2, 1, 5), (2, 2, 6)]
    assert [(e.epoch, e.resume_at, e.final) for e in ends] == [
        (1, Position(2, 0, 3), False), (2, Position(3, 0, 6), True)]
    assert stream.index(ends[0]) == 3  # the epoch end comes right after its last step
    assert [e.completed_epochs for e in ends] == [1, 2]


def test_events_stop_mid_epoch_and_resume_there():
    first = list(events(Position(), epochs=3, batches=4, max_steps=6))
    assert isinstance(first[-1], EpochEnd) and first[-1].final
    assert first[-1].resume_at == Position(2, 2, 6)
    assert first[-1].completed_epochs == 1
    resumed = list(events(first[-1].resume_at, epochs=3, batches=4, max_steps=10))
    straight = list(events(Position(), epochs=3, batches=4, max_steps=10))
    steps = lambda stream: [(e.epoch, e.batch, e.step) for e in stream if isinstance(e, TrainStep)]  # noqa: E731
    assert steps(first) + steps(resumed) == steps(straight)
    assert resumed[-1].resume_at == straight[-1].resume_at == Position(3, 2, 10)


def test_events_max_steps_at_an_epoch_boundary():
    stream = list(events(Position(), epochs=5, batches=4, max_steps=8))
    assert stream[-1] == EpochEnd(2, Position(3, 0, 8), final=True)
    assert sum(isinstance(e, TrainStep) for e in stream) == 8


def test_total_steps():
    assert total_steps(Position(), 2, 10, 0) == 20
    assert total_steps(Position(), 2, 10, 7) == 7
    assert total_steps(Position(2, 3, 13), 2, 10, 0) == 20
    assert total_steps(Position(2, 3, 13), 3, 10, 25) == 25


# ---- the sequential run ---------------------------------------------------------------------------


def test_run_equals_stepping_the_workers_by_hand(make_config, tmp_path):
    """Module k trains on batch t with its own weights after t-1 updates, on module k-1's output
    for batch t computed before module k-1's update t."""
    config = make_config("local.modules=2", "local.context=R1E", "train.max_steps=3",
                         out_dir=tmp_path / "seq")
    summary = run(config)
    assert summary["steps"] == 3

    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, resolve_cuts(config, spec, CPU))
    workers = [make_worker(config, layout, index, CPU) for index in range(2)]
    train, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    for worker in workers:
        worker.at_step(1, 1)
    for _, (images, labels) in zip(range(3), train.batches(1)):
        packet = Packet.from_batch(images, labels)
        for worker in workers:
            packet, _ = worker.train_step(packet)
    for index, worker in enumerate(workers):
        saved = load_checkpoint(tmp_path / "seq", index)
        assert saved["position"] == {"epoch": 1, "batch": 3, "step": 3}
        for name, tensor in worker.module.state_dict().items():
            assert torch.equal(saved["state"]["module"][name], tensor), f"module {index}: {name}"

    # the reported accuracy is the last module's on the whole test split
    correct = 0
    for images, labels in test.batches(0):
        result = Packet.from_batch(images, labels)
        for worker in workers:
            result = worker.eval_step(result)
        correct += int(result)
    assert summary["test_accuracy"] == pytest.approx(correct / 256)


def test_a_flat_indexed_networks_cuts_are_printed_and_recorded_as_block_indices(make_config, tmp_path, capsys):
    config = make_config(f"model.arch={MAPS_THEN_VECTORS}", "local.modules=3", "train.max_steps=1",
                         out_dir=tmp_path / "out")
    summary = run(config)
    assert summary is not None and summary["cut_points"] == [0, 2]  # five blocks: 1 | 2 | 2
    assert "modules 0-2 of 3, cut points [0, 2] (block index after which a module ends)" in capsys.readouterr().out


def test_outputs_of_a_run(make_config, tmp_path):
    out = tmp_path / "out"
    config = make_config("local.modules=2", "train.max_steps=3", "run.log_every=1", out_dir=out)
    summary = run(config)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["mode"] == "sequential" and summary["world_size"] == 1 and summary["modules"] == 2
    assert summary["steps"] == 3 and summary["epochs"] == 0  # stopped by max_steps inside epoch 1
    assert summary["dataset"] == "synthetic" and summary["context"] == "R0" and summary["loss"] == "softmax"
    assert summary["cut_points"] == [[1, 0]]  # resnet8: stem + 1 block | 2 blocks
    assert len(summary["stages"]) == 1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line.get("event") == "train"]
    assert sorted((line["step"], line["module"]) for line in train) == [(s, m) for s in (1, 2, 3) for m in (0, 1)]
    assert all(line["rank"] == 0 and line["epoch"] == 1 and line["loss"] > 0 and line["lr"] > 0 for line in train)
    evals = [line for line in lines if line.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["test_accuracy"] == summary["test_accuracy"]


def test_two_runs_are_identical(make_config, tmp_path):
    overrides = ("local.modules=2", "local.context=E", "local.reconstruct=true", "train.max_steps=2")
    run(make_config(*overrides, out_dir=tmp_path / "a"))
    run(make_config(*overrides, out_dir=tmp_path / "b"))
    for module in range(2):
        a, b = load_checkpoint(tmp_path / "a", module), load_checkpoint(tmp_path / "b", module)
        for name, tensor in a["state"]["module"].items():
            assert torch.equal(tensor, b["state"]["module"][name]), name
