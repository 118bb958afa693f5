"""An image folder in the pipeline: K = 2 stage loops on threads end with the sequential run's
parameters, the first stage streaming the folder through decoding workers, the sequential run
decoding in its own process (the batches may not depend on the number of workers)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_helpers import assert_same_checkpoints, tiny_config
from threaded import run_threaded
from torch import nn

from pipeline.data.loader import make_loaders
from pipeline.data.throughput import write_folder
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.assemble import assemble, run
from pipeline.runtime.links import MemoryLink
from pipeline.runtime.topology import Topology

STEPS = 6
CPU = torch.device("cpu")


def folder_overrides(root: Path) -> list[str]:
    return ["data.name=image_folder", f"data.root='{root}'", "data.image_size=32", "data.eval_resize=36",
            "data.batch_size=8", "local.modules=2", "model.family=cifar"]


@pytest.mark.parametrize("extra", [["local.context=R0"], ["local.context=E", "local.reconstruct=true"]],
                         ids=["K2-R0", "K2-E-decoder"])
def test_threaded_pipeline_on_an_image_folder_equals_sequential(tmp_path: Path, single_thread: None,
                                                                extra: list[str]) -> None:
    root = tmp_path / "images"
    write_folder(root, 24, 3, size=(40, 32), png_every=4)
    overrides = [*folder_overrides(root), f"train.max_steps={STEPS}", "train.epochs=3", *extra]
    reference = run(tiny_config(tmp_path, "sequential", *overrides, "data.workers=0"))
    assert reference is not None
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "data.workers=2",
                                                 "run.mode=pipeline"))
    assert errors == [None, None]
    assert_same_checkpoints(tmp_path / "sequential", tmp_path / "threads", 2)
    summary = summaries[0]
    assert summary is not None and summary["steps"] == STEPS == reference["steps"]
    assert summary["epochs"] == 2  # 3 batches an epoch: two whole epochs, each evaluated on the folder's val split
    assert summary["test_accuracy"] == reference["test_accuracy"]



@pytest.mark.slow
def test_resnet50_on_an_image_folder_pipeline_equals_sequential(tmp_path: Path, single_thread: None) -> None:
    """torchvision's ResNet-50 (model.family = imagenet, bottleneck blocks) at K = 2 on 64-pixel crops with
    InfoPro's ImageNet head and decoder, weighted as its ImageNet commands: the threaded pipeline ends with
    the sequential run's parameters."""
    root = tmp_path / "images"
    write_folder(root, 12, 3, size=(80, 72), png_every=4)
    overrides = [*folder_overrides(root), "model.family=imagenet", "model.arch=resnet50", "data.image_size=64",
                 "data.eval_resize=72", "data.batch_size=4", "local.reconstruct=true", "local.ixx_1=5",
                 "local.ixy_1=0.75", "train.max_steps=3", "train.lr=0.01", "train.epochs=1"]
    reference = run(tiny_config(tmp_path, "sequential", *overrides, "data.workers=0"))
    assert reference is not None and reference["steps"] == 3
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "data.workers=2",
                                                 "run.mode=pipeline"), timeout_s=300)
    assert errors == [None, None]
    assert_same_checkpoints(tmp_path / "sequential", tmp_path / "threads", 2)
    summary = summaries[0]
    assert summary is not None and summary["test_accuracy"] == reference["test_accuracy"]
    assert summary["cut_points"] == reference["cut_points"] and len(summary["cut_points"]) == 1

class SaidByRank0:
    """A later stage's collectives once rank 0 has spoken: broadcasts return what rank 0 said, in order."""

    def __init__(self, *said: Any) -> None:
        self.said = list(said)

    def gather(self, item: Any) -> list[Any]:
        return [item, item]

    def broadcast(self, item: Any, source: int) -> Any:
        return self.said.pop(0)

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast_over_replicas(self, tensor: torch.Tensor) -> None:
        pass


def test_a_later_stage_builds_its_module_from_rank_0s_spec_without_the_folder(tmp_path: Path) -> None:
    """Only the first stage reads the folder; on another node it may not even be mounted."""
    root = tmp_path / "images"
    write_folder(root, 12, 3, size=(40, 32))
    config = tiny_config(tmp_path, "stage1", *folder_overrides(root), "run.mode=pipeline")
    train, _ = make_loaders(config.data, config.model, config.run.seed, CPU)
    facts = (train.spec, resolve_cuts(config, train.spec, CPU), len(train))
    shutil.rmtree(root)
    topology = Topology(1, 2, CPU, 2, 1, (1,), comm=SaidByRank0(facts, config.run.resume))
    inbox = MemoryLink(0, 1, 2, 5.0)
    loop, _, cuts = assemble(config, topology, None, time.perf_counter(), lambda layout: (inbox, None))
    assert cuts == facts[1]
    (stage,) = loop.stages
    classifier = [layer for layer in stage.worker.module.modules() if isinstance(layer, nn.Linear)][-1]
    assert classifier.out_features == 3  # the folder's classes, learned from rank 0
