"""Cut points as a config writes them: [stage, block] pairs (stage 0 = the stem) for the ResNets, as in
docs/reference.md's tables; flat block indices for every other network. The one owner of reading,
checking and writing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.errors import require

if TYPE_CHECKING:  # the schema and the registry read cuts from here
    from pipeline.model.networks.family import NetworkSpec

# One cut as local.partition writes it: [stage, block] or a flat block index.
Cut = int | list[int]


def validate_cuts(cuts: list[Cut], modules: int, blocks: tuple[int, ...] | None, units: int) -> None:
    """An explicit cut list: K-1 increasing cuts, none after the last block ([stage, block] pairs for the
    ResNets, ``blocks`` per stage; flat block indices otherwise)."""
    require(
        len(cuts) == modules - 1,
        f"local.partition lists {len(cuts)} cuts but local.modules = {modules} needs {modules - 1}",
    )
    previous = -1
    for cut in cuts:
        if blocks is None:
            require(isinstance(cut, int) and 0 <= cut < units - 1,
                    f"local.partition cut {cut} is out of range; cuts are block indices 0..{units - 2} (a cut "
                    f"follows that block; the last of the {units} blocks ends the last module)")
        else:
            stages = len(blocks)
            in_stage = (isinstance(cut, list) and len(cut) == 2 and 1 <= cut[0] <= stages
                        and 0 <= cut[1] < blocks[cut[0] - 1])
            require(
                in_stage or cut == [0, 0],
                f"local.partition cut {cut} is out of range; cuts are [stage, block] with [0, 0] (after the stem) "
                "or " + ", ".join(f"[{stage + 1}, 0..{count - 1}]" for stage, count in enumerate(blocks)),
            )
            require(cut_to_flat(cut, blocks) < units - 1, f"local.partition cut {cut} leaves the last module "
                                                          f"empty; cut before [{stages}, {blocks[-1] - 1}]")
        flat = cut_to_flat(cut, blocks)
        require(flat > previous, f"local.partition cuts must be strictly increasing; {cut} is not after the "
                                 "one before")
        previous = flat




def cut_to_flat(cut: Cut, blocks: tuple[int, ...] | None) -> int:
    """A cut as config writes it -> index in the flat block list: [stage, block] of a ResNet (``blocks`` per
    stage; [0, 0] is the stem), or already a flat index (``blocks`` None)."""
    if isinstance(cut, int):
        return cut
    assert blocks is not None, "validate_cuts refuses a [stage, block] pair for a flat-indexed network"
    stage, block = cut
    return 0 if stage == 0 else 1 + sum(blocks[: stage - 1]) + block




def flat_to_cut(flat: int, blocks: tuple[int, ...] | None) -> Cut:
    """Index in the flat block list -> the cut as config writes it: [stage, block] of a ResNet (``blocks`` per
    stage), the index itself for a flat-indexed network (the inverse of cut_to_flat)."""
    return flat if blocks is None else list(stage_and_block(flat, blocks))


def stage_and_block(flat: int, blocks: tuple[int, ...]) -> tuple[int, int]:
    """A ResNet's flat block index -> (stage, block within it); (0, 0) is the stem."""
    if flat == 0:
        return 0, 0
    block = flat - 1
    for stage, count in enumerate(blocks, start=1):
        if block < count:
            return stage, block
        block -= count
    raise ValueError(f"block {flat} is past the last of {blocks}")


def written_cuts(cuts: Sequence[int], arch: NetworkSpec) -> list[Cut]:
    """Flat cut indices as local.partition writes them for ``arch``: what summaries record and tools print."""
    return [flat_to_cut(cut, arch.blocks) for cut in cuts]


def cut_notation(arch: NetworkSpec) -> str:
    """What one written cut of ``arch`` names: the block after which a module ends."""
    return "[stage, block]" if arch.blocks is not None else "block index"


def describe_cuts(cuts: Sequence[int], arch: NetworkSpec) -> str:
    """The cuts for a message: written as local.partition takes them, with what they name."""
    return f"{written_cuts(cuts, arch)} ({cut_notation(arch)} after which a module ends)"

