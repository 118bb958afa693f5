"""pipeline.model.partition: cut tables, even splits, ranges and the min-max balancer."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from pipeline.config import cut_to_flat
from pipeline.data.specs import dataset_spec
from pipeline.model.network import resolve_cuts
from pipeline.model.partition import (
    EQUAL_TABLES,
    equal_cuts,
    even_cuts,
    flat_to_cut,
    min_max_cuts,
    module_ranges,
)

# Copied from docs/reference.md ("Equal-layer tables"), independently of the code's own table.
REFERENCE_TABLES = {
    5: {
        2: [[2, 1]],
        3: [[1, 4], [2, 4]],
        4: [[1, 2], [2, 1], [3, 0]],
        8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2]],
        16: [[0, 0], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4],
             [3, 0], [3, 1], [3, 2], [3, 3]],
    },
    18: {
        2: [[2, 8]],
        3: [[1, 17], [2, 17]],
        4: [[1, 11], [2, 7], [3, 3]],
        8: [[1, 4], [1, 11], [2, 0], [2, 7], [2, 14], [3, 3], [3, 10]],
        16: [[1, 1], [1, 4], [1, 7], [1, 10], [1, 13], [1, 16], [2, 1], [2, 4], [2, 7], [2, 11],
             [2, 15], [3, 1], [3, 5], [3, 9], [3, 13]],
    },
}


def test_module_ranges():
    assert module_ranges([], 16) == [(0, 16)]
    assert module_ranges([7], 16) == [(0, 8), (8, 16)]
    assert module_ranges([0, 3, 9], 16) == [(0, 1), (1, 4), (4, 10), (10, 16)]


def test_resnet32_flat_indices_by_hand():
    assert equal_cuts((5, 5, 5), 2) == [7]  # [2, 1]: stem + 5 stage-1 blocks + 2 stage-2 blocks = 8 blocks
    assert equal_cuts((5, 5, 5), 4) == [3, 7, 11]
    assert equal_cuts((5, 5, 5), 16) == list(range(15))  # every block its own module
    assert equal_cuts((5, 5, 5), 1) == []


@pytest.mark.parametrize("per_stage", [5, 18])
@pytest.mark.parametrize("modules", [2, 3, 4, 8, 16])
def test_equal_cuts_use_the_published_tables(per_stage, modules):
    blocks = (per_stage,) * 3
    expected = [cut_to_flat(cut, blocks) for cut in REFERENCE_TABLES[per_stage][modules]]
    assert equal_cuts(blocks, modules) == expected
    assert EQUAL_TABLES[blocks][modules] == REFERENCE_TABLES[per_stage][modules]
    assert [flat_to_cut(flat, blocks) for flat in expected] == REFERENCE_TABLES[per_stage][modules]


@pytest.mark.parametrize("per_stage, modules", [(1, 2), (1, 4), (2, 3), (2, 7), (5, 5), (5, 7), (3, 10)])
def test_equal_cuts_fall_back_to_even_split(per_stage, modules):
    assert equal_cuts((per_stage,) * 3, modules) == even_cuts(1 + 3 * per_stage, modules)


@pytest.mark.parametrize("blocks", [4, 7, 10, 16, 19])
def test_even_cuts_properties(blocks):
    for modules in range(1, blocks + 1):
        cuts = even_cuts(blocks, modules)
        assert len(cuts) == modules - 1
        ranges = module_ranges(cuts, blocks)
        sizes = [end - start for start, end in ranges]
        assert ranges[0][0] == 0 and ranges[-1][1] == blocks
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes)  # later modules take the extra blocks


def test_even_cuts_by_hand():
    assert even_cuts(7, 2) == [2]  # sizes 3, 4
    assert even_cuts(10, 3) == [2, 5]  # 3, 3, 4
    assert even_cuts(4, 4) == [0, 1, 2]


@pytest.mark.parametrize("blocks", [(1, 1, 1), (5, 5, 5), (18, 18, 18), (2, 2, 2, 2), (3, 4, 23, 3), (3, 8, 36, 3)])
def test_flat_cut_round_trip(blocks):
    for flat in range(sum(blocks) + 1):
        assert cut_to_flat(flat_to_cut(flat, blocks), blocks) == flat
    with pytest.raises(ValueError):
        flat_to_cut(sum(blocks) + 1, blocks)


def brute_force(block_cost, cut_cost, modules, input_cost):
    """The smallest largest-module cost over every possible cut list, by enumeration."""
    blocks = len(block_cost)
    best = float("inf")
    for cuts in itertools.combinations(range(blocks - 1), modules - 1):
        best = min(best, max_cost(cuts, block_cost, cut_cost, input_cost))
    return best


def max_cost(cuts, block_cost, cut_cost, input_cost):
    worst = 0.0
    bounds = [0, *(c + 1 for c in cuts), len(block_cost)]
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        cost = sum(block_cost[start:end])
        if index < len(bounds) - 2:
            cost += cut_cost[end - 1]
        if index > 0:
            cost += input_cost[start]
        worst = max(worst, cost)
    return worst


def test_min_max_cuts_toy_by_hand():
    assert min_max_cuts([1, 1, 1, 1, 4], [0] * 5, 2) == [3]
    assert min_max_cuts([4, 1, 1, 1, 1], [0] * 5, 2) == [0]
    # a heavy head after block 1 pushes the cut elsewhere
    assert min_max_cuts([1, 1, 1, 1], [0, 10, 0, 0], 2) in ([0], [2])


@pytest.mark.parametrize("seed", range(6))
def test_min_max_cuts_matches_brute_force(seed):
    rng = random.Random(seed)
    blocks = rng.randint(5, 9)
    block_cost = [rng.uniform(0.5, 5.0) for _ in range(blocks)]
    cut_cost = [rng.uniform(0.0, 2.0) for _ in range(blocks)]
    input_cost = [rng.uniform(0.0, 2.0) for _ in range(blocks)] if seed % 2 else None
    for modules in range(2, min(5, blocks) + 1):
        cuts = min_max_cuts(block_cost, cut_cost, modules, input_cost)
        assert len(cuts) == modules - 1
        assert cuts == sorted(set(cuts)) and cuts[0] >= 0 and cuts[-1] < blocks - 1
        inputs = input_cost or [0.0] * blocks
        assert max_cost(cuts, block_cost, cut_cost, inputs) == pytest.approx(
            brute_force(block_cost, cut_cost, modules, inputs))


def test_resolve_cuts_explicit_and_equal(make_config):
    config = make_config("model.arch=resnet32", "local.modules=3", "local.partition=[[1, 0], [2, 3]]")
    assert resolve_cuts(config, dataset_spec(config), torch.device("cpu")) == [1, 9]
    config = make_config("model.arch=resnet32", "local.modules=4")
    assert resolve_cuts(config, dataset_spec(config), torch.device("cpu")) == [3, 7, 11]
    config = make_config("model.arch=resnet14", "local.modules=3")
    assert resolve_cuts(config, dataset_spec(config), torch.device("cpu")) == even_cuts(7, 3)
