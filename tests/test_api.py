"""The Python API: pipeline.run, pipeline.register_network, pipeline.register_method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline
from pipeline.config.loading import load_config
from pipeline.errors import BadInput
from pipeline.model.methods import registry as methods
from pipeline.model.methods.softmax import Softmax
from pipeline.model.networks import family as networks

TINY = ["data.name=synthetic", "data.batch_size=8", "train.max_steps=2", "train.epochs=1", "train.schedule=constant",
        "run.log_every=1"]


def two_blocks(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)))


class Halved(Softmax):
    """Softmax at half weight: a method of the user's own."""

    name = "halved"
    summary_name = "halved"

    def loss(self, output: torch.Tensor, head_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().loss(output, head_output, labels)


def test_a_registered_network_and_method_train_through_pipeline_run(tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    pipeline.register_network("two_blocks", two_blocks)
    pipeline.register_method(Halved())
    request.addfinalizer(lambda: (networks.FAMILIES.pop("two_blocks"), methods._METHODS.pop("halved")))
    out = tmp_path / "out"
    summary = pipeline.run(None, [*TINY, "model.arch=two_blocks", "local.modules=2", "local.loss=halved",
                                  f"run.out_dir={out}"])
    assert summary is not None and summary["steps"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    config = load_config(None, [*TINY, "model.arch=two_blocks", "local.modules=2", "local.loss=halved"])
    assert (config.arch.family, config.arch.units) == ("two_blocks", 2)


def test_run_takes_a_config_object_and_refuses_bad_input_with_badinput(tmp_path: Path) -> None:
    config = load_config(None, [*TINY, "model.arch=resnet8", f"run.out_dir={tmp_path / 'out'}"])
    assert pipeline.run(config)["steps"] == 2  # type: ignore[index]
    with pytest.raises(TypeError, match="overrides apply to a config file"):
        pipeline.run(config, ["train.max_steps=3"])
    with pytest.raises(BadInput, match="local.loss = 'nope' is not allowed"):
        pipeline.run(None, [*TINY, "local.loss=nope"])
    with pytest.raises(TypeError, match="give the factory"):
        pipeline.register_network("no_factory")
