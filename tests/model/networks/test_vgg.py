"""pipeline.model.networks.vgg: VGG-BN in its CIFAR form as a flat, seedable block list."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pipeline.data.specs import SPECS
from pipeline.errors import BadInput
from pipeline.model.networks.registry import family_named
from pipeline.model.networks.vgg import VGG, VGGBlock, VGGFamily

# Output (channels, side) of each block of vgg11_bn on 32x32 images: configuration A, a pool after
# convs 1, 2, 4, 6 and 8.
VGG11_32 = [(64, 16), (128, 8), (256, 8), (256, 4), (512, 4), (512, 2), (512, 2), (512, 1)]


def vgg(arch: str = "vgg11_bn", dataset: str = "cifar10", **changes: int) -> VGG:
    family = VGGFamily()
    return family.net(family.resolve(arch, lambda: SPECS[dataset]), dataclasses.replace(SPECS[dataset], **changes))


def test_the_family_is_registered_and_resolves_to_flat_cuts():
    assert isinstance(family_named("vgg"), VGGFamily)
    assert VGGFamily().names() == ("vgg11_bn", "vgg16_bn")
    units = {arch: VGGFamily().resolve(arch, lambda: SPECS["cifar10"]) for arch in ("vgg11_bn", "vgg16_bn")}
    assert [(s.family, s.units, s.blocks) for s in units.values()] == [("vgg", 8, None), ("vgg", 13, None)]
    with pytest.raises(BadInput, match=r"model.arch = 'vgg19' is not a VGG; allowed: vgg11_bn, vgg16_bn"):
        VGGFamily().resolve("vgg19", lambda: SPECS["cifar10"])


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_every_block_shape_agrees_with_a_real_forward(dataset):
    net = vgg(dataset=dataset)
    channels = SPECS[dataset].channels
    assert net.shape(-1) == (channels, 32, 32)
    torch.manual_seed(0)
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        for index, (width, side) in enumerate(VGG11_32):
            x = net.build(index)(x)
            assert net.shape(index) == (width, side, side) == tuple(x.shape[1:])
        assert net.classifier(10)(x).shape == (2, 10)


def test_vgg16_pools_after_its_blocks_1_3_6_9_12():
    net = vgg("vgg16_bn")
    assert len(net) == 13
    pooled = [index for index in range(len(net)) if isinstance(net.build(index)[-1], nn.MaxPool2d)]
    assert pooled == [1, 3, 6, 9, 12]
    assert net.shape(12) == (512, 1, 1)


def test_small_images_pool_to_one_pixel_not_to_nothing():
    assert vgg(image_size=28).shape(7) == (512, 1, 1)  # 14, 7, 4, 2, 1: rounding up at 7
    for side in (8, 1):
        net = vgg(image_size=side)
        x = torch.randn(2, 3, side, side)
        for index in range(len(net)):
            x = net.build(index)(x)
        assert x.shape == (2, 512, 1, 1)


def test_parameter_count_of_vgg11_bn_on_cifar10():
    # Convs with bias 3x3: sum of 9*cin*cout + cout; batch norms 2 per channel; linear 512*10 + 10.
    # The CIFAR VGG11 figure: 9,231,114.
    pairs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    expected = sum(9 * cin * cout + cout + 2 * cout for cin, cout in pairs) + 512 * 10 + 10
    assert expected == 9_231_114
    net = vgg()
    modules = [net.build(index) for index in range(len(net))] + [net.classifier(10)]
    assert sum(p.numel() for m in modules for p in m.parameters()) == expected


def test_a_block_built_twice_from_one_seed_is_the_same_and_another_seed_differs():
    net = vgg()
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        states.append(net.build(2).state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert not torch.equal(states[0]["0.weight"], states[2]["0.weight"])


def test_initialisation_is_fan_out_normal_with_zero_bias_and_unit_batch_norm():
    torch.manual_seed(0)
    block = VGGBlock(128, 256, pooled=False)
    conv, norm = block[0], block[1]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
    assert not conv.bias.any()
    assert torch.equal(norm.weight, torch.ones(256)) and not norm.bias.any()
