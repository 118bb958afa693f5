"""Whole-step profile of a network's pieces, and what it predicts for a module at any cut.

A stage's training step receives its packet, runs its context encoders, blocks and head (the
auxiliary head and decoder, or the classifier on the last module) forward and backward, takes
its SGD step and sends its packet on. ``profile_network`` measures every piece a module can
hold the way a stage runs it (forward, backward and optimizer step, under the training
precision, on the training device at the training batch size), counts the bytes it saves for
backward exactly, and prices the transfers as bytes over the measured local copy bandwidth.
Pieces of one shape are measured once. ``stage_seconds`` and ``stage_activation_bytes`` compose
the pieces of module ``index`` of K over blocks [start, end): the balancer and the planner use
nothing else, so both are tested on synthetic profiles. Under Rn a module's register holds the
inputs of earlier modules, whose shapes depend on earlier cuts: given the modules' ``starts`` the
composition is exact; without them (while the cuts are being chosen) each source is taken at
its earliest possible block, the largest it can be, so a chosen cut never exceeds a memory cap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import nn

from pipeline.config import Config, parse_size
from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput
from pipeline.metrics import say
from pipeline.model.context import ContextPlan, ImageEncoder, InputEncoder
from pipeline.model.decoder import Decoder, reconstruction_loss
from pipeline.model.heads import build_aux_head
from pipeline.model.losses import head_loss
from pipeline.model.partition import NoPartitionFits, flat_to_cut, min_max_partition, module_ranges
from pipeline.model.resnet import BlockShape, CifarResNet, Classifier
from pipeline.optim import make_optimizer

Result = TypeVar("Result")

Loss = Callable[[torch.Tensor], torch.Tensor]
LABEL_BYTES = 8  # int64 per sample on the wire
MIB = 1 << 20


def saved_activation_bytes(run: Callable[[], Result], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Result]:
    """Bytes of the distinct tensors autograd keeps for backward while ``run`` executes, and its result.

    Storages of ``exclude`` (a piece's input and parameters, counted elsewhere) are left out.
    """
    skipped = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skipped:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(storages.values()), result


def _summed(output: torch.Tensor) -> torch.Tensor:
    return output.float().sum()


@dataclass(frozen=True)
class Piece:
    """One part of a module's training step at the profile batch."""

    compute_s: float  # forward + backward
    update_s: float  # zero_grad + optimizer step: the same at any batch
    activation_bytes: int  # saved for backward beyond its input and parameters
    parameter_bytes: int

    def seconds(self, batch_scale: float) -> float:
        return self.compute_s * batch_scale + self.update_s


NOTHING = Piece(0.0, 0.0, 0, 0)


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

    def __len__(self) -> int:
        return len(self.blocks)

    def input_bytes(self, start: int) -> int:
        """Per sample: what a module starting at block ``start`` reads (block start-1's output)."""
        return self.image_bytes if start == 0 else self.output_bytes[start - 1]


Starts = Sequence[int] | None  # the first block of every module, where the cuts are known


def _sources(plan: ContextPlan, index: int, starts: Starts) -> list[int]:
    """First blocks of the modules whose inputs make up module ``index``'s register."""
    return [source if starts is None else starts[source] for source in plan.register_sources(index)]


def _pieces(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
            starts: Starts = None) -> list[Piece]:
    last = index == plan.modules - 1
    pieces = [*profile.blocks[start:end], profile.classifier if last else profile.heads[end - 1]]
    if index > 0:
        if plan.image:
            pieces.append(profile.image_encoders[start])
        pieces += [profile.input_encoders[source][start] for source in _sources(plan, index, starts)]
    return pieces


def received_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, batch: int,
                   starts: Starts = None) -> int:
    """Bytes of the packet module ``index`` receives per step: labels, features, image, register.

    Module 0 reads its batch on its own device.
    """
    if index == 0:
        return 0
    image = profile.image_bytes if plan.carries_image(index) else 0
    register = sum(profile.input_bytes(source) for source in _sources(plan, index, starts))
    return batch * (LABEL_BYTES + profile.input_bytes(start) + image + register)


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


def stage_activation_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
                           batch: int, starts: Starts = None) -> int:
    """What module ``index`` over [start, end) keeps for backward at ``batch``: its inputs (features and
    what its encoders read), then each piece."""
    saved = sum(piece.activation_bytes for piece in _pieces(profile, plan, index, start, end, starts))
    inputs = profile.input_bytes(start)
    if index > 0:
        inputs += (profile.image_bytes if plan.image else 0) + sum(
            profile.input_bytes(source) for source in _sources(plan, index, starts))
    return batch * inputs + round(saved * batch / profile.batch)


def stage_parameter_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
                          starts: Starts = None) -> int:
    return sum(piece.parameter_bytes for piece in _pieces(profile, plan, index, start, end, starts))


def end_to_end_activation_bytes(profile: NetworkProfile, batch: int) -> int:
    return stage_activation_bytes(profile, ContextPlan(1, 0, False, False), 0, 0, len(profile), batch)


def context_plan(config: Config) -> ContextPlan:
    local = config.local
    return ContextPlan(local.modules, local.context_depth, local.context_image, local.reconstruct)


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


def memory_cap_bytes(config: Config, profile: NetworkProfile) -> float:
    """local.memory_cap in bytes: a fraction of E2E activation memory, or a size; 0 is no cap."""
    cap = config.local.memory_cap
    if isinstance(cap, str):
        return float(parse_size(cap))
    return float("inf") if cap == 0 else cap * end_to_end_activation_bytes(profile, profile.batch)


def partition_cuts(config: Config, profile: NetworkProfile) -> list[int]:
    """The cuts local.partition asks for (balanced-time, balanced-memory or balanced), from a profile."""
    plan, kind = context_plan(config), config.local.partition
    blocks, modules = len(profile), config.local.modules

    def seconds(index: int, start: int, end: int) -> float:
        return stage_seconds(profile, plan, index, start, end, profile.batch, profile.copy_bytes_per_s)

    def memory(index: int, start: int, end: int) -> float:
        return float(stage_activation_bytes(profile, plan, index, start, end, profile.batch))

    if kind == "balanced-memory":
        return min_max_partition(blocks, modules, memory)
    if kind == "balanced-time":
        return min_max_partition(blocks, modules, seconds)
    limit = memory_cap_bytes(config, profile)
    try:
        return min_max_partition(blocks, modules, seconds, memory, limit)
    except NoPartitionFits as err:
        e2e = end_to_end_activation_bytes(profile, profile.batch)
        raise BadInput(
            f"local.memory_cap = {config.local.memory_cap!r} ({limit / MIB:.0f} MiB): no cut of {config.model.arch} "
            f"into {modules} modules keeps every module's activation memory under it at batch {profile.batch}; "
            f"the smallest cap that fits is {err.smallest / e2e:.3f} of E2E ({err.smallest / MIB:.0f} MiB); "
            "raise local.memory_cap or use more modules") from None


# ---------------------------------------------------------------------------------------------
# Measuring


def step_seconds(run: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``run`` after one warm-up."""
    samples = []
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def copy_bytes_per_s(device: torch.device, size: int = 32 * MIB) -> float:
    source = torch.empty(size // 4, device=device)
    target = torch.empty_like(source)

    def copy() -> None:
        target.copy_(source)

    return size / step_seconds(copy, device)


class _Profiler:
    def __init__(self, config: Config, spec: DatasetSpec, device: torch.device) -> None:
        self.config, self.spec, self.device = config, spec, device
        self.batch = config.data.batch_size
        self.net = CifarResNet(config.model.blocks_per_stage, spec.channels, spec.image_size)
        self.memory_format = torch.channels_last if config.precision.channels_last else torch.contiguous_format
        self.amp = config.precision.amp == "bf16"  # time is measured under the precision training uses
        self.measured: dict[tuple[object, ...], Piece] = {}

    def _input(self, shape: BlockShape, grad: bool) -> torch.Tensor:
        tensor = torch.randn(self.batch, shape.channels, shape.size, shape.size, device=self.device)
        return tensor.contiguous(memory_format=self.memory_format).requires_grad_(grad)

    def piece(self, key: tuple[object, ...], build: Callable[[], list[nn.Module]], shape: BlockShape,
              grad: bool, losses: Sequence[Loss] = ()) -> Piece:
        """Forward + backward + SGD step of the layers ``build`` makes, all reading one input of ``shape``.

        ``grad``: the input needs its gradient (blocks inside a module, heads on a block output).
        ``losses``: what each layer's output is scored with (what they save counts); by default its sum.
        """
        if key in self.measured:
            return self.measured[key]
        # Module.to takes memory_format at run time; torch's stubs leave it out
        layers = nn.ModuleList(build()).to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]
        layers.train()
        optimizer = make_optimizer(layers, self.config.train)
        inputs = self._input(shape, grad)

        scores = list(losses) or [_summed] * len(layers)

        def forward() -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                return sum((score(layer(inputs)) for layer, score in zip(layers, scores)),
                           torch.zeros((), device=self.device))

        def backward() -> None:
            forward().backward()

        def update() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        parameters = list(layers.parameters())
        activation, _ = saved_activation_bytes(forward, [inputs, *parameters])
        backward()
        result = Piece(step_seconds(backward, self.device), step_seconds(update, self.device), activation,
                       sum(p.numel() * p.element_size() for p in parameters))
        self.measured[key] = result
        return result

    def block(self, index: int) -> Piece:
        shape, out = self.net.shape(index - 1), self.net.shape(index)
        return self.piece(("block", index == 0, shape, out), lambda: [self.net.build(index)], shape, index > 0)

    def head(self, index: int) -> Piece:
        local, shape = self.config.local, self.net.shape(index)
        out = self.spec.classes if local.loss == "softmax" else local.aux_feature_dim

        def build() -> list[nn.Module]:
            head = build_aux_head(local.aux, shape.channels, out, local.aux_widen, local.aux_hidden)
            if not local.reconstruct:
                return [head]
            return [head, Decoder(shape.channels, self.spec.channels, self.spec.image_size, local.aux_widen,
                                  self.spec.mean, self.spec.std)]

        labels = torch.randint(0, self.spec.classes, (self.batch,), device=self.device)
        image = self.net.shape(-1)
        images = torch.rand(self.batch, image.channels, image.size, image.size, device=self.device)

        def classify(output: torch.Tensor) -> torch.Tensor:
            return head_loss(local.loss, output, labels)

        def reconstruct(output: torch.Tensor) -> torch.Tensor:  # the target is made in the step, as there
            return reconstruction_loss(output, images.clamp(0.0, 1.0))

        return self.piece(("head", shape), build, shape, True, [classify, reconstruct])

    def classifier(self) -> Piece:
        shape = self.net.shape(len(self.net) - 1)
        labels = torch.randint(0, self.spec.classes, (self.batch,), device=self.device)

        def classify(output: torch.Tensor) -> torch.Tensor:
            return head_loss("softmax", output, labels)

        return self.piece(("classifier", shape), lambda: [Classifier(shape.channels, self.spec.classes)], shape, True,
                          [classify])

    def image_encoder(self, start: int) -> Piece:
        if not self.config.local.context_image or start == 0:
            return NOTHING
        image, target, widen = self.net.shape(-1), self.net.shape(start - 1), self.config.local.aux_widen
        return self.piece(("image", target), lambda: [ImageEncoder(image.channels, target, widen)], image, False)

    def input_encoder(self, source: int, start: int) -> Piece:
        if not self.config.local.context_depth or start == 0:
            return NOTHING
        shape, target = self.net.shape(source - 1), self.net.shape(start - 1)
        return self.piece(("input", shape, target), lambda: [InputEncoder(shape.channels, target)], shape, False)

    def profile(self) -> NetworkProfile:
        blocks = range(len(self.net))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            image = self.net.shape(-1)
            return NetworkProfile(
                batch=self.batch,
                blocks=[self.block(index) for index in blocks],
                heads=[self.head(index) for index in blocks],
                classifier=self.classifier(),
                image_encoders=[self.image_encoder(start) for start in blocks],
                input_encoders=[[self.input_encoder(source, start) for start in blocks] for source in blocks],
                output_bytes=[4 * shape.channels * shape.size**2 for shape in map(self.net.shape, blocks)],
                image_bytes=4 * image.channels * image.size**2,
                copy_bytes_per_s=copy_bytes_per_s(self.device),
            )


def profile_network(config: Config, spec: DatasetSpec, device: torch.device) -> NetworkProfile:
    return _Profiler(config, spec, device).profile()


def balanced_cuts(config: Config, spec: DatasetSpec, device: torch.device) -> list[int]:
    profile = profile_network(config, spec, device)
    cuts = partition_cuts(config, profile)
    plan, per_stage = context_plan(config), config.model.blocks_per_stage
    seconds = predicted_stage_seconds(profile, plan, cuts)
    memory = predicted_stage_activation_bytes(profile, plan, cuts)
    e2e = end_to_end_activation_bytes(profile, profile.batch)
    say(f"[partition] {config.local.partition}: cuts after blocks {[flat_to_cut(c, per_stage) for c in cuts]}; "
        f"predicted step seconds per module {[round(s, 4) for s in seconds]}, activation memory over E2E "
        f"{[round(m / e2e, 3) for m in memory]}")
    return cuts


def module_activation_bytes(config: Config, spec: DatasetSpec, cuts: list[int], batch: int) -> list[int]:
    """Activation memory of each module's training step (body, encoders, head, decoder) at ``batch``: what
    autograd keeps for backward, parameters left out."""
    from pipeline.model.network import (  # network imports this module lazily
        build_module,
        make_layout,
    )
    from pipeline.packet import Packet

    layout = make_layout(config, spec, cuts)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, spec.channels, spec.image_size, spec.image_size, generator=generator)
    packet: Packet | None = Packet.from_batch(images, torch.randint(0, spec.classes, (batch,), generator=generator))
    sizes = []
    for index in range(config.local.modules):
        module = build_module(config, layout, index, torch.device("cpu")).train()
        assert packet is not None
        current = packet
        # parameters are state, not activations: they stay whatever the batch
        size, (inputs, output, _) = saved_activation_bytes(partial(module, current), module.parameters())
        sizes.append(size)
        packet = None if module.last else module.next_packet(current, inputs, output)
    return sizes
