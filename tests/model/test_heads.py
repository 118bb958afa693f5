"""pipeline.model.heads: the auxiliary heads 0c1f ... 2c2f of docs/reference.md."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.heads import build_aux_head

SIZES = {16: 32, 32: 16, 64: 8}  # module output channels -> spatial side for 32x32 input


def layers(head, kind):
    return [m for m in head.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", ["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"])
@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("widen", [1, 2])
def test_head_structure_and_output(name, channels, widen):
    out, feature_dim = 10, 24
    head = build_aux_head(name, channels, out, widen, feature_dim)
    convs, linears = layers(head, nn.Conv2d), layers(head, nn.Linear)
    assert len(convs) == int(name[0]) and len(linears) == int(name[2])

    conv_width = (32 if channels == 16 else 64) * widen
    for index, conv in enumerate(convs):
        assert conv.kernel_size == (3, 3) and conv.bias is None
        assert conv.in_channels == (channels if index == 0 else conv_width)
        assert conv.out_channels == conv_width
        expected_stride = (1 if channels == 64 else 2) if index == 0 else 1
        assert conv.stride == (expected_stride, expected_stride)
    assert len(layers(head, nn.BatchNorm2d)) == len(convs)

    pooled = conv_width if convs else channels
    hidden = feature_dim * widen
    assert linears[0].in_features == pooled
    for linear in linears[:-1]:
        assert linear.out_features == hidden
    for linear in linears[1:]:
        assert linear.in_features == hidden
    assert linears[-1].out_features == out

    head.eval()
    with torch.no_grad():
        y = head(torch.randn(2, channels, SIZES[channels], SIZES[channels]))
    assert y.shape == (2, out)


def test_contrastive_head_outputs_the_feature_dim():
    head = build_aux_head("1c2f", 32, 128, 1, 128)  # out = F for the contrastive loss
    with torch.no_grad():
        assert head.eval()(torch.randn(3, 32, 16, 16)).shape == (3, 128)


def test_default_head_is_reference_1c2f():
    head = build_aux_head("1c2f", 16, 10, 1, 128)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "Linear"]
