"""What a network profile predicts for a module at any cut: the balancer's and the planner's model.

A profile (pipeline/performance/profile.py measures one) holds every piece a module can be made of:
each block, the auxiliary head (and decoder) a module ending at a block carries, the classifier,
the context encoders a module starting at a block runs, each with its forward + backward
seconds, optimizer-step seconds, saved-activation bytes and parameter bytes at the profile
batch. ``stage_seconds`` and ``stage_activation_bytes`` compose the pieces of module ``index``
of K over blocks [start, end), transfers priced at a link bandwidth (the packets' bytes are
pipeline/performance/traffic.py's, on the wire the profile was taken for); nothing here measures, so
it is tested on synthetic profiles. Under Rn a module's register holds the inputs of earlier
modules, whose shapes depend on earlier cuts: given the modules' ``starts`` the composition is
exact; without them (while the cuts are being chosen) each source is taken at its earliest
possible block, the largest it can be, so a chosen cut never exceeds a memory cap. A piece the
network's parts have no form of for the feature it reads or writes (a ContSup encoder into vectors, a
decoder from them) is unfit: a module that needs one cannot be, and the balancer never cuts there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.config.schema import Config, LocalConfig, parse_size
from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.model.partition import (
    NoPartitionBuilds,
    NoPartitionFits,
    StageCost,
    min_max_partition,
    module_ranges,
    segment_ranges,
)
from pipeline.performance.traffic import FP32_BYTES, payload_bytes

MIB = 1 << 20
END_TO_END = ContextPlan(1, 0, False, False)  # one module, no context: the whole network


@dataclass(frozen=True)
class Piece:
    """One part of a module's training step at the profile batch."""

    compute_s: float  # forward + backward
    update_s: float  # zero_grad + optimizer step: the same at any batch
    activation_bytes: int  # saved for backward, its input, output and parameters left out
    parameter_bytes: int
    keeps_input: bool = True  # saves its input for backward (a conv does)
    keeps_output: bool = False  # saves its output (a ReLU does, a max pool does not)
    forward_s: float = 0.0  # forward alone (with autograd recording): what recomputing it costs
    fits: bool = True  # False: the parts have none for this feature, so no module may need it

    def forward_seconds(self, batch_scale: float) -> float:
        return self.forward_s * batch_scale

    def seconds(self, batch_scale: float) -> float:
        return self.compute_s * batch_scale + self.update_s


NOTHING = Piece(0.0, 0.0, 0, 0)
UNFIT = Piece(0.0, 0.0, 0, 0, fits=False)


@dataclass(frozen=True)
class NetworkProfile:
    batch: int
    blocks: list[Piece]
    heads: list[Piece]  # [i]: the auxiliary head (and decoder) of a module ending at block i
    classifier: Piece
    image_encoders: list[Piece]  # [s]: the E encoder of a module starting at block s
    input_encoders: list[list[Piece]]  # [s][t]: the R encoder from a module starting at s into one starting at t
    output_bytes: list[int]  # [i]: what block i outputs, per sample (fp32)
    image_bytes: int  # per sample
    copy_bytes_per_s: float  # local memory copy: the price of a transfer on this machine
    wire_element_bytes: int = FP32_BYTES  # a float on the links (pipeline.wire_dtype): what a packet is sent in

    def __len__(self) -> int:
        return len(self.blocks)

    def input_bytes(self, start: int) -> int:
        """Per sample: what a module starting at block ``start`` reads (block start-1's output)."""
        return self.image_bytes if start == 0 else self.output_bytes[start - 1]


Starts = Sequence[int] | None  # the first block of every module, where the cuts are known


def _first_block(module: int, starts: Starts) -> int:
    """Where module ``module`` starts: known from ``starts``, else its earliest possible block (the largest input)."""
    return module if starts is None else starts[module]


def _sources(plan: ContextPlan, index: int, starts: Starts) -> list[int]:
    """First blocks of the modules whose inputs make up module ``index``'s register."""
    return [_first_block(source, starts) for source in plan.register_sources(index)]


def _pieces(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
            starts: Starts = None) -> list[Piece]:
    last = index == plan.modules - 1
    pieces = [*profile.blocks[start:end], profile.classifier if last else profile.heads[end - 1]]
    if index > 0:
        if plan.image:
            pieces.append(profile.image_encoders[start])
        pieces += [profile.input_encoders[source][start] for source in _sources(plan, index, starts)]
    return pieces


def stage_fits(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
               starts: Starts = None) -> bool:
    """Whether module ``index`` over blocks [start, end) can be built: its head, decoder and encoders fit."""
    return all(piece.fits for piece in _pieces(profile, plan, index, start, end, starts))


def buildable(profile: NetworkProfile, plan: ContextPlan, cost: StageCost) -> StageCost:
    """``cost`` of a module, infinite where it cannot be built: what min_max_partition never picks."""
    def guarded(index: int, start: int, end: int) -> float:
        return cost(index, start, end) if stage_fits(profile, plan, index, start, end) else math.inf

    return guarded


def received_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, batch: int,
                   starts: Starts = None) -> int:
    """Bytes of the packet module ``index`` receives per step: labels, features, image, register, on the
    profile's wire (pipeline/performance/traffic.py; its fixed header of a few int64 left out).

    Module 0 reads its batch on its own device.
    """
    if index == 0:
        return 0

    def input_bytes(module: int) -> int:
        return profile.input_bytes(start if module == index else _first_block(module, starts))

    return payload_bytes(plan, index, input_bytes, batch, profile.wire_element_bytes)


def sent_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, end: int, batch: int,
               starts: Starts = None) -> int:
    return 0 if index == plan.modules - 1 else received_bytes(profile, plan, index + 1, end, batch, starts)


def stage_seconds(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int, batch: int,
                  link_bytes_per_s: float, starts: Starts = None) -> float:
    """One training step of module ``index`` over blocks [start, end) at ``batch``, transfers included."""
    scale = batch / profile.batch
    compute = sum(piece.seconds(scale) for piece in _pieces(profile, plan, index, start, end, starts))
    moved = (received_bytes(profile, plan, index, start, batch, starts)
             + sent_bytes(profile, plan, index, end, batch, starts))
    return compute + moved / link_bytes_per_s


def _kept_outputs(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int) -> int:
    """Per sample: the block outputs of module [start, end) that backward keeps, each once, whether
    the block saves it or what reads it next (the following block, the head or the classifier)."""
    tail = profile.classifier if index == plan.modules - 1 else profile.heads[end - 1]
    readers = [*profile.blocks[start + 1:end], tail]
    return sum(profile.output_bytes[block] for block, reader in zip(range(start, end), readers)
               if profile.blocks[block].keeps_output or reader.keeps_input)


def stage_activation_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
                           batch: int, starts: Starts = None) -> int:
    """What module ``index`` over [start, end) keeps for backward at ``batch``: its inputs (features and
    what its encoders read), its blocks' outputs, then what each piece keeps of its own."""
    saved = sum(piece.activation_bytes for piece in _pieces(profile, plan, index, start, end, starts))
    inputs = (profile.input_bytes(start) if profile.blocks[start].keeps_input else 0) + _kept_outputs(
        profile, plan, index, start, end)
    if index > 0:
        inputs += (profile.image_bytes if plan.image else 0) + sum(
            profile.input_bytes(source) for source in _sources(plan, index, starts))
    return batch * inputs + round(saved * batch / profile.batch)


def stage_parameter_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
                          starts: Starts = None) -> int:
    return sum(piece.parameter_bytes for piece in _pieces(profile, plan, index, start, end, starts))


def end_to_end_activation_bytes(profile: NetworkProfile, batch: int) -> int:
    return stage_activation_bytes(profile, END_TO_END, 0, 0, len(profile), batch)


def _segment_bytes(profile: NetworkProfile, start: int, end: int, batch: int) -> int:
    """What blocks [start, end) of the E2E network save for backward when their forward is recomputed, their
    input left out (the checkpoint holds it): their own tensors and their outputs, the last one only where its
    block saves it (what reads it next is not recomputed with them)."""
    outputs = sum(profile.output_bytes[block] for block in range(start, end)
                  if profile.blocks[block].keeps_output or (block + 1 < end and profile.blocks[block + 1].keeps_input))
    own = sum(piece.activation_bytes for piece in profile.blocks[start:end])
    return batch * outputs + round(own * batch / profile.batch)


def predicted_checkpointed_activation_bytes(profile: NetworkProfile, segments: int, batch: int) -> int:
    """E2E's activation memory at ``batch`` with its blocks in ``segments`` segments, the first S - 1 recomputed
    in backward (pipeline/model/recompute.py): the larger of what autograd keeps after the forward (each
    recomputed segment's input, the last segment and the classifier as without recomputation) and what is alive
    while a segment is recomputed (its input and those of the segments before it, and all it saves)."""
    ranges = segment_ranges(len(profile), segments)
    last_start, last_end = ranges[-1]
    inputs = [batch * profile.input_bytes(start) for start, _ in ranges[:-1]]
    kept = sum(inputs) + stage_activation_bytes(profile, END_TO_END, 0, last_start, last_end, batch)
    recomputing = [sum(inputs[:index + 1]) + _segment_bytes(profile, start, end, batch)
                   for index, (start, end) in enumerate(ranges[:-1])]
    return max(kept, *recomputing)


def recompute_seconds(profile: NetworkProfile, segments: int, batch: int) -> float:
    """What one step spends recomputing the first S - 1 segments' forward at ``batch``."""
    recomputed = segment_ranges(len(profile), segments)[-1][0]
    return sum(piece.forward_seconds(batch / profile.batch) for piece in profile.blocks[:recomputed])


def predicted_stage_seconds(profile: NetworkProfile, plan: ContextPlan, cuts: list[int],
                            batch: int | None = None) -> list[float]:
    """Each module's predicted step seconds for these cuts at ``batch`` (the profile's by default)."""
    ranges = module_ranges(cuts, len(profile))
    starts = [start for start, _ in ranges]
    return [stage_seconds(profile, plan, index, start, end, batch or profile.batch, profile.copy_bytes_per_s, starts)
            for index, (start, end) in enumerate(ranges)]


def predicted_stage_activation_bytes(profile: NetworkProfile, plan: ContextPlan, cuts: list[int]) -> list[int]:
    ranges = module_ranges(cuts, len(profile))
    starts = [start for start, _ in ranges]
    return [stage_activation_bytes(profile, plan, index, start, end, profile.batch, starts)
            for index, (start, end) in enumerate(ranges)]


def memory_cap_bytes(local: LocalConfig, profile: NetworkProfile) -> float:
    """local.memory_cap in bytes: a fraction of E2E activation memory, or a size; 0 is no cap."""
    cap = local.memory_cap
    if isinstance(cap, str):
        return float(parse_size(cap))
    return float("inf") if cap == 0 else cap * end_to_end_activation_bytes(profile, profile.batch)


def partition_cuts(config: Config, profile: NetworkProfile) -> list[int]:
    """The cuts local.partition asks for (balanced-time, balanced-memory or balanced), from a profile."""
    plan, kind = ContextPlan.of(config.local), config.local.partition
    blocks, modules = len(profile), config.local.modules

    def step(index: int, start: int, end: int) -> float:
        return stage_seconds(profile, plan, index, start, end, profile.batch, profile.copy_bytes_per_s)

    def activation(index: int, start: int, end: int) -> float:
        return float(stage_activation_bytes(profile, plan, index, start, end, profile.batch))

    seconds, memory = buildable(profile, plan, step), buildable(profile, plan, activation)
    try:
        if kind == "balanced-memory":
            return min_max_partition(blocks, modules, memory)
        if kind == "balanced-time":
            return min_max_partition(blocks, modules, seconds)
        return min_max_partition(blocks, modules, seconds, memory, memory_cap_bytes(config.local, profile))
    except NoPartitionBuilds:
        local = config.local
        raise BadInput(
            f"local.partition = {kind!r}: every cut of {config.model.arch} into {modules} modules has a module whose "
            f"local head, decoder or context encoders (local.context = {local.context!r}, local.reconstruct = "
            f"{str(local.reconstruct).lower()}) do not fit the features it reads or writes; use fewer modules, "
            "local.context = 'R0' or local.reconstruct = false") from None
    except NoPartitionFits as err:
        limit = memory_cap_bytes(config.local, profile)
        e2e = end_to_end_activation_bytes(profile, profile.batch)
        raise BadInput(
            f"local.memory_cap = {config.local.memory_cap!r} ({limit / MIB:.0f} MiB): no cut of {config.model.arch} "
            f"into {modules} modules keeps every module's activation memory under it at batch {profile.batch}; "
            f"the smallest cap that fits is {err.smallest / e2e:.3f} of E2E ({err.smallest / MIB:.0f} MiB); "
            "raise local.memory_cap or use more modules") from None
