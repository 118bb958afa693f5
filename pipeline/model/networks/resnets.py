"""The ResNet families: CIFAR ResNets, torchvision's ImageNet ResNets / ResNeXts, DeepLab-V3's backbone.

Their names and layouts are pipeline/model/arch.py's (``resnet50`` is both a CIFAR depth and
torchvision's network: model.family, or the dataset's default family, decides). Cuts are
[stage, block] pairs ([0, 0]: after the stem) and 'equal' follows the published tables. This module
imports no torch (the launchers read the shipped configs many times): ``net`` and ``parts`` import
what builds the networks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.model.arch import (
    IMAGENET_ARCHS,
    IMAGENET_DATASETS,
    RESIDENT_DATASETS,
    SEGMENTATION_ARCHS,
    SEGMENTATION_DATASETS,
    ArchSpec,
    Family,
    is_cifar_depth,
    resolve_arch,
)
from pipeline.model.networks.family import DataShape, NetworkFamily, NetworkSpec, register_network
from pipeline.model.partition import default_cuts

if TYPE_CHECKING:
    from pipeline.data.specs import DatasetSpec
    from pipeline.model.local_parts import LocalParts
    from pipeline.model.networks.base import BlockNet


class ResNetFamily(NetworkFamily):
    family: Family

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        layout = resolve_arch(self.family, arch)
        return NetworkSpec(arch, self.name, layout.units, layout.blocks, layout)

    def default_cuts(self, spec: NetworkSpec, modules: int) -> list[int]:
        return default_cuts(spec.layout, modules)


class CifarResNets(ResNetFamily):
    name = family = "cifar"
    datasets = RESIDENT_DATASETS

    def names(self) -> tuple[str, ...]:
        return ("resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet<6n+2>")

    def knows(self, arch: str) -> bool:
        return is_cifar_depth(arch)

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        from pipeline.model.resnet import CifarResNet

        layout: ArchSpec = spec.layout
        return CifarResNet(layout.blocks[0], data.channels, data.image_shape)


class ImageNetResNets(ResNetFamily):
    name = family = "imagenet"
    datasets = IMAGENET_DATASETS
    pretrained = True

    def names(self) -> tuple[str, ...]:
        return IMAGENET_ARCHS

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        from pipeline.model.imagenet_resnet import ImageNetResNet

        return ImageNetResNet(spec.layout, data.channels, data.image_shape)

    def parts(self) -> LocalParts:
        from pipeline.model.local_parts import ImageNetParts  # torch: a config is read without it

        return ImageNetParts()


class DeepLabV3(ResNetFamily):
    name = family = "segmentation"
    datasets = SEGMENTATION_DATASETS
    pretrained = True

    def names(self) -> tuple[str, ...]:
        return SEGMENTATION_ARCHS

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        from pipeline.model.dilated_resnet import DilatedResNet

        return DilatedResNet(spec.layout, data.channels, data.image_shape, deep_stem)

    def parts(self) -> LocalParts:
        from pipeline.model.local_parts import SegmentationParts  # torch: a config is read without it

        return SegmentationParts()


for _family in (CifarResNets(), ImageNetResNets(), DeepLabV3()):
    register_network(_family)
