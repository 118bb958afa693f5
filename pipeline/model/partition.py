"""Where the network is cut: published tables, even splits, explicit and balanced cut lists.

A cut is the flat index of the last block of a module; ``module_ranges`` turns K-1 cuts into
K half-open block ranges. ``min_max_partition`` balances any per-module cost (predicted
seconds, activation bytes) under an optional cap on another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from pipeline.config.cuts import Cut, cut_to_flat
from pipeline.model.arch import ArchSpec

# docs/reference.md, equal-layer tables, keyed by blocks per stage (ResNet-32: 5, ResNet-110: 18).
EQUAL_TABLES: dict[tuple[int, ...], dict[int, list[Cut]]] = {
    (5, 5, 5): {
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4],
             [3, 0], [3, 1], [3, 2], [3, 3]],
    },
    (18, 18, 18): {
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7], [2, 11],
             [2, 15], [3, 1], [3, 5], [3, 9], [3, 13]],
    },
}

# InfoPro's Cityscapes cut (docs/reference.md): module 0 of DeepLab-V3 R101 ends after layer3[12].
SEGMENTATION_TABLES: dict[tuple[int, ...], dict[int, list[Cut]]] = {
    (3, 4, 23, 3): {2: [[3, 12]]},
}


def even_cuts(blocks: int, modules: int) -> list[int]:
    """K groups of consecutive blocks whose sizes differ by at most one (later groups larger)."""
    base, extra = divmod(blocks, modules)
    sizes = [base + (1 if index >= modules - extra else 0) for index in range(modules)]
    cuts, end = [], 0
    for size in sizes[:-1]:
        end += size
        cuts.append(end - 1)
    return cuts


def equal_cuts(blocks: tuple[int, ...], modules: int) -> list[int]:
    table = EQUAL_TABLES.get(blocks, {}).get(modules)
    if table is not None:
        return [cut_to_flat(cut, blocks) for cut in table]
    return even_cuts(1 + sum(blocks), modules)


def default_cuts(arch: ArchSpec, modules: int) -> list[int]:
    """The cuts of local.partition = 'equal': the family's published table, else an even split.

    The segmentation networks have their own table: ResNet-101's blocks per stage are also
    torchvision's resnet101, whose classification cuts stay the even split.
    """
    if arch.family != "segmentation":
        return equal_cuts(arch.blocks, modules)
    table = SEGMENTATION_TABLES.get(arch.blocks, {}).get(modules)
    if table is not None:
        return [cut_to_flat(cut, arch.blocks) for cut in table]
    return even_cuts(arch.units, modules)


def module_ranges(cuts: Sequence[int], blocks: int) -> list[tuple[int, int]]:
    starts = [0, *(cut + 1 for cut in cuts)]
    ends = [*(cut + 1 for cut in cuts), blocks]
    return list(zip(starts, ends))


def segment_ranges(blocks: int, segments: int) -> list[tuple[int, int]]:
    """[start, end) of the segments of whole blocks that activation checkpointing recomputes
    (pipeline/model/recompute.py): sizes differing by at most one, as the even cuts."""
    return module_ranges(even_cuts(blocks, segments), blocks)


# (module index, first block, end block) -> a cost of that module: seconds, bytes, ...
StageCost = Callable[[int, int, int], float]


class NoPartitionFits(ValueError):
    """No cut list keeps every module under the limit; ``smallest`` is the least limit one fits."""

    def __init__(self, limit: float, smallest: float) -> None:
        super().__init__(f"no partition keeps every module under {limit:g}; the smallest that fits is {smallest:g}")
        self.limit, self.smallest = limit, smallest


class NoPartitionBuilds(ValueError):
    """Every cut list has a module of infinite cost: one that cannot be built where it starts or ends."""

    def __init__(self) -> None:
        super().__init__("every partition has a module that cannot be built")


def min_max_partition(blocks: int, modules: int, cost: StageCost, size: StageCost | None = None,
                      limit: float = math.inf) -> list[int]:
    """Cuts minimising the largest module ``cost`` among those whose every module has ``size`` <= ``limit``.

    Exact, by dynamic programming over (modules so far, blocks so far); a module's cost may
    depend on its index (the first has no context encoders, the last carries the classifier), and is
    infinite for a module that cannot be built (cost.py: a head or context encoder that does not fit).
    """
    best: list[list[float]] = [[math.inf] * (blocks + 1) for _ in range(modules + 1)]
    choice = [[0] * (blocks + 1) for _ in range(modules + 1)]
    best[0][0] = 0.0
    for count in range(1, modules + 1):
        index = count - 1
        for end in range(count, blocks + 1) if count < modules else [blocks]:
            for start in range(index, end):
                if best[index][start] == math.inf:
                    continue
                if size is not None and limit < math.inf and size(index, start, end) > limit:
                    continue
                value = max(best[index][start], cost(index, start, end))
                if value < best[count][end]:
                    best[count][end], choice[count][end] = value, start
    if best[modules][blocks] == math.inf:
        if size is None or limit == math.inf:
            raise NoPartitionBuilds()

        def buildable_size(index: int, start: int, end: int) -> float:
            return size(index, start, end) if cost(index, start, end) < math.inf else math.inf

        smallest = max(size(i, a, b) for i, (a, b) in enumerate(
            module_ranges(min_max_partition(blocks, modules, buildable_size), blocks)))
        raise NoPartitionFits(limit, smallest)
    cuts, end = [], blocks
    for count in range(modules, 1, -1):
        end = choice[count][end]
        cuts.append(end - 1)
    return sorted(cuts)
