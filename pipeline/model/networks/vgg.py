"""VGG with batch norm in its CIFAR form, as a flat list of blocks: one per conv (conv3x3, BN, ReLU,
and the max pool where the VGG configuration has one after it); the classifier (global average pool,
linear from 512) belongs to the last module.

The pools round up (ceil_mode), so images smaller than 32x32 shrink to 1x1 and never to nothing.
"""

from __future__ import annotations

from torch import nn

from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput, clip
from pipeline.model.networks.base import BlockNet, Shape
from pipeline.model.networks.family import DataShape, NetworkFamily, NetworkSpec, register_network
from pipeline.model.resnet import Classifier, init_weights

POOL = "M"
# Simonyan and Zisserman's configurations A and D: conv widths, POOL after a conv halves the maps.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11_bn": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
}


def conv_layers(config: tuple[int | str, ...]) -> tuple[tuple[int, bool], ...]:
    """(width, pooled after) of each conv of a configuration."""
    layers: list[tuple[int, bool]] = []
    for item in config:
        if isinstance(item, int):
            layers.append((item, False))
        else:
            layers[-1] = (layers[-1][0], True)
    return tuple(layers)


class VGGBlock(nn.Sequential):
    """conv3x3 (with bias, as VGG's) -> BN -> ReLU (-> max pool 2, rounding up)."""

    def __init__(self, cin: int, cout: int, pooled: bool) -> None:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        pool = [nn.MaxPool2d(2, ceil_mode=True)] if pooled else []
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True), *pool)
        # A block built alone starts as in a LocalModule (whose init_weights redraws the conv and batch norm
        # alike); the bias is zeroed as torchvision's VGG does, which init_weights leaves as it is.
        init_weights(self)
        assert conv.bias is not None
        nn.init.zeros_(conv.bias)


class VGG(BlockNet):
    def __init__(self, name: str, layers: tuple[tuple[int, bool], ...], input_shape: Shape) -> None:
        super().__init__(name, input_shape)
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def build(self, index: int) -> nn.Module:
        cin = self.input_shape[0] if index == 0 else self.layers[index - 1][0]
        width, pooled = self.layers[index]
        return VGGBlock(cin, width, pooled)

    def classifier(self, classes: int) -> nn.Module:
        return Classifier(self.layers[-1][0], classes)


class VGGFamily(NetworkFamily):
    name = "vgg"

    def names(self) -> tuple[str, ...]:
        return tuple(CONFIGS)

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        if arch not in CONFIGS:
            raise BadInput(f"model.arch = {clip(arch)!r} is not a VGG; allowed: {', '.join(CONFIGS)}")
        layers = conv_layers(CONFIGS[arch])
        return NetworkSpec(arch, self.name, len(layers), layout=layers)

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> VGG:
        return VGG(spec.name, spec.layout, (data.channels, *data.image_shape))


register_network(VGGFamily())
