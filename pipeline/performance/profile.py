"""Measuring a network's pieces as a stage runs them.

A stage's training step receives its packet, runs its context encoders, blocks and head (the
auxiliary head and decoder, or the classifier on the last module) forward and backward, takes
its SGD step and sends its packet on. ``profile_network`` measures every piece a module can
hold that way (forward, backward and optimizer step, under the training precision, on the
training device at the training batch size), counts the bytes it saves for backward exactly
(pipeline/performance/activations.py), and measures the local copy bandwidth that prices a transfer; the
profile records the wire's element width too (pipeline.wire_dtype), which sizes every packet. Pieces of
one shape are measured once. What the profile predicts for a module, and the balanced cuts, are
pipeline/performance/cost.py's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from pipeline.config.cuts import cut_to_flat, describe_cuts
from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.model.decoder import reconstruction_loss
from pipeline.model.losses import cross_entropy
from pipeline.model.methods.registry import method_named
from pipeline.model.network import make_net
from pipeline.model.networks.base import Shape
from pipeline.model.networks.registry import family_named
from pipeline.performance.activations import saved_storages
from pipeline.performance.cost import (
    NOTHING,
    UNFIT,
    NetworkProfile,
    Piece,
    end_to_end_activation_bytes,
    partition_cuts,
    predicted_stage_activation_bytes,
    predicted_stage_seconds,
)
from pipeline.performance.traffic import wire_element_bytes
from pipeline.runtime.host import cpu_share, profiling_device
from pipeline.runtime.metrics import say
from pipeline.runtime.optim import make_optimizer

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (the piece's input, a layer's output) -> its loss
MIB = 1 << 20


def _summed(_: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return output.float().sum()


class _Scored(nn.Module):
    """Layers reading one input, each output scored by its loss: one piece's training step."""

    def __init__(self, layers: list[nn.Module], losses: list[Loss], amp: bool) -> None:
        super().__init__()
        self.layers, self.losses, self.amp = nn.ModuleList(layers), losses, amp

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.outputs = [layer(inputs) for layer in self.layers]  # kept: which of them backward keeps
            return sum((loss(inputs, output) for output, loss in zip(self.outputs, self.losses)),
                       torch.zeros((), device=inputs.device))


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
        arch = config.arch  # a property: it resolves model.arch on each read
        self.net = make_net(arch, spec, config.model.deep_stem)
        self.parts = family_named(arch.family).parts()
        self.memory_format = torch.channels_last if config.precision.channels_last else torch.contiguous_format
        self.amp = config.precision.amp == "bf16"  # time is measured under the precision training uses
        self.measured: dict[tuple[object, ...], Piece] = {}

    def _input(self, shape: Shape, grad: bool) -> torch.Tensor:
        tensor = torch.randn(self.batch, *shape, device=self.device)
        if tensor.dim() == 4:  # channels_last is a layout of maps only
            tensor = tensor.contiguous(memory_format=self.memory_format)
        return tensor.requires_grad_(grad)

    def piece(self, key: tuple[object, ...], build: Callable[[], list[nn.Module]], shape: Shape,
              grad: bool, losses: Sequence[Loss] = (), forward: bool = False, fitted: bool = False) -> Piece:
        """Forward + backward + SGD step of the layers ``build`` makes, all reading one input of ``shape``.

        ``grad``: the input needs its gradient (blocks inside a module, heads on a block output).
        ``losses``: what each layer's output is scored with, given the input too (a method such as PredSim scores
        the module's output the head reads); what they save counts. By default the output's sum.
        ``forward``: also time the forward alone (a block's: what recomputing it costs).
        ``fitted``: the parts choose the layers by the feature and may have none for it: the piece is UNFIT.
        """
        if key in self.measured:
            return self.measured[key]
        try:
            layers = build()
        except BadInput:
            if not fitted:
                raise
            self.measured[key] = UNFIT
            return UNFIT
        scored = _Scored(layers, list(losses) or [_summed] * len(layers), self.amp)
        # Module.to takes memory_format at run time; torch's stubs leave it out
        scored = scored.to(self.device, memory_format=self.memory_format).train()  # type: ignore[call-overload]
        # A piece without parameters (a factory's classifier is its last block) has no step to take.
        optimizer = make_optimizer(scored, self.config.train) if list(scored.parameters()) else None
        inputs = self._input(shape, grad)

        def backward() -> None:
            scored(inputs).backward()

        def update() -> None:
            assert optimizer is not None
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        # A piece's input, and the output of one read by what follows (a block's: no loss of its own), are
        # shared with its neighbours: whether it keeps them is noted, and the composition counts each once
        # (cost.py); the rest is the piece's own.
        saved, _ = saved_storages(scored, inputs)
        shared = [] if losses else [out.untyped_storage().data_ptr() for out in scored.outputs]
        ends = {inputs.untyped_storage().data_ptr(), *shared}
        own = sum(size for address, size in saved.items() if address not in ends)
        keeps_output = any(address in saved for address in shared)

        def recorded_forward() -> None:
            scored(inputs)

        backward()
        result = Piece(step_seconds(backward, self.device),
                       step_seconds(update, self.device) if optimizer is not None else 0.0, own,
                       sum(p.numel() * p.element_size() for p in scored.parameters()),
                       keeps_input=inputs.untyped_storage().data_ptr() in saved, keeps_output=keeps_output,
                       forward_s=step_seconds(recorded_forward, self.device) if forward else 0.0)
        self.measured[key] = result
        return result

    def block(self, index: int) -> Piece:
        shape, out = self.net.shape(index - 1), self.net.shape(index)
        return self.piece(("block", index == 0, shape, out), lambda: [self.net.build(index)], shape, index > 0,
                          forward=True)

    def head(self, index: int) -> Piece:
        local, shape = self.config.local, self.net.shape(index)
        method = method_named(local.loss)
        out = method.head_width(self.spec.classes, local)

        def build() -> list[nn.Module]:
            head = self.parts.aux_head(shape, out, local)
            if not local.reconstruct:
                return [head]
            return [head, self.parts.decoder(shape, self.spec, local.aux_widen)]

        labels = torch.randint(0, self.spec.classes, (self.batch,), device=self.device)
        image = self.net.shape(-1)
        images = torch.rand(self.batch, *image, device=self.device)

        def classify(features: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            return method.loss(features, output, labels)

        def reconstruct(_: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            # the target is made in the step, as there
            return reconstruction_loss(output, images.clamp(0.0, 1.0))

        return self.piece(("head", shape), build, shape, True, [classify, reconstruct], fitted=True)

    def classifier(self) -> Piece:
        shape = self.net.shape(len(self.net) - 1)
        labels = torch.randint(0, self.spec.classes, (self.batch,), device=self.device)

        def classify(_: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            return cross_entropy(output, labels)

        return self.piece(("classifier", shape), lambda: [self.net.classifier(self.spec.classes)], shape, True,
                          [classify])

    def image_encoder(self, start: int) -> Piece:
        if not self.config.local.context_image or start == 0:
            return NOTHING
        image, target, widen = self.net.shape(-1), self.net.shape(start - 1), self.config.local.aux_widen
        return self.piece(("image", target), lambda: [self.parts.image_encoder(image, target, widen)], image, False,
                          fitted=True)

    def input_encoder(self, source: int, start: int) -> Piece:
        if not self.config.local.context_depth or start == 0:
            return NOTHING
        shape, target = self.net.shape(source - 1), self.net.shape(start - 1)
        return self.piece(("input", shape, target), lambda: [self.parts.input_encoder(shape, target)], shape, False,
                          fitted=True)

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
                output_bytes=[4 * math.prod(shape) for shape in map(self.net.shape, blocks)],
                image_bytes=4 * math.prod(image),
                copy_bytes_per_s=copy_bytes_per_s(self.device),
                wire_element_bytes=wire_element_bytes(self.config.pipeline.wire_dtype),
            )


def profile_network(config: Config, spec: DatasetSpec, device: torch.device) -> NetworkProfile:
    # its pieces are classification heads and square images
    spec.refuse_segmentation("profiling (balanced partitions, python -m pipeline.plan) covers",
                             "cut it with local.partition = 'equal' (InfoPro's cut) or an explicit list of [stage, "
                             "block] cuts")
    return _Profiler(config, spec, device).profile()


class Profiled(NamedTuple):
    profile: NetworkProfile
    device: torch.device
    threads: int  # torch's CPU threads while it was measured


def profile_as_a_stage(config: Config, spec: DatasetSpec, processes: int) -> Profiled:
    """The profile as a stage of ``processes`` processes runs: on the device the config trains on (its GPU
    unless run.device = 'cpu'), on a CPU with the stage's share of the cores (torch's threads restored after)."""
    device = profiling_device(config.run.device)
    with _stage_threads(device, processes, config.pipeline.threads_per_stage) as threads:
        return Profiled(profile_network(config, spec, device), device, threads)


@contextmanager
def _stage_threads(device: torch.device, processes: int, threads_per_stage: int) -> Iterator[int]:
    """torch's CPU threads as a training process of ``processes`` on this node sets them (host.cpu_share)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_share(processes, threads_per_stage))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def resolve_cuts(config: Config, spec: DatasetSpec, device: torch.device) -> list[int]:
    """Flat cut indices for config.local.partition (profiling on ``device`` when balanced)."""
    local, arch = config.local, config.arch
    if isinstance(local.partition, list):
        return [cut_to_flat(cut, arch.blocks) for cut in local.partition]
    if local.partition == "equal" or local.modules == 1:
        return family_named(arch.family).default_cuts(arch, local.modules)
    return balanced_cuts(config, spec, device)


def balanced_cuts(config: Config, spec: DatasetSpec, device: torch.device) -> list[int]:
    profile = profile_network(config, spec, device)
    cuts = partition_cuts(config, profile)
    plan = ContextPlan.of(config.local)
    seconds = predicted_stage_seconds(profile, plan, cuts)
    memory = predicted_stage_activation_bytes(profile, plan, cuts)
    e2e = end_to_end_activation_bytes(profile, profile.batch)
    say(f"[partition] {config.local.partition}: cut points {describe_cuts(cuts, config.arch)}; "
        f"predicted step seconds per module {[round(s, 4) for s in seconds]}, activation memory over E2E "
        f"{[round(m / e2e, 3) for m in memory]}")
    return cuts
