"""Networks as a user would write them, named by the tests as model.arch = "user_networks:<factory>"."""

from __future__ import annotations

from torch import nn

# maps_then_vectors as the tests outside this folder name it (from the repository root, as any module path)
MAPS_THEN_VECTORS = "tests.model.networks.user_networks:maps_then_vectors"


def unit(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def maps_then_vectors(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    """Two conv units, a pooled flatten to vectors, a hidden linear layer, the logits: five blocks."""
    return nn.Sequential(unit(in_channels, 8, 1), unit(8, 16, 2), nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
                         nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, classes))


def as_a_list(in_channels: int, classes: int, image_size: tuple[int, int]) -> list[nn.Module]:
    return [unit(in_channels, 8, 2), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))]


def raises(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    raise ValueError("no such width")


def not_a_network(in_channels: int, classes: int, image_size: tuple[int, int]) -> int:
    return 3


def holds_a_number(in_channels: int, classes: int, image_size: tuple[int, int]) -> list[object]:
    return [unit(in_channels, 8, 1), 7]


def broken_chain(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    """Block 1 expects 32 channels where block 0 gives 8."""
    return nn.Sequential(unit(in_channels, 8, 1), unit(32, 8, 1), nn.Sequential(nn.Flatten(), nn.LazyLinear(classes)))


def no_logits(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(unit(in_channels, 8, 1), unit(8, 8, 1))


NOT_CALLABLE = 5
