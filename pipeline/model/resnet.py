"""CIFAR ResNet (depth 6n+2) as a flat list of blocks, so a partition is a list of cut points.

Block 0 is the stem, blocks 1..3n the residual blocks; the classifier (pool + linear) is
built separately and belongs to the last module. Each block can be built on its own, so a
module builds only its own blocks, from its own seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.model.networks.base import BlockNet

STAGE_WIDTHS = (16, 32, 64)


class ResidualBlock(nn.Module):
    """A block whose residual branch ends in a batch norm before the addition."""

    def last_bn(self) -> nn.BatchNorm2d:
        raise NotImplementedError

    def zero_init_residual(self) -> None:
        """Start the branch at zero, so the block starts as the identity (Goyal et al., 2017)."""
        nn.init.zeros_(self.last_bn().weight)


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A 3x3 conv without bias; padding = dilation keeps the size at stride 1."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


class Stem(nn.Sequential):
    def __init__(self, in_channels: int) -> None:
        super().__init__(conv3x3(in_channels, STAGE_WIDTHS[0]), nn.BatchNorm2d(STAGE_WIDTHS[0]), nn.ReLU(inplace=True))


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + batch norm where the block changes the shape."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(ResidualBlock):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Classifier(nn.Sequential):
    def __init__(self, channels: int, classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


class CifarResNet(BlockNet):
    """The block layout of a ResNet-(6n+2); builds any single block on demand."""

    def __init__(self, blocks_per_stage: int, in_channels: int, image_shape: tuple[int, int]) -> None:
        super().__init__(f"resnet{6 * blocks_per_stage + 2}", (in_channels, *image_shape))
        self.n = blocks_per_stage
        self.in_channels = in_channels

    def __len__(self) -> int:
        return 1 + 3 * self.n

    def _stage_of(self, index: int) -> tuple[int, int]:
        """Flat residual-block index (>= 1) -> (stage 0..2, block within the stage)."""
        return divmod(index - 1, self.n)

    def build(self, index: int) -> nn.Module:
        if index == 0:
            return Stem(self.in_channels)
        stage, block = self._stage_of(index)
        cin = STAGE_WIDTHS[stage - 1] if block == 0 and stage > 0 else STAGE_WIDTHS[stage]
        stride = 2 if block == 0 and stage > 0 else 1
        return BasicBlock(cin, STAGE_WIDTHS[stage], stride)

    def classifier(self, classes: int) -> nn.Module:
        return Classifier(STAGE_WIDTHS[-1], classes)


def init_weights(module: nn.Module) -> None:
    """Conv weights ~ N(0, sqrt(2 / (k*k*out))), batch norm (1, 0); everything else as built.

    Conv biases (decoder, context encoders) and linear layers keep PyTorch's default init, as
    in both methods' published code: zeroing the decoder's last bias would change its
    pre-sigmoid output at step 0. Those defaults are drawn when the layers are constructed,
    so a module's weights depend on its seed and on its construction order, both fixed.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
