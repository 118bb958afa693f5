"""DeepLab-V3's dilated ResNet-50/101 (output stride 8) as a flat list of blocks, cut like the others.

Block 0 is the stem, then the bottleneck blocks of layer1 .. layer4 in order, as in
imagenet_resnet.py and with its very blocks (so torchvision's checkpoints map onto the same
parameter names). MMSegmentation's "d8" layout (docs/reference.md): strides (1, 2, 1, 1) and
dilations (1, 1, 2, 4) per stage; with its contract_dilation the first block of a dilated stage
uses half the stage's dilation (layer3[0]: 1, layer4[0]: 2); every 3x3 conv pads by its dilation.
The stem is torchvision's 7x7 conv, or with ``deep_stem`` the "v1c" stem of three 3x3 convs.

Shapes are nominal: ``image_size`` is the crop's height, and a rectangular crop keeps its aspect
ratio through every block; the channel counts are exact.
"""

from __future__ import annotations

from torch import nn

from pipeline.model.arch import BOTTLENECK_EXPANSION, SEGMENTATION_DILATIONS, SEGMENTATION_STRIDES, ArchSpec
from pipeline.model.imagenet_resnet import Bottleneck, ImageNetStem, halved
from pipeline.model.partition import flat_to_cut
from pipeline.model.resnet import BlockShape, conv3x3

DEEP_STEM_WIDTH = 32  # the v1c stem's first two convs: half the 64 channels it ends with


class DeepStem(nn.Sequential):
    """ResNet-V1c's stem: conv3x3/2 -> 32, conv3x3 32 -> 32, conv3x3 32 -> 64, each + BN + ReLU; max pool."""

    def __init__(self, in_channels: int, width: int) -> None:
        layers: list[nn.Module] = []
        for cin, cout, stride in ((in_channels, DEEP_STEM_WIDTH, 2), (DEEP_STEM_WIDTH, DEEP_STEM_WIDTH, 1),
                                  (DEEP_STEM_WIDTH, width, 1)):
            layers += [conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.MaxPool2d(3, stride=2, padding=1))


def block_dilation(stage: int, block: int) -> int:
    """Dilation of block ``block`` of stage ``stage`` (0-based): the stage's, halved on the first block."""
    dilation = SEGMENTATION_DILATIONS[stage]
    return dilation // 2 if block == 0 and dilation > 1 else dilation


class DilatedResNet:
    """The block layout of DeepLab-V3's backbone; builds any single block on demand."""

    def __init__(self, arch: ArchSpec, in_channels: int, image_size: int, deep_stem: bool) -> None:
        self.arch = arch
        self.in_channels = in_channels
        self.image_size = image_size
        self.deep_stem = deep_stem

    def __len__(self) -> int:
        return self.arch.units

    def _stage_of(self, index: int) -> tuple[int, int]:
        """Flat residual-block index (>= 1) -> (stage 0..3, block within the stage)."""
        stage, block = flat_to_cut(index, self.arch.blocks)
        return stage - 1, block

    def _stage_size(self, stage: int) -> int:
        size = halved(halved(self.image_size))  # the stem: a stride-2 conv, then max pool stride 2
        for later in range(1, stage + 1):
            if SEGMENTATION_STRIDES[later] == 2:
                size = halved(size)
        return size

    def shape(self, index: int) -> BlockShape:
        """Output shape of block ``index``; index -1 means the input image."""
        if index < 0:
            return BlockShape(self.in_channels, self.image_size)
        if index == 0:
            return BlockShape(self.arch.stem_width, self._stage_size(0))
        stage, _ = self._stage_of(index)
        return BlockShape(self.arch.widths[stage], self._stage_size(stage))

    def build(self, index: int) -> nn.Module:
        arch = self.arch
        if index == 0:
            if self.deep_stem:
                return DeepStem(self.in_channels, arch.stem_width)
            return ImageNetStem(self.in_channels, arch.stem_width)
        stage, block = self._stage_of(index)
        cin = self.shape(index - 1).channels
        stride = SEGMENTATION_STRIDES[stage] if block == 0 else 1
        planes = arch.widths[stage] // BOTTLENECK_EXPANSION
        return Bottleneck(cin, planes, stride, arch.groups, arch.width_per_group, block_dilation(stage, block))
