"""Auxiliary heads that train every module but the last (docs/reference.md: 0c1f ... 2c2f, and
InfoPro's ImageNet and segmentation heads)."""

from __future__ import annotations

from torch import nn

from pipeline.model.layers import conv_bn_relu


def _head_conv_width(channels: int, widen: int) -> tuple[int, int]:
    """(out channels, stride) of a head's first conv for a module output of ``channels``."""
    width = (32 if channels == 16 else 64) * widen
    return width, (1 if channels >= 64 else 2)


def _linears(count: int, width: int, hidden: int, out: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(count - 1):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    return layers + [nn.Linear(width, out)]


def build_aux_head(name: str, channels: int, out: int, widen: int, hidden: int) -> nn.Sequential:
    """A head named by its conv count and linear count, e.g. '1c2f'.

    ``out`` is the local method's head width (``LocalMethod.head_width``): the class count, or
    local.aux_feature_dim for the contrastive loss.
    """
    convs, linears = int(name[0]), int(name[2])
    layers: list[nn.Module] = []
    width = channels
    if convs:
        conv_width, stride = _head_conv_width(channels, widen)
        for index in range(convs):
            layers += conv_bn_relu(width, conv_width, 3, stride=stride if index == 0 else 1)
            width = conv_width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, *_linears(linears, width, hidden * widen, out))


def build_imagenet_head(channels: int, out: int) -> nn.Sequential:
    """InfoPro's ImageNet head: 1x1 to 128, two 3x3/2 convs to 256 and 512, 1x1 to 2048, pool, linear."""
    return nn.Sequential(
        *conv_bn_relu(channels, 128, 1),
        *conv_bn_relu(128, 256, 3, stride=2),
        *conv_bn_relu(256, 512, 3, stride=2),
        *conv_bn_relu(512, 2048, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, out),
    )
