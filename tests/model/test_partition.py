"""pipeline.model.partition: cut tables, even splits, ranges and the min-max balancer."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pipeline.config.cuts import cut_to_flat, describe_cuts, flat_to_cut, written_cuts
from pipeline.data.specs import dataset_spec
from pipeline.model.arch import resolve_arch
from pipeline.model.partition import (
    EQUAL_TABLES,
    NoPartitionBuilds,
    NoPartitionFits,
    default_cuts,
    equal_cuts,
    even_cuts,
    min_max_partition,
    module_ranges,
)
from pipeline.performance.profile import resolve_cuts
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

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


def module_costs(cuts, blocks, cost):
    bounds = [0, *(c + 1 for c in cuts), blocks]
    return [cost(index, start, end) for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def brute_force(blocks, modules, cost, size=None, limit=math.inf):
    """The smallest largest-module cost over every cut list whose modules all fit ``limit``."""
    best = math.inf
    for cuts in itertools.combinations(range(blocks - 1), modules - 1):
        if size is not None and max(module_costs(cuts, blocks, size)) > limit:
            continue
        best = min(best, max(module_costs(cuts, blocks, cost)))
    return best


def additive(block_cost, cut_cost, input_cost, modules):
    """A module's cost: its blocks, its head unless last, its encoders unless first."""
    def cost(index, start, end):
        extra = (0.0 if index == modules - 1 else cut_cost[end - 1]) + (input_cost[start] if index else 0.0)
        return sum(block_cost[start:end]) + extra
    return cost


def test_min_max_partition_toy_by_hand():
    flat = additive([1, 1, 1, 1, 4], [0] * 5, [0] * 5, 2)
    assert min_max_partition(5, 2, flat) == [3]
    assert min_max_partition(5, 2, additive([4, 1, 1, 1, 1], [0] * 5, [0] * 5, 2)) == [0]
    # a heavy head after block 1 pushes the cut elsewhere
    assert min_max_partition(4, 2, additive([1, 1, 1, 1], [0, 10, 0, 0], [0] * 4, 2)) in ([0], [2])
    # the fastest cut [3] puts 5 units of memory in module 0; under a cap of 3 the cut moves to [2]
    memory = additive([1, 1, 1, 2, 0], [0] * 5, [0] * 5, 2)
    assert min_max_partition(5, 2, flat, memory, limit=3) == [2]
    assert min_max_partition(5, 2, additive([1, 1, 1, 1, 1], [0] * 5, [0] * 5, 2)) == [1]  # later takes the extra


def test_min_max_partition_says_the_smallest_limit_that_fits():
    memory = additive([2, 2, 2, 2], [0] * 4, [0] * 4, 2)
    with pytest.raises(NoPartitionFits) as caught:
        min_max_partition(4, 2, memory, memory, limit=3.5)
    assert caught.value.smallest == 4
    assert min_max_partition(4, 2, memory, memory, limit=4) == [1]


@pytest.mark.parametrize("seed", range(6))
def test_min_max_partition_matches_brute_force(seed):
    rng = random.Random(seed)
    blocks = rng.randint(5, 9)
    draw = lambda: [rng.uniform(0.5, 5.0) for _ in range(blocks)]  # noqa: E731
    for modules in range(2, min(5, blocks) + 1):
        cost = additive(draw(), draw(), draw() if seed % 2 else [0.0] * blocks, modules)
        size = additive(draw(), draw(), draw(), modules)
        cuts = min_max_partition(blocks, modules, cost)
        assert len(cuts) == modules - 1
        assert cuts == sorted(set(cuts)) and cuts[0] >= 0 and cuts[-1] < blocks - 1
        assert max(module_costs(cuts, blocks, cost)) == pytest.approx(brute_force(blocks, modules, cost))
        # a cap between the least and the largest feasible one: the best under it, and never above it
        least = brute_force(blocks, modules, size)
        limit = least * rng.uniform(1.0, 1.5)
        capped = min_max_partition(blocks, modules, cost, size, limit)
        assert max(module_costs(capped, blocks, size)) <= limit
        assert max(module_costs(capped, blocks, cost)) == pytest.approx(brute_force(blocks, modules, cost, size, limit))
        with pytest.raises(NoPartitionFits) as caught:
            min_max_partition(blocks, modules, cost, size, least * 0.99)
        assert caught.value.smallest == pytest.approx(least)


def test_a_module_that_cannot_be_built_is_never_picked():
    flat = additive([1, 1, 1, 1, 4], [0] * 5, [0] * 5, 2)
    assert min_max_partition(5, 2, flat) == [3]

    def no_start_at_4(index, start, end):  # e.g. a context encoder that does not fit block 3's output
        return math.inf if index and start == 4 else flat(index, start, end)

    assert min_max_partition(5, 2, no_start_at_4) == [2]
    memory = additive([1, 1, 1, 2, 0], [0] * 5, [0] * 5, 2)
    assert min_max_partition(5, 2, no_start_at_4, memory, limit=3) == [2]
    with pytest.raises(NoPartitionFits) as caught:  # the smallest limit among the cuts that build
        min_max_partition(5, 2, no_start_at_4, memory, limit=2)
    assert caught.value.smallest == 3
    with pytest.raises(NoPartitionBuilds):
        min_max_partition(5, 2, lambda index, start, end: math.inf if index else 1.0)
    with pytest.raises(NoPartitionBuilds):
        min_max_partition(5, 2, lambda index, start, end: math.inf if index else 1.0, memory, limit=10)


@pytest.mark.parametrize("arch, modules, written", [
    ("resnet32", 4, "[[1, 2], [2, 1], [3, 0]] ([stage, block] after which a module ends)"),
    ("vit_tiny", 4, "[2, 5, 8] (block index after which a module ends)"),  # 13 blocks: 3, 3, 3, 4
    ("vgg11_bn", 2, "[3] (block index after which a module ends)"),
    (MAPS_THEN_VECTORS, 2, "[1] (block index after which a module ends)"),
])
def test_cuts_are_written_as_the_network_takes_them(make_config, arch, modules, written):
    config = make_config(f"model.arch={arch}", f"local.modules={modules}")
    cuts = resolve_cuts(config, dataset_spec(config.data, config.model), torch.device("cpu"))
    assert describe_cuts(cuts, config.arch) == written
    again = make_config(f"model.arch={arch}", f"local.modules={modules}",
                        f"local.partition={written_cuts(cuts, config.arch)}")
    # what is printed is taken back
    assert resolve_cuts(again, dataset_spec(again.data, again.model), torch.device("cpu")) == cuts


def test_resolve_cuts_explicit_and_equal(make_config):
    config = make_config("model.arch=resnet32", "local.modules=3", "local.partition=[[1, 0], [2, 3]]")
    assert resolve_cuts(config, dataset_spec(config.data, config.model), torch.device("cpu")) == [1, 9]
    config = make_config("model.arch=resnet32", "local.modules=4")
    assert resolve_cuts(config, dataset_spec(config.data, config.model), torch.device("cpu")) == [3, 7, 11]
    config = make_config("model.arch=resnet14", "local.modules=3")
    assert resolve_cuts(config, dataset_spec(config.data, config.model), torch.device("cpu")) == even_cuts(7, 3)


def test_segmentation_default_cuts_are_infopros_and_leave_classification_alone():
    r101 = resolve_arch("segmentation", "deeplabv3_resnet101")
    assert default_cuts(r101, 2) == [cut_to_flat([3, 12], r101.blocks)] == [20]  # stem, 3 + 4 blocks, layer3[0..12]
    assert default_cuts(r101, 1) == []
    assert default_cuts(r101, 4) == even_cuts(34, 4)  # no published table: an even split
    r50 = resolve_arch("segmentation", "deeplabv3_resnet50")
    assert default_cuts(r50, 2) == even_cuts(17, 2)
    classification = resolve_arch("imagenet", "resnet101")  # the same blocks per stage
    assert default_cuts(classification, 2) == equal_cuts((3, 4, 23, 3), 2) == even_cuts(34, 2)
