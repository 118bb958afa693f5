"""pipeline.model.resnet: the CIFAR ResNet of docs/reference.md as a flat, seedable block list."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.model.resnet import (
    BasicBlock,
    CifarResNet,
    Classifier,
    Stem,
    init_weights,
)


def expected_shape(index: int, n: int, in_channels: int = 3, size: int = 32) -> tuple[int, int]:
    """docs/reference.md: stem/stage 1 at 16 x size, stage 2 at 32 x size/2, stage 3 at 64 x size/4."""
    if index < 0:
        return in_channels, size
    if index == 0:
        return 16, size
    stage = (index - 1) // n  # 0, 1, 2
    return (16, 32, 64)[stage], size >> stage


@pytest.mark.parametrize("n", [1, 2, 5])
def test_block_shapes_and_chained_forward(n):
    net = CifarResNet(n, 3, (32, 32))
    assert len(net) == 1 + 3 * n
    assert net.shape(-1) == (3, 32, 32)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for index in range(len(net)):
            block = net.build(index).eval()
            x = block(x)
            channels, size = expected_shape(index, n)
            assert net.shape(index) == (channels, size, size)
            assert tuple(x.shape) == (2, channels, size, size)


def test_stride_and_shortcut_placement_resnet32():
    net = CifarResNet(5, 3, (32, 32))
    assert isinstance(net.build(0), Stem)
    for index in range(1, len(net)):
        block = net.build(index)
        assert isinstance(block, BasicBlock)
        first_of_downsampling_stage = index in (6, 11)
        assert block.conv1.stride == ((2, 2) if first_of_downsampling_stage else (1, 1))
        if first_of_downsampling_stage:
            conv, bn = block.shortcut[0], block.shortcut[1]
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
            assert conv.bias is None and isinstance(bn, nn.BatchNorm2d)
        else:
            assert isinstance(block.shortcut, nn.Identity)
        assert block.conv1.bias is None and block.conv2.bias is None


def test_resnet32_parameter_count():
    """Stem + 15 BasicBlocks (1x1-conv shortcuts at the two downsampling blocks) + 64->10 linear."""
    def conv(cin, cout, k=3):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    stem = conv(3, 16) + bn(16)
    plain = {c: 2 * conv(c, c) + 2 * bn(c) for c in (16, 32, 64)}
    down = {c: conv(c // 2, c) + conv(c, c) + 2 * bn(c) + conv(c // 2, c, 1) + bn(c) for c in (32, 64)}
    expected = stem + 5 * plain[16] + down[32] + 4 * plain[32] + down[64] + 4 * plain[64] + 64 * 10 + 10
    net = CifarResNet(5, 3, (32, 32))
    model = nn.Sequential(*(net.build(i) for i in range(len(net))), Classifier(64, 10))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 0.46e6 < expected < 0.48e6  # the ~0.47M of a ResNet-32


def test_single_channel_stem_and_other_image_sizes():
    net = CifarResNet(1, 1, (96, 96))
    with torch.no_grad():
        out = net.build(0).eval()(torch.randn(2, 1, 96, 96))
    assert out.shape == (2, 16, 96, 96)
    assert net.shape(3) == (64, 24, 24)


def test_init_weights_follows_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, bias=True), nn.BatchNorm2d(64), nn.Conv2d(64, 128, 1),
                          nn.Linear(8, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)
    init_weights(model)
    conv3, bn, conv1, linear = model
    assert abs(conv3.weight.std().item() - math.sqrt(2.0 / (3 * 3 * 64))) < 0.05 * math.sqrt(2.0 / (9 * 64))
    assert abs(conv3.weight.mean().item()) < 0.01
    assert abs(conv1.weight.std().item() - math.sqrt(2.0 / 128)) < 0.05 * math.sqrt(2.0 / 128)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # conv biases and linear layers are left as they were (the references re-initialise neither)
    assert torch.all(conv3.bias == 0.123) and torch.all(conv1.bias == 0.123)
    assert torch.all(linear.weight == 0.123) and torch.all(linear.bias == 0.123)


def test_conv_bias_keeps_pytorchs_default_draw():
    torch.manual_seed(3)
    conv = nn.Conv2d(12, 3, 3, padding=1)
    drawn = conv.bias.detach().clone()
    init_weights(conv)
    assert torch.equal(conv.bias, drawn)
    bound = 1.0 / math.sqrt(12 * 3 * 3)  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert torch.all(drawn.abs() <= bound) and torch.any(drawn != 0)


def test_build_is_deterministic_under_a_seed():
    net = CifarResNet(2, 3, (32, 32))
    torch.manual_seed(11)
    a = net.build(3)
    torch.manual_seed(11)
    b = net.build(3)
    torch.manual_seed(12)
    c = net.build(3)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
