"""pipeline.model.dilated_resnet: DeepLab-V3's dilated ResNet-50/101 (output stride 8) as flat blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.arch import resolve_arch
from pipeline.model.dilated_resnet import DeepStem, DilatedResNet
from pipeline.model.imagenet_resnet import Bottleneck, ImageNetStem

# torchvision's published counts (25,557,032 and 44,549,160) less its fc layer (2048 x 1000 + 1000):
# dilation changes no parameter, so the backbones hold exactly torchvision's convolution weights.
BACKBONE_PARAMETERS = {"deeplabv3_resnet50": 25_557_032 - 2_049_000, "deeplabv3_resnet101": 44_549_160 - 2_049_000}
# The v1c stem: 3x3 convs 3 -> 32 -> 32 -> 64 and their batch norms, against the 7x7 conv 3 -> 64 and its.
DEEP_STEM_PARAMETERS = 9 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (32 + 32 + 64)
STEM_PARAMETERS = 49 * 3 * 64 + 2 * 64


def net(arch: str = "deeplabv3_resnet50", size: int = 64, deep_stem: bool = False) -> DilatedResNet:
    return DilatedResNet(resolve_arch("segmentation", arch), 3, (size, size), deep_stem)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", sorted(BACKBONE_PARAMETERS))
def test_parameter_counts_equal_torchvisions_backbone(arch):
    layout = net(arch)
    with torch.device("meta"):  # counted, not drawn
        assert sum(count(layout.build(index)) for index in range(len(layout))) == BACKBONE_PARAMETERS[arch]
        deeper = count(net(arch, deep_stem=True).build(0)) - count(layout.build(0))
    assert BACKBONE_PARAMETERS == {"deeplabv3_resnet50": 23_508_032, "deeplabv3_resnet101": 42_500_160}
    assert deeper == DEEP_STEM_PARAMETERS - STEM_PARAMETERS


@pytest.mark.parametrize("deep_stem", [False, True])
def test_output_stride_8_on_a_rectangular_crop(deep_stem):
    layout = DilatedResNet(resolve_arch("segmentation", "deeplabv3_resnet50"), 3, (64, 128), deep_stem)
    x = torch.randn(2, 3, 64, 128)
    # stem /4; layer1 keeps it; layer2 halves; layer3 and layer4 keep stage 2's resolution (dilated)
    sides = {0: (16, 32), 1: (16, 32), 2: (8, 16), 3: (8, 16), 4: (8, 16)}
    widths = {0: 64, 1: 256, 2: 512, 3: 1024, 4: 2048}
    blocks = resolve_arch("segmentation", "deeplabv3_resnet50").blocks
    stages = [0] + [stage + 1 for stage, n in enumerate(blocks) for _ in range(n)]
    with torch.no_grad():
        for index, stage in enumerate(stages):
            x = layout.build(index).eval()(x)
            assert tuple(x.shape) == (2, widths[stage], *sides[stage])
            assert layout.shape(index) == (widths[stage], *sides[stage])  # probed on the crop itself
    assert layout.shape(-1)[1] == 64 and len(layout) == 17


def test_strides_dilations_and_padding_per_block():
    layout = net("deeplabv3_resnet101")
    blocks = (3, 4, 23, 3)
    flat = 1
    for stage, n in enumerate(blocks):
        for position in range(n):
            with torch.device("meta"):  # the layers' settings, without drawing their weights
                block = layout.build(flat)
            assert isinstance(block, Bottleneck)
            conv = block.conv2
            # contract_dilation: a dilated stage's first block uses half its dilation
            dilation = {0: 1, 1: 1, 2: 1 if position == 0 else 2, 3: 2 if position == 0 else 4}[stage]
            stride = 2 if (stage, position) == (1, 0) else 1  # the stride sits on the 3x3 conv, layer2 only
            assert (conv.dilation, conv.padding, conv.stride) == ((dilation,) * 2, (dilation,) * 2, (stride,) * 2)
            assert block.conv1.stride == block.conv3.stride == (1, 1)
            shortcut = block.shortcut
            if position == 0:  # channels change (and layer2 strides): 1x1 conv + BN with the block's stride
                assert isinstance(shortcut, nn.Sequential) and shortcut[0].stride == (stride, stride)
            else:
                assert isinstance(shortcut, nn.Identity)
            flat += 1


def test_the_blocks_keep_the_imagenet_parameter_names():
    layout = net()
    names = {name.split(".")[0] for name, _ in layout.build(1).named_parameters()}
    assert names == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut"}
    assert isinstance(layout.build(0), ImageNetStem)


def test_deep_stem_is_resnet_v1c():
    stem = net(deep_stem=True).build(0)
    assert isinstance(stem, DeepStem)
    convs = [layer for layer in stem if isinstance(layer, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) for c in convs] == [
        (3, 32, (3, 3), (2, 2), (1, 1), None), (32, 32, (3, 3), (1, 1), (1, 1), None),
        (32, 64, (3, 3), (1, 1), (1, 1), None)]
    kinds = [type(layer) for layer in stem]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3 + [nn.MaxPool2d]
    with torch.no_grad():
        assert stem.eval()(torch.randn(2, 3, 64, 128)).shape == (2, 64, 16, 32)
