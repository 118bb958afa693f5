"""Networks beyond the papers' ResNets train the same in every mode: a user's factory named by
model.arch (every process imports it), vit_tiny (token features, ContSup R1E) and vgg11_bn."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed_helpers import (
    FACTORY,
    SHARED_JOBS,
    assert_same_checkpoints,
    load_module_state,
    max_state_difference,
    tiny_config,
)
from test_replicas import emulate_replicas
from threaded import run_threaded

from pipeline.runtime.assemble import run

STEPS = 4
CASES = {
    "factory-K3-R1E": (3, [f"model.arch={FACTORY}", "local.context=R1E"]),
    "vit_tiny-K4-R1E-channels_last": (4, ["model.arch=vit_tiny", "local.context=R1E", "precision.channels_last=true"]),
    "vgg11_bn-K3-R1-decoder": (3, ["model.arch=vgg11_bn", "local.context=R1", "local.reconstruct=true"]),
}


def overrides(case: str) -> tuple[int, list[str]]:
    modules, extra = CASES[case]
    return modules, [f"local.modules={modules}", f"train.max_steps={STEPS}", "train.epochs=1", "run.log_every=2",
                     *extra]


@pytest.mark.parametrize("case", [pytest.param(case, marks=[pytest.mark.slow] if "factory" not in case else [])
                                  for case in CASES])  # the ViT and the VGG train for seconds
def test_threaded_pipeline_equals_sequential(tmp_path: Path, single_thread: None,
                                             sequential_reference: Callable[[list[str]], tuple[Path, dict[str, Any]]],
                                             case: str) -> None:
    modules, sets = overrides(case)
    reference_dir, reference = sequential_reference(sets)
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *sets, "run.mode=pipeline"))
    assert errors == [None] * modules
    assert_same_checkpoints(reference_dir, tmp_path / "threads", modules)
    assert summaries[0] is not None and summaries[0]["test_accuracy"] == reference["test_accuracy"]
    assert reference["steps"] == STEPS


@pytest.mark.slow
def test_a_factory_network_under_torchrun_equals_sequential(
        single_thread: None, pipeline_job: Callable[[int, list[str]], Path],
        sequential_reference: Callable[[list[str]], tuple[Path, dict[str, Any]]]) -> None:
    """Each of the three processes imports the factory by its name in the config."""
    modules, sets = overrides("factory-K3-R1E")
    reference_dir, reference = sequential_reference(sets)
    out = pipeline_job(modules, sets)
    assert_same_checkpoints(reference_dir, out, modules)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_a_factory_network_with_replicas_equals_the_averaged_reference(
        tmp_path: Path, single_thread: None, pipeline_job: Callable[[int, list[str]], Path]) -> None:
    sets = SHARED_JOBS["factory K2xR2"][1]
    out = pipeline_job(4, sets)  # K = 2 x R = 2
    reference = emulate_replicas(tiny_config(tmp_path, "reference", *sets), 2)
    for module in range(2):
        saved = load_module_state(out, module)
        assert saved["position"]["step"] == STEPS
        assert max_state_difference(reference[module], saved["state"]) <= 1e-5, f"module {module} differs"


@pytest.mark.slow
def test_vgg_under_ddp_equals_the_averaged_reference(tmp_path: Path, single_thread: None,
                                                     pipeline_job: Callable[[int, list[str]], Path]) -> None:
    """run.mode = ddp (E2E on 2 processes) for vgg11_bn: one process averaging the two shards' gradients."""
    sets = SHARED_JOBS["vgg11_bn ddp"][1]
    out = pipeline_job(2, sets)
    saved = load_module_state(out, 0)
    assert saved["position"]["step"] == 3
    reference = tiny_config(tmp_path, "reference", *sets, "run.mode=sequential")
    assert max_state_difference(emulate_replicas(reference, 2)[0], saved["state"]) <= 1e-5


@pytest.mark.slow
def test_vgg_resume_crosses_modes(tmp_path: Path, single_thread: None) -> None:
    """vgg11_bn K = 3: sequential 2 steps -> pipeline to 3 -> sequential to 4 equals 4 straight steps."""
    common = ["model.arch=vgg11_bn", "local.modules=3", "local.context=R1", "train.epochs=1"]
    run(tiny_config(tmp_path, "straight", *common, "train.max_steps=4"))
    run(tiny_config(tmp_path, "part1", *common, "train.max_steps=2"))
    _, errors = run_threaded(tiny_config(tmp_path, "part2", *common, "train.max_steps=3", "run.mode=pipeline",
                                         f"run.resume={tmp_path / 'part1'}"))
    assert errors == [None] * 3
    run(tiny_config(tmp_path, "part3", *common, "train.max_steps=4", f"run.resume={tmp_path / 'part2'}"))
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "part3", 3)
