"""DeepLab-V3's dilated ResNet-50/101 (output stride 8) as a flat list of blocks, cut like the others.

Block 0 is the stem, then the bottleneck blocks of layer1 .. layer4 in order, as in
imagenet_resnet.py and with its very blocks (so torchvision's checkpoints map onto the same
parameter names). MMSegmentation's "d8" layout (docs/reference.md): strides (1, 2, 1, 1) and
dilations (1, 1, 2, 4) per stage; with its contract_dilation the first block of a dilated stage
uses half the stage's dilation (layer3[0]: 1, layer4[0]: 2); every 3x3 conv pads by its dilation.
The stem is torchvision's 7x7 conv, or with ``deep_stem`` the "v1c" stem of three 3x3 convs.
"""

from __future__ import annotations

from torch import nn

from pipeline.model.arch import SEGMENTATION_DILATIONS, SEGMENTATION_STRIDES, ArchSpec
from pipeline.model.imagenet_resnet import ImageNetResNet
from pipeline.model.resnet import conv3x3

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


class DilatedResNet(ImageNetResNet):
    """The block layout of DeepLab-V3's backbone: ImageNet's blocks at output stride 8."""

    STRIDES = SEGMENTATION_STRIDES

    def __init__(self, arch: ArchSpec, in_channels: int, image_shape: tuple[int, int], deep_stem: bool) -> None:
        super().__init__(arch, in_channels, image_shape)
        self.deep_stem = deep_stem

    def stem(self) -> nn.Module:
        return DeepStem(self.in_channels, self.arch.stem_width) if self.deep_stem else super().stem()

    def dilation(self, stage: int, block: int) -> int:
        return block_dilation(stage, block)
