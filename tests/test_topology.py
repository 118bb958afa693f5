"""The K x R layout: which rank holds which (stage, replica), and the jobs that do not fit."""

from __future__ import annotations

import pytest

from pipeline.errors import BadInput
from pipeline.topology import Topology, layout_replicas, place


@pytest.mark.parametrize("placement, expected", [
    ("chain", [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]),  # each replica's chain together
    ("stage", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),  # each stage's replicas together
])
def test_rank_to_stage_and_replica(placement: str, expected: list[tuple[int, int]]) -> None:
    assert [place(rank, 3, 2, placement) for rank in range(6)] == expected
    topologies = [Topology(rank, 6, None, 3, 2, (expected[rank][0],), placement=placement)  # type: ignore[arg-type]
                  for rank in range(6)]
    for rank, topology in enumerate(topologies):
        assert (topology.stage, topology.replica) == expected[rank]
        assert topology.rank_of(*expected[rank]) == rank
        assert topology.writer == (expected[rank][1] == 0)
    assert topologies[0].last_rank == expected.index((2, 0))


def test_replicas_are_derived_or_checked() -> None:
    assert layout_replicas(8, 2, 0) == 4 and layout_replicas(8, 2, 4) == 4 and layout_replicas(3, 3, 0) == 1
    with pytest.raises(BadInput, match="WORLD_SIZE is 6, not a multiple of local.modules = 4"):
        layout_replicas(6, 4, 0)
    with pytest.raises(BadInput, match=r"pipeline.replicas = 3 x local.modules = 2 needs WORLD_SIZE = 6, but it is 8"):
        layout_replicas(8, 2, 3)
