"""The conv + batch norm + ReLU unit that the heads, the decoders and the context encoders are built from."""

from __future__ import annotations

from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 bias: bool = False) -> nn.Sequential:
    """Conv with 'same' padding, batch norm, ReLU (MMSegmentation's ConvModule with batch norm).

    The conv has no bias where batch norm follows, except where the published code keeps it
    (InfoPro's decoders and head of module 0, ContSup's encoders): ``bias``. Unpacked into a
    larger ``nn.Sequential`` (``*conv_bn_relu(...)``) its layers number on in that one.
    """
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2),
                                   dilation=dilation, bias=bias),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
