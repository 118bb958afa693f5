"""Where the network is cut: published tables, even splits, explicit and balanced cut lists.

A cut is the flat index of the last block of a module; ``module_ranges`` turns K-1 cuts into
K half-open block ranges.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import Cut, cut_to_flat

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


def flat_to_cut(flat: int, blocks: tuple[int, ...]) -> Cut:
    """Index in the flat block list -> [stage, block] (the inverse of config.cut_to_flat)."""
    if flat == 0:
        return [0, 0]
    block = flat - 1
    for stage, count in enumerate(blocks, start=1):
        if block < count:
            return [stage, block]
        block -= count
    raise ValueError(f"block {flat} is past the last of {blocks}")


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


def module_ranges(cuts: Sequence[int], blocks: int) -> list[tuple[int, int]]:
    starts = [0, *(cut + 1 for cut in cuts)]
    ends = [*(cut + 1 for cut in cuts), blocks]
    return list(zip(starts, ends))


def min_max_cuts(block_cost: Sequence[float], cut_cost: Sequence[float], modules: int,
                 input_cost: Sequence[float] | None = None) -> list[int]:
    """Cuts that minimise the largest module cost (exact, by dynamic programming).

    A module of blocks a..b costs sum(block_cost[a..b]) + cut_cost[b] when it is not the last
    module (its head, decoder) + input_cost[a] when it is not the first (its context encoders).
    """
    blocks = len(block_cost)
    input_cost = input_cost or [0.0] * blocks
    prefix = [0.0]
    for value in block_cost:
        prefix.append(prefix[-1] + value)

    def cost(start: int, end: int, last: bool) -> float:  # blocks [start, end)
        extra = (0.0 if last else cut_cost[end - 1]) + (input_cost[start] if start > 0 else 0.0)
        return prefix[end] - prefix[start] + extra

    infinity = float("inf")
    # best[m][e]: the smallest max-cost of splitting blocks [0, e) into m modules.
    best = [[infinity] * (blocks + 1) for _ in range(modules + 1)]
    choice = [[0] * (blocks + 1) for _ in range(modules + 1)]
    best[0][0] = 0.0
    for count in range(1, modules + 1):
        for end in range(count, blocks + 1):
            last = count == modules and end == blocks
            for start in range(count - 1, end):
                value = max(best[count - 1][start], cost(start, end, last))
                if value < best[count][end]:
                    best[count][end], choice[count][end] = value, start
    cuts, end = [], blocks
    for count in range(modules, 1, -1):
        end = choice[count][end]
        cuts.append(end - 1)
    return sorted(cuts)
