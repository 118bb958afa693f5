"""torchvision's ImageNet ResNets and ResNeXts as a flat list of blocks, cut like the CIFAR ones.

Block 0 is the stem (conv7x7/2 + batch norm + ReLU + max pool 3x3/2), then the residual blocks
of the four stages (torchvision's layer1 .. layer4) in order; the classifier (pool + linear) is
built separately and belongs to the last module. The layout, block for block, is torchvision's
(stride on the bottleneck's 3x3 conv, 1x1 conv + batch norm shortcut where the shape changes),
so parameter counts equal torchvision's; initialisation is resnet.init_weights (torchvision's
kaiming normal, fan-out) with the optional zero-init of each block's last batch norm.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.cuts import stage_and_block
from pipeline.model.arch import BOTTLENECK_EXPANSION, ArchSpec
from pipeline.model.networks.base import BlockNet
from pipeline.model.resnet import BasicBlock, Classifier, ResidualBlock, conv3x3, shortcut


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class ImageNetStem(nn.Sequential):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt, carries the stride and any dilation), 1x1 expand; then
    the shortcut."""

    def __init__(self, cin: int, planes: int, stride: int, groups: int, width_per_group: int,
                 dilation: int = 1) -> None:
        super().__init__()
        width = planes * width_per_group // 64 * groups
        cout = planes * BOTTLENECK_EXPANSION
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ImageNetResNet(BlockNet):
    """The block layout of an ImageNet ResNet / ResNeXt; builds any single block on demand.

    Subclasses change what differs per stage (its stride, its blocks' dilation) and the stem.
    """

    STRIDES = (1, 2, 2, 2)  # of each stage's first block

    def __init__(self, arch: ArchSpec, in_channels: int, image_shape: tuple[int, int]) -> None:
        super().__init__(arch.name, (in_channels, *image_shape))
        self.arch = arch
        self.in_channels = in_channels

    def __len__(self) -> int:
        return self.arch.units

    def _stage_of(self, index: int) -> tuple[int, int]:
        """Flat residual-block index (>= 1) -> (stage 0..3, block within the stage)."""
        stage, block = stage_and_block(index, self.arch.blocks)
        return stage - 1, block

    def stem(self) -> nn.Module:
        return ImageNetStem(self.in_channels, self.arch.stem_width)

    def dilation(self, stage: int, block: int) -> int:
        """Dilation of the 3x3 conv of ``block`` in ``stage``."""
        return 1

    def build(self, index: int) -> nn.Module:
        arch = self.arch
        if index == 0:
            return self.stem()
        stage, block = self._stage_of(index)
        cin = self.shape(index - 1)[0]
        stride = self.STRIDES[stage] if block == 0 else 1
        if arch.block == "basic":
            return BasicBlock(cin, arch.widths[stage], stride)
        planes = arch.widths[stage] // BOTTLENECK_EXPANSION
        return Bottleneck(cin, planes, stride, arch.groups, arch.width_per_group, self.dilation(stage, block))

    def classifier(self, classes: int) -> nn.Module:
        return Classifier(self.arch.widths[-1], classes)
