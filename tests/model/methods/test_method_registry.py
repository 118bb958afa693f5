"""pipeline.model.methods.registry: local.loss names a registered method; a method registered from outside
the package sizes the heads and trains the modules of a run; an unknown name is one line listing the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.config.loading import load_config
from pipeline.config.schema import LocalConfig
from pipeline.config.validation import ineffective_keys
from pipeline.errors import BadInput
from pipeline.model.methods import registry
from pipeline.model.methods.registry import LocalMethod, method_named, method_names, register_method
from pipeline.runtime import checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.metrics import method_name

SHIFT = 100.0  # far above any cross-entropy of the tiny run: a loss this method made is recognisable


class ShiftedCrossEntropy(LocalMethod):
    """Three more outputs than classes, ignored by a cross-entropy shifted by SHIFT; counts its calls."""

    name = "shifted_ce"
    summary_name = "shifted"
    identity_keys = ("aux_hidden",)
    standalone = True

    def __init__(self) -> None:
        self.calls = 0

    def head_width(self, classes: int, local: LocalConfig) -> int:
        return classes + 3

    def loss(self, output: torch.Tensor, head_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(head_output[:, :-3].float(), labels) + SHIFT


@pytest.fixture
def shifted(monkeypatch: pytest.MonkeyPatch) -> ShiftedCrossEntropy:
    """The method, registered for this test only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    method = ShiftedCrossEntropy()
    assert register_method(method) is method
    return method


def test_the_built_ins_are_registered_under_their_config_names():
    assert method_names() == ("contrast", "predsim", "softmax")
    for name in method_names():
        assert method_named(name).name == name


def test_an_unknown_name_is_one_line_listing_the_registered_ones():
    with pytest.raises(BadInput) as caught:
        method_named("hinge")
    assert str(caught.value) == "local.loss = 'hinge' is not allowed; allowed: contrast, predsim, softmax"
    with pytest.raises(BadInput, match=r"^local.loss = 'hinge' is not allowed; allowed: contrast, predsim, softmax$"):
        load_config(None, ["local.loss=hinge"])
    with pytest.raises(BadInput) as caught:
        method_named("x" * 5000)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_a_registered_method_is_a_config_choice_with_its_own_keys(shifted):
    assert "shifted_ce" in method_names()
    config = load_config(None, ["local.modules=2", "local.loss=shifted_ce", "local.aux_hidden=64",
                                "local.aux_feature_dim=40"])
    assert method_name(config.local) == "shifted"
    assert ineffective_keys(config) == ["local.aux_feature_dim has no effect with local.loss = 'shifted_ce' (read only "
                                        "by contrast)"]
    notes = ineffective_keys(load_config(None, ["local.modules=2", "local.aux_hidden=64"]))
    assert notes == ["local.aux_hidden has no effect with local.loss = 'softmax' (read only by shifted_ce)"]
    with pytest.raises(BadInput, match=r"allowed: contrast, predsim, shifted_ce, softmax$"):
        load_config(None, ["local.loss=hinge"])


def test_a_tiny_sequential_run_trains_with_a_registered_method(shifted, config_builder, tmp_path: Path):
    out = tmp_path / "run"
    config = config_builder("local.modules=2", "local.loss=shifted_ce", out_dir=out)
    summary = run(config)
    assert summary is not None
    assert shifted.calls == 3  # module 0's loss at each of the 3 steps; the last module's is the classifier's
    assert summary["loss"] == "shifted" and summary["method"] == "shifted"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {(line["module"], line["step"]): line["loss"] for line in lines if "loss" in line}
    assert len(losses) == 6
    assert all(SHIFT < losses[0, step] < SHIFT + 10 for step in (1, 2, 3))
    assert all(losses[1, step] < 10 for step in (1, 2, 3))
    # its head was sized by the method (three outputs more than the classes); the checkpoints record its key
    saved = checkpoint.find_set(out)
    head = [tensor for name, tensor in checkpoint.module_weights(saved, 0).items() if name.startswith("head.")]
    assert head[-1].shape == (10 + 3,)
    marker = checkpoint.read_marker(saved)
    assert marker is not None and marker["identity"]["loss"] == "shifted_ce"
    assert marker["identity"]["aux_hidden"] == 128
