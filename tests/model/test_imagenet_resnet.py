"""pipeline.model.imagenet_resnet and InfoPro's ImageNet module: torchvision's layouts as flat block lists,
the published cuts, the ImageNet head and decoder, and training through the generic machinery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.loading import load_config
from pipeline.data.specs import dataset_spec
from pipeline.model.arch import resolve_arch
from pipeline.model.decoder import ImageNetDecoder
from pipeline.model.imagenet_resnet import Bottleneck, ImageNetResNet, ImageNetStem
from pipeline.model.network import build_module, make_layout, make_net
from pipeline.model.networks.registry import family_named
from pipeline.model.resnet import BasicBlock, Classifier
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.assemble import run
from pipeline.runtime.packet import Packet

CPU = torch.device("cpu")
PUBLISHED = Path(__file__).resolve().parents[2] / "configs" / "published" / "imagenet"

# torchvision's documented parameter counts (its model pages, ImageNet-1k weights: 1000 classes).
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
}


def imagenet_net(arch: str, size: int = 224) -> ImageNetResNet:
    return ImageNetResNet(resolve_arch("imagenet", arch), 3, (size, size))


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMETERS))
def test_parameter_counts_equal_torchvisions(arch):
    net = imagenet_net(arch, size=64)  # no count depends on the image's size (the classifier pools)
    width = net.shape(len(net) - 1)[0]
    with torch.device("meta"):  # counted, not drawn: 88 M random draws for ResNeXt-101 would tell nothing more
        blocks = sum(p.numel() for index in range(len(net)) for p in net.build(index).parameters())
        classifier = sum(p.numel() for p in Classifier(width, 1000).parameters())
    assert blocks + classifier == TORCHVISION_PARAMETERS[arch]


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMETERS))
def test_every_block_produces_its_declared_shape_at_64(arch):
    net = imagenet_net(arch, size=64)
    x = torch.randn(1, 3, 64, 64)
    expansion = 4 if "resnet18" != arch != "resnet34" else 1
    # stem: /4 (conv stride 2 + max pool); stages 2..4 halve on entry
    expected = {0: (64, 16)}
    index = 1
    for stage, count in enumerate(resolve_arch("imagenet", arch).blocks):
        for _ in range(count):
            expected[index] = (64 * 2**stage * expansion, 16 >> stage)
            index += 1
    assert len(net) == len(expected) and net.shape(-1) == (3, 64, 64)
    with torch.no_grad():
        for index in range(len(net)):
            x = net.build(index).eval()(x)
            channels, size = expected[index]
            assert net.shape(index) == (channels, size, size)
            assert tuple(x.shape) == (1, channels, size, size)


def test_odd_sizes_round_up_like_torchvision():
    net = imagenet_net("resnet18", size=57)  # 57 -> 29 (conv) -> 15 (pool) -> 8 -> 4 -> 2
    with torch.no_grad():
        x = torch.randn(1, 3, 57, 57)
        for index in range(len(net)):
            x = net.build(index).eval()(x)
            assert x.shape[-1] == net.shape(index)[-1]
    assert [net.shape(i)[-1] for i in (0, 2, 4, 6, 8)] == [15, 15, 8, 4, 2]


def test_resnext101_block_layout():
    net = imagenet_net("resnext101_32x8d")
    stem = net.build(0)
    assert isinstance(stem, ImageNetStem)
    conv, pool = stem[0], stem[3]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    first = net.build(1)  # layer1[0]: width = 64 * 8 / 64 * 32 = 256, expand to 256, 1x1 shortcut (64 -> 256)
    assert isinstance(first, Bottleneck)
    assert (first.conv1.out_channels, first.conv2.groups, first.conv3.out_channels) == (256, 32, 256)
    assert first.conv2.stride == (1, 1) and isinstance(first.shortcut, nn.Sequential)
    down = net.build(4)  # layer2[0]: the stride sits on the 3x3 conv, as in torchvision
    assert (down.conv1.stride, down.conv2.stride, down.shortcut[0].stride) == ((1, 1), (2, 2), (2, 2))
    assert (down.conv1.out_channels, down.conv3.out_channels) == (512, 512)
    assert isinstance(net.build(5).shortcut, nn.Identity)


def test_basic_networks_use_basic_blocks():
    net = imagenet_net("resnet34")
    assert all(isinstance(net.build(index), BasicBlock) for index in range(1, len(net)))
    assert [net.build(index).conv1.stride for index in (1, 4, 8, 14)] == [(1, 1), (2, 2), (2, 2), (2, 2)]


@pytest.mark.parametrize("arch,cut,flat", [("resnet101", [2, 0], 4), ("resnet152", [2, 5], 9),
                                           ("resnext101_32x8d", [2, 2], 6)])
def test_infopro_cuts_end_module_0_at_the_28x28_feature(arch, cut, flat):
    """The authors' decoder asserts a 28x28 input: their cut is inside layer2 at 224."""
    config = load_config(PUBLISHED / f"{arch}_infopro_k2.toml")
    spec = dataset_spec(config.data, config.model)
    assert config.local.partition == [cut]
    cuts = resolve_cuts(config, spec, CPU)
    assert cuts == [flat]
    layout = make_layout(config, spec, cuts)
    assert layout.ranges == [(0, flat + 1), (flat + 1, resolve_arch("imagenet", arch).units)]
    assert layout.output_shape(0) == (512, 28, 28)
    assert layout.output_shape(1) == (2048, 7, 7)


def test_imagenet_head_is_infopros():
    head = family_named("imagenet").parts().aux_head((512, 8, 8), 1000, load_config(None).local)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (512, 128, 1, 1), (128, 256, 3, 2), (256, 512, 3, 2), (512, 2048, 1, 1)]
    assert all(c.bias is None for c in convs)
    assert len([m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]) == 4
    (linear,) = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert (linear.in_features, linear.out_features) == (2048, 1000)
    assert head(torch.randn(2, 512, 28, 28)).shape == (2, 1000)
    other = family_named("imagenet").parts().aux_head((1024, 8, 8), 10, load_config(None).local)
    assert other(torch.randn(2, 1024, 4, 4)).shape == (2, 10)
    # the CIFAR family keeps local.aux
    cifar = family_named("cifar").parts().aux_head((64, 8, 8), 10, load_config(None, ["local.aux=0c1f"]).local)
    assert [type(m) for m in cifar] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]


def test_imagenet_decoder_is_infopros():
    config = load_config(None, ["data.name=image_folder", "model.arch=resnet50", "model.classes=1000"])
    spec = dataset_spec(config.data, config.model)
    decoder = family_named("imagenet").parts().decoder((512, 8, 8), spec, 1)
    assert isinstance(decoder, ImageNetDecoder)
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (512, 128, 1), (128, 32, 3), (32, 12, 3), (12, 3, 3)]
    assert all(c.bias is not None for c in convs)
    seen = []
    for step in decoder.steps:
        step.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    assert decoder(torch.randn(2, 512, 28, 28)).shape == (2, 3, 224, 224)
    assert seen == [(56, 56), (112, 112), (224, 224)]
    image = torch.randn(2, 3, 224, 224)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.allclose(decoder.target(image), (image * std + mean).clamp(0, 1))


def test_infopro_module_loss_is_bce_times_ixx_plus_ce_times_ixy():
    config = load_config(PUBLISHED / "resnet101_infopro_k2.toml")
    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, resolve_cuts(config, spec, CPU))
    module = build_module(config, layout, 0, CPU).train()
    assert (module.ixx, module.ixy) == (5.0, 0.75)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    labels = torch.tensor([3, 999])
    packet = Packet.from_batch(images, labels)
    torch.manual_seed(0)
    _, output, loss = module(packet)
    assert output.shape == (2, 512, 28, 28)
    with torch.no_grad():  # the same batch statistics: batch norm in train mode on the same output
        pixels = torch.sigmoid(module.decoder(output))
        target = (images * module.decoder.std + module.decoder.mean).clamp(0, 1)
        expected = 5.0 * F.binary_cross_entropy(pixels, target) + 0.75 * F.cross_entropy(module.head(output), labels)
    assert torch.allclose(loss, expected, rtol=1e-4)
    last = build_module(config, layout, 1, CPU)
    assert isinstance(last.head, Classifier) and last.decoder is None


@pytest.mark.parametrize("family,arch,kind,last", [("imagenet", "resnet50", Bottleneck, "bn3"),
                                                   ("imagenet", "resnet18", BasicBlock, "bn2"),
                                                   ("cifar", "resnet8", BasicBlock, "bn2")])
def test_zero_init_residual(family, arch, kind, last, make_config, build_modules):
    blocks = []
    for zero in (False, True):
        config = make_config(f"model.family={family}", f"model.arch={arch}", "local.modules=2",
                             f"model.zero_init_residual={str(zero).lower()}")
        _, _, _, modules = build_modules(config)
        blocks.append([b for m in modules for b in m.body.modules() if isinstance(b, kind)])
    plain, zeroed = blocks
    assert plain and len(plain) == len(zeroed)
    for a, b in zip(plain, zeroed):
        assert torch.all(getattr(a, last).weight == 1) and torch.all(getattr(b, last).weight == 0)
        others = [m for m in b.modules() if isinstance(m, nn.BatchNorm2d) and m is not getattr(b, last)]
        assert all(torch.all(m.weight == 1) for m in others)  # only the branch's last batch norm
    # a block with an identity shortcut whose branch starts at zero is ReLU(x)
    identity = next(b for b in zeroed if isinstance(b.shortcut, nn.Identity)).train()
    x = torch.randn(2, identity.conv1.in_channels, 4, 4)
    assert torch.equal(identity(x), torch.relu(x))


def test_make_net_follows_the_family(make_config):
    config = make_config()
    spec = dataset_spec(config.data, config.model)
    assert isinstance(make_net(make_config("model.arch=resnet50", "model.family=imagenet").arch, spec, False),
                      ImageNetResNet)
    assert len(make_net(make_config("model.arch=resnet50").arch, spec, False)) == 1 + 3 * 8


@pytest.mark.slow
@pytest.mark.parametrize("arch,context", [("resnet18", "R0"), ("resnet50", "R1E")])
def test_a_tiny_sequential_run_trains(arch, context, make_config, tmp_path):
    """K = 2 with InfoPro's ImageNet head and decoder (and a ContSup context) on 32x32 synthetic images."""
    config = make_config("model.family=imagenet", f"model.arch={arch}", "local.modules=2", "local.reconstruct=true",
                         f"local.context={context}", "local.ixx_1=5", "local.ixy_1=0.75", "train.max_steps=2",
                         "data.batch_size=4", "train.schedule=constant", "train.lr=0.01", out_dir=tmp_path / "run")
    summary = run(config)
    assert summary["steps"] == 2 and summary["modules"] == 2 and summary["arch"] == arch
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [event["loss"] for event in losses if event["event"] == "train"]
    assert len(train) == 4 and all(0 < loss < 50 for loss in train)
    # equal cuts of 9 / 17 units: an even split, module 0 ending in layer2
    assert summary["cut_points"] == {"resnet18": [[2, 0]], "resnet50": [[2, 3]]}[arch]
