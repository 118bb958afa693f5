"""Tiny trained runs that the export, evaluation and prediction tests share, each trained once per session,
with the logits of the last module at the run's own final evaluation recorded as the run computed them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config.loading import load_config
from pipeline.data import readers
from pipeline.data.throughput import write_folder
from pipeline.runtime import scoring
from pipeline.runtime.assemble import run
from tests.data.segmentation_files import write_segmentation_folder
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

TINY = ("run.device=cpu", "run.log_every=1", "train.epochs=1", "train.schedule=cosine-step")

# ContSup R1E at K = 4 on the synthetic set (ResNet-8): every context encoder kind in the chain.
CONTSUP_R1E = ("data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "train.max_steps=3",
               "local.modules=4", "local.context=R1E")
# DeepLab-V3 R50 at K = 2 (InfoPro's segmentation head and decoder in module 0) on a generated segmentation folder.
DEEPLAB = ("data.name=segmentation_folder", "model.classes=3", "model.arch=deeplabv3_resnet50", "data.crop=[32, 48]",
           "data.batch_size=2", "data.workers=0", "local.modules=2", "local.partition=[[3, 1]]",
           "local.reconstruct=true", "train.schedule=poly", "train.lr=0.01", "train.max_steps=2")
# InfoPro at K = 2 on torchvision's ResNet-50 (ImageNet head and decoder), 32-pixel crops of a generated folder.
INFOPRO_RESNET50 = ("data.name=image_folder", "model.family=imagenet", "model.arch=resnet50", "data.image_size=32",
                    "data.eval_resize=36", "data.batch_size=4", "data.workers=0", "local.modules=2",
                    "local.reconstruct=true", "local.ixx_1=5", "local.ixy_1=0.75", "train.max_steps=2",
                    "train.lr=0.01")
# The other network families, each at K >= 2 on a synthetic set of SMALL_SYNTHETIC images (train, test): a ViT
# with ContSup R1E (token encoders), a VGG, a factory's network with R1 (a map encoder: modules start at maps).
NETWORKS = {
    "vit_tiny": ("model.arch=vit_tiny", "local.modules=2", "local.context=R1E"),
    "vgg11_bn": ("model.arch=vgg11_bn", "local.modules=2"),
    "factory": (f"model.arch={MAPS_THEN_VECTORS}", "local.modules=3", "local.partition=[0, 1]", "local.context=R1"),
}
SMALL_SYNTHETIC = (8, 8)


@contextlib.contextmanager
def small_synthetic() -> Iterator[None]:
    """The synthetic set of SMALL_SYNTHETIC images: what the NETWORKS runs train and evaluate on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readers, "SYNTHETIC_TRAIN", SMALL_SYNTHETIC[0])
        patch.setattr(readers, "SYNTHETIC_TEST", SMALL_SYNTHETIC[1])
        yield


@dataclass(frozen=True)
class TrainedRun:
    out_dir: Path
    overrides: tuple[str, ...]  # what trained it, out_dir included
    summary: dict[str, Any]
    logits: list[torch.Tensor]  # the last module's logits at the final evaluation, batch by batch
    images: Path | None  # the image folder it trained on


_RUNS: dict[str, TrainedRun] = {}


def trained_run(factory: pytest.TempPathFactory, name: str) -> TrainedRun:
    """The run ``name`` (contsup_r1e, infopro_resnet50, deeplab or one of NETWORKS), trained on its first use in
    this session (a segmentation run records no logits: its scores are what the tests compare)."""
    if name in _RUNS:
        return _RUNS[name]
    root = factory.mktemp(name)
    images = None
    overrides = list(TINY) + [f"run.out_dir='{root / 'run'}'"]
    small = name in NETWORKS
    if name == "contsup_r1e":
        overrides += CONTSUP_R1E
    elif small:
        overrides += ["data.name=synthetic", "data.batch_size=4", "train.max_steps=2", *NETWORKS[name]]
    elif name == "deeplab":
        images = write_segmentation_folder(root / "images", classes=3, train=4, val=3, size=(40, 56),
                                           val_sizes=((40, 56), (36, 60), (44, 52)))
        overrides += [*DEEPLAB, f"data.root='{images}'"]
    else:
        images = root / "images"
        write_folder(images, 12, 3, size=(40, 36), png_every=4)
        overrides += [*INFOPRO_RESNET50, f"data.root='{images}'"]
    recorded: list[torch.Tensor] = []
    counting = scoring.Accuracy.count

    def record(self: scoring.Accuracy, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        recorded.append(logits.detach().clone())
        return counting(self, logits, labels)

    from pipeline.data.loader import make_loaders

    sized = small_synthetic() if small else contextlib.nullcontext()
    with pytest.MonkeyPatch.context() as patch, sized:
        patch.setattr(scoring.Accuracy, "count", record)
        summary = run(load_config(None, overrides))
        config = load_config(None, overrides)
        _, test = make_loaders(config.data, config.model, config.run.seed, torch.device("cpu"))
    assert summary is not None
    batches = len(test)
    assert len(recorded) >= batches or name == "deeplab"
    _RUNS[name] = TrainedRun(root / "run", tuple(overrides), summary, recorded[-batches:], images)
    return _RUNS[name]


_EXPORTS: dict[tuple[str, str], Path] = {}
_SUFFIXES = {"model": ".pt", "torchvision": ".pth", "export": ".pt2", "onnx": ".onnx"}


def exported(factory: pytest.TempPathFactory, name: str, fmt: str = "model") -> Path:
    """The run ``name`` exported in ``fmt`` (pipeline.export), once per session: tracing a program costs seconds."""
    from pipeline.tools.export import export

    if (name, fmt) not in _EXPORTS:
        out = trained_run(factory, name).out_dir.parent / f"exported_{fmt}{_SUFFIXES[fmt]}"
        _EXPORTS[name, fmt] = export(trained_run(factory, name).out_dir, out, fmt)
    return _EXPORTS[name, fmt]
