"""Which network a config names: the one owner of every architecture fact (docs/reference.md).

Two families share the ``resnet<depth>`` names: CIFAR ResNets of depth 6n+2 (3x3 stem, three
stages of n basic blocks) and torchvision's ImageNet ResNets / ResNeXts (7x7 stem + max pool,
four stages of basic or bottleneck blocks). ``resnet50`` and ``resnet152`` exist in both, so
the family decides; it defaults to the one the dataset is made for. The third family is
DeepLab-V3 for semantic segmentation: a dilated bottleneck ResNet-50/101 of output stride 8 with
an ASPP head, and an FCN auxiliary head on stage 3. No torch here: config validation reads
these facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import BadInput, clip

Family = Literal["cifar", "imagenet", "segmentation"]
BlockKind = Literal["basic", "bottleneck"]

# Datasets held in memory, of CIFAR size, whose networks are the CIFAR ones by default.
RESIDENT_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "synthetic")
# Datasets of whole-image-folder size, whose networks are the ImageNet ones by default.
IMAGENET_DATASETS = ("image_folder",)
# Datasets of per-pixel label maps (pipeline/data/segmentation.py streams them), whose networks are the
# segmentation ones by default.
SEGMENTATION_DATASETS = ("cityscapes", "segmentation_folder")


@dataclass(frozen=True)
class ArchSpec:
    """The layout of a ResNet: what every block list, cut and profile is computed from."""

    name: str
    family: Family
    block: BlockKind
    blocks: tuple[int, ...]  # residual blocks per stage
    widths: tuple[int, ...]  # output channels of each stage
    groups: int = 1  # ResNeXt cardinality of the bottleneck's 3x3 conv
    width_per_group: int = 64  # ResNeXt: channels per group at the first stage (64: plain ResNet)

    @property
    def stem_width(self) -> int:
        return 16 if self.family == "cifar" else 64

    @property
    def units(self) -> int:
        """Stem + residual blocks: the units a cut can follow."""
        return 1 + sum(self.blocks)


# torchvision's names: (block, blocks per stage, groups, width per group).
_IMAGENET: dict[str, tuple[BlockKind, tuple[int, ...], int, int]] = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
}
IMAGENET_ARCHS: tuple[str, ...] = tuple(_IMAGENET)
BOTTLENECK_EXPANSION = 4

# DeepLab-V3 (MMSegmentation's "r50-d8" / "r101-d8"): bottleneck blocks per stage of its backbone.
_SEGMENTATION: dict[str, tuple[int, ...]] = {
    "deeplabv3_resnet50": (3, 4, 6, 3),
    "deeplabv3_resnet101": (3, 4, 23, 3),
}
SEGMENTATION_ARCHS: tuple[str, ...] = tuple(_SEGMENTATION)
# Output stride 8: stages 3 and 4 keep stage 2's resolution and dilate their 3x3 convs instead.
SEGMENTATION_STRIDES = (1, 2, 1, 1)
SEGMENTATION_DILATIONS = (1, 1, 2, 4)
# The FCN auxiliary head reads the output of this stage (1-based: layer3).
AUX_STAGE = 3

# The deepest CIFAR ResNet published; far deeper ones cannot be built in any memory.
MAX_CIFAR_DEPTH = 1202
_CIFAR_RE = re.compile(r"^resnet(\d+)$")


def aux_block(arch: ArchSpec) -> int:
    """Flat index of the block whose output the FCN auxiliary head reads: the last of stage 3."""
    return sum(arch.blocks[:AUX_STAGE])


def resolve_arch(family: Family, arch: str) -> ArchSpec:
    """The layout ``arch`` names in ``family``; BadInput when it names none there."""
    if family == "segmentation":
        if arch not in _SEGMENTATION:
            raise BadInput(f"model.arch = {clip(arch)!r} is not a segmentation network; allowed with "
                           f"model.family = 'segmentation': {', '.join(SEGMENTATION_ARCHS)}")
        blocks = _SEGMENTATION[arch]
        widths = tuple(64 * 2**stage * BOTTLENECK_EXPANSION for stage in range(len(blocks)))
        return ArchSpec(arch, family, "bottleneck", blocks, widths)
    if arch in _SEGMENTATION:
        raise BadInput(f"model.arch = {clip(arch)!r} is a segmentation network; set model.family = "
                       "'segmentation' (the default for cityscapes and segmentation_folder)")
    if family == "imagenet":
        if arch not in _IMAGENET:
            other = " (a CIFAR depth: set model.family = 'cifar')" if is_cifar_depth(arch) else ""
            raise BadInput(f"model.arch = {clip(arch)!r} is not an ImageNet ResNet{other}; allowed with "
                           f"model.family = 'imagenet': {', '.join(IMAGENET_ARCHS)}")
        block, blocks, groups, width_per_group = _IMAGENET[arch]
        expansion = 1 if block == "basic" else BOTTLENECK_EXPANSION
        widths = tuple(64 * 2**stage * expansion for stage in range(len(blocks)))
        return ArchSpec(arch, family, block, blocks, widths, groups, width_per_group)
    n = cifar_blocks_per_stage(arch)
    return ArchSpec(arch, family, "basic", (n, n, n), (16, 32, 64))


def cifar_blocks_per_stage(arch: str) -> int:
    """n of a CIFAR ResNet of depth 6n+2 ('resnet32' -> 5)."""
    match = _CIFAR_RE.match(arch)
    digits = match.group(1).lstrip("0") if match else ""
    # Compare lengths first: int() refuses thousands of digits with its own ValueError.
    if len(digits) > len(str(MAX_CIFAR_DEPTH)) or (match and int(match.group(1)) > MAX_CIFAR_DEPTH):
        raise BadInput(
            f"model.arch = {clip(arch)!r} is deeper than resnet{MAX_CIFAR_DEPTH}, the deepest CIFAR ResNet "
            f"published; use a depth 6n+2 of at most {MAX_CIFAR_DEPTH}"
        )
    if not is_cifar_depth(arch):
        other = " (an ImageNet network: set model.family = 'imagenet')" if arch in _IMAGENET else ""
        raise BadInput(
            f"model.arch = {clip(arch)!r} is not a CIFAR ResNet{other}; allowed: resnet<6n+2> with n >= 1 "
            "(resnet8, resnet20, resnet32, resnet56, resnet110, ...), or with model.family = 'imagenet' "
            f"{', '.join(IMAGENET_ARCHS)}"
        )
    return (int(digits) - 2) // 6


def is_cifar_depth(arch: str) -> bool:
    """Does ``arch`` name a CIFAR ResNet: resnet<6n+2>, n >= 1, at most MAX_CIFAR_DEPTH?"""
    match = _CIFAR_RE.match(arch)
    if match is None or len(match.group(1)) > len(str(MAX_CIFAR_DEPTH)):
        return False
    depth = int(match.group(1))
    return 8 <= depth <= MAX_CIFAR_DEPTH and (depth - 2) % 6 == 0

