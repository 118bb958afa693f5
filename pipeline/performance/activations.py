"""Activation memory counted exactly: the distinct tensors autograd keeps for backward when a module's
training step runs forward, the module's own parameters and buffers left out.

What a profile's pieces keep (pipeline/performance/profile.py), each module of a layout, E2E with its
segments recomputed (pipeline/model/recompute.py) and the stages of a pipeline of microbatches are counted
here (on the CPU, a profile's pieces on its device): the figures the benchmark reports beside its timings,
and what the profile's predictions (pipeline/performance/cost.py) are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec
from pipeline.model.network import build_module, make_layout
from pipeline.model.partition import segment_ranges
from pipeline.runtime.packet import Packet


def _held_storages(module: nn.Module) -> set[int]:
    """Addresses of the module's own parameters and buffers: memory it holds anyway, not activations."""
    return {tensor.untyped_storage().data_ptr() for tensor in [*module.parameters(), *module.buffers()]}


def saved_storages(module: nn.Module, *inputs: Any) -> tuple[dict[int, int], Any]:
    """The distinct storages autograd keeps for backward during ``module(*inputs)`` (address -> bytes),
    and its output.

    Autograd also keeps references to the module's own parameters and buffers (a conv's weight,
    batch norm's running statistics): those are memory the module holds anyway, not activations,
    so they are left out.
    """
    held = _held_storages(module)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = module(*inputs)
    return storages, result


def saved_activation_bytes(module: nn.Module, *inputs: Any) -> tuple[int, Any]:
    """Bytes of the distinct tensors autograd keeps for backward during ``module(*inputs)``, and its output."""
    storages, result = saved_storages(module, *inputs)
    return sum(storages.values()), result


def random_batch(spec: DatasetSpec, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and labels of the dataset's shapes (label maps for segmentation)."""
    images = torch.randn(batch, spec.channels, *spec.image_shape, generator=generator)
    label_shape = (batch, *spec.image_shape) if spec.dense else (batch,)
    return images, torch.randint(0, spec.classes, label_shape, generator=generator)


def checkpointed_activation_bytes(config: Config, spec: DatasetSpec, batch: int, segments: int) -> int:
    """E2E's activation memory at ``batch`` with its blocks in ``segments`` segments, the first S - 1
    recomputed in backward (pipeline/model/recompute.py), counted exactly: the larger of what autograd
    keeps after the forward (each recomputed segment's input, which its checkpoint holds, and every
    tensor the last segment and the classifier save) and what is alive while a segment is recomputed
    (its input and those of the segments before it, whose backward has not run, and all it saves).

    The plain forward runs once, each saved storage traced to the segment whose blocks saved it.
    """
    layout = make_layout(config, spec, [])
    module = build_module(config, layout, 0, torch.device("cpu")).train()
    module.checkpoint_segments = 0  # the plain forward: the hooks below see every saved tensor
    ranges = segment_ranges(len(module.body), segments)
    kept_tag = len(ranges) - 1  # the last segment and what runs outside the blocks keep what they save
    current = [kept_tag]
    inputs: list[tuple[int, int]] = []  # each recomputed segment's input: (address, bytes)

    def entering(segment: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            current[0] = segment
            if segment != kept_tag:
                storage = args[0].untyped_storage()
                inputs.append((storage.data_ptr(), storage.nbytes()))
        return hook

    handles = [module.body[start].register_forward_pre_hook(entering(index))
               for index, (start, _) in enumerate(ranges)]
    handles.append(module.head.register_forward_pre_hook(entering(kept_tag)))
    tagged: list[dict[int, int]] = [{} for _ in ranges]
    held = _held_storages(module)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            tagged[current[0]][storage.data_ptr()] = storage.nbytes()
        return tensor

    generator = torch.Generator().manual_seed(0)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            module(Packet.from_batch(*random_batch(spec, batch, generator)))
    finally:
        for handle in handles:
            handle.remove()
    kept = {**tagged[kept_tag], **dict(inputs)}
    recomputing = [{**tagged[index], **dict(inputs[:index + 1])} for index in range(kept_tag)]
    return max(sum(alive.values()) for alive in [kept, *recomputing])


def module_activation_bytes(config: Config, spec: DatasetSpec, cuts: list[int], batch: int) -> list[int]:
    """Activation memory of each module's training step (body, encoders, head, decoder) at ``batch``: what
    autograd keeps for backward, parameters left out."""
    layout = make_layout(config, spec, cuts)
    generator = torch.Generator().manual_seed(0)
    packet: Packet | None = Packet.from_batch(*random_batch(spec, batch, generator))
    sizes = []
    for index in range(config.local.modules):
        module = build_module(config, layout, index, torch.device("cpu")).train()
        assert packet is not None
        current = packet
        size, (inputs, output, _) = saved_activation_bytes(module, current)
        sizes.append(size)
        packet = None if module.last else module.next_packet(current, inputs, output)
    return sizes


def microbatched_activation_bytes(stages: Sequence[nn.Module], spec: DatasetSpec, microbatch: int,
                                  in_flight: Sequence[int]) -> list[int]:
    """Each stage's activation memory in a pipeline of microbatches of ``microbatch`` samples: one microbatch's
    saved tensors x the microbatches stage k holds at once (``in_flight[k]``; the loss's own few bytes per
    sample left out)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(microbatch, spec.channels, *spec.image_shape, generator=generator)
    sizes = []
    for stage, held in zip(stages, in_flight):
        size, output = saved_activation_bytes(stage, inputs)
        sizes.append(size * held)
        inputs = output.detach()
    return sizes
