"""DeepLab-V3 as K = 2 local modules on a generated segmentation folder: the threaded pipeline
(stage 0 streaming the folder through decoding workers) ends with the sequential run's
parameters and the same per-class IoU; a run's mIoU is what the module's own predictions give."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_helpers import assert_same_checkpoints, load_module_state, tiny_config
from threaded import run_threaded

from pipeline.data.loader import make_loaders
from pipeline.data.specs import IGNORE_INDEX
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.assemble import run
from pipeline.runtime.scoring import MeanIoU
from pipeline.runtime.worker import make_worker
from tests.data.segmentation_files import write_segmentation_folder

CLASSES = 3
CPU = torch.device("cpu")


def segmentation_overrides(root: Path) -> list[str]:
    # ResNet-50 backbone; module 0: stem .. layer3[1] + InfoPro's head and decoder; module 1: the rest, ASPP, FCN
    return ["data.name=segmentation_folder", f"data.root='{root}'", f"model.classes={CLASSES}",
            "model.arch=deeplabv3_resnet50", "model.deep_stem=true", "data.crop=[32, 48]", "data.batch_size=2",
            "local.modules=2", "local.partition=[[3, 1]]", "local.reconstruct=true", "local.ixx_1=1.5",
            "train.schedule=poly", "train.lr=0.01", "train.max_steps=3", "train.epochs=2"]


@pytest.mark.slow
def test_threaded_segmentation_pipeline_equals_sequential(tmp_path: Path, single_thread: None) -> None:
    root = write_segmentation_folder(tmp_path / "seg", classes=CLASSES, train=6, val=3, size=(40, 56),
                                     val_sizes=((40, 56), (36, 60), (44, 52)))
    overrides = segmentation_overrides(root)
    reference = run(tiny_config(tmp_path, "sequential", *overrides, "data.workers=0"))
    assert reference is not None
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "data.workers=2",
                                                 "run.mode=pipeline"), timeout_s=300)
    assert errors == [None, None]
    assert_same_checkpoints(tmp_path / "sequential", tmp_path / "threads", 2)
    summary = summaries[0]
    assert summary is not None and summary["steps"] == 3 == reference["steps"] and summary["epochs"] == 1
    assert summary["cut_points"] == [[3, 1]]
    for key in ("test_miou", "test_iou", "test_accuracy"):
        assert summary[key] == reference[key], key
    assert len(summary["test_iou"]) == CLASSES

    # the run's scores are the trained modules' own predictions on the val images, counted by hand
    config = tiny_config(tmp_path, "check", *overrides, "data.workers=0")
    _, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    layout = make_layout(config, test.spec, resolve_cuts(config, test.spec, CPU))
    workers = [make_worker(config, layout, index, CPU) for index in range(2)]
    for index, worker in enumerate(workers):
        worker.load_state_dict(load_module_state(tmp_path / "sequential", index)["state"])
        worker.module.eval()
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    with torch.no_grad():
        for images, labels in test.batches(0):
            output = workers[1].module.body(workers[0].module.body(images))  # R0: a module's input is h
            predicted = workers[1].module.logits(output, labels).argmax(1)
            assert predicted.shape == labels.shape  # whole images, padded to the batch's largest
            labelled = labels != IGNORE_INDEX
            for truth, guess in zip(labels[labelled].tolist(), predicted[labelled].tolist()):
                confusion[truth, guess] += 1
    assert int(confusion.sum()) > 0
    expected = MeanIoU(CLASSES).scores(confusion, images=3)
    assert reference["test_iou"] == expected["test_iou"] and reference["test_miou"] == expected["test_miou"]
