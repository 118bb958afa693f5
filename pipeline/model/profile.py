"""Balanced partitions: measure each block (and what a cut there adds), then cut min-max.

balanced-time measures forward + backward seconds on the training device at the training
batch size; balanced-memory counts the bytes each block saves for backward (its activation
memory), which is exact and needs no timing. A cut after block i adds the auxiliary head (and
decoder) on block i's output; a module starting at block a adds its context encoders.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.specs import DatasetSpec
from pipeline.metrics import say
from pipeline.model.context import ImageEncoder, InputEncoder
from pipeline.model.decoder import build_decoder
from pipeline.model.heads import build_head
from pipeline.model.network import make_net
from pipeline.model.partition import min_max_cuts
from pipeline.model.resnet import BlockShape


def saved_activation_bytes(module: nn.Module, *inputs: Any) -> tuple[int, Any]:
    """Bytes of the distinct tensors autograd keeps for backward during ``module(*inputs)``, and its output.

    Autograd also keeps references to the module's own parameters and buffers (a conv's weight,
    batch norm's running statistics): those are memory the module holds anyway, not activations,
    so they are left out.
    """
    held = {tensor.untyped_storage().data_ptr() for tensor in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = module(*inputs)
    return sum(storages.values()), result


def step_seconds(run: Callable[[], torch.Tensor], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of forward + backward of ``run`` after one warm-up."""
    samples = []
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.autograd.backward(run().float().sum())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


class _CostModel:
    def __init__(self, config: Config, spec: DatasetSpec, device: torch.device) -> None:
        self.config, self.device = config, device
        self.batch = config.data.batch_size
        self.net = make_net(config, spec)
        self.spec = spec
        self.measure_time = config.local.partition == "balanced-time"
        memory = torch.channels_last if config.precision.channels_last else torch.contiguous_format
        self.memory_format = memory
        self.amp = config.precision.amp == "bf16"  # time is measured under the precision training uses

    def _input(self, shape: BlockShape) -> torch.Tensor:
        tensor = torch.randn(self.batch, shape.channels, shape.size, shape.size, device=self.device)
        return tensor.contiguous(memory_format=self.memory_format)

    def cost(self, layers: nn.Module, shape: BlockShape) -> float:
        # Module.to takes memory_format at run time; torch's stubs leave it out
        layers = layers.to(self.device, memory_format=self.memory_format).train()  # type: ignore[call-overload]
        inputs = self._input(shape)
        if self.measure_time:
            def step() -> torch.Tensor:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    output: torch.Tensor = layers(inputs)
                return output
            return step_seconds(step, self.device)
        return float(saved_activation_bytes(layers, inputs)[0])

    def _input_bytes(self, shape: BlockShape) -> float:
        return 0.0 if self.measure_time else float(self.batch * shape.channels * shape.size**2 * 4)

    def block(self, index: int) -> float:
        """A block's own cost; in memory, without its input (the block before already keeps it)."""
        shape = self.net.shape(index - 1)
        return self.cost(self.net.build(index), shape) - self._input_bytes(shape)

    def cut(self, index: int) -> float:
        """The head (and decoder) a module ending at block ``index`` carries."""
        local, shape = self.config.local, self.net.shape(index)
        out = self.spec.classes if local.loss == "softmax" else local.aux_feature_dim
        family = self.config.arch.family
        total = self.cost(build_head(family, local, shape.channels, out), shape)
        if local.reconstruct:
            total += self.cost(build_decoder(family, shape.channels, self.spec, local.aux_widen), shape)
        return total

    def encoders(self, start: int) -> float:
        """The received input and context encoders of a module starting at ``start`` (full register)."""
        local, target = self.config.local, self.net.shape(start - 1)
        total = self._input_bytes(target)  # a module keeps the input it received
        if local.context_image:
            image = self.net.shape(-1)
            total += self.cost(ImageEncoder(image.channels, target, local.aux_widen), image)
        if local.context_depth:
            source = self.net.shape(max(start - 2, -1))
            total += local.context_depth * self.cost(InputEncoder(source.channels, target), source)
        return total


def balanced_cuts(config: Config, spec: DatasetSpec, device: torch.device) -> list[int]:
    model = _CostModel(config, spec, device)
    blocks = len(model.net)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        block_cost = [model.block(index) for index in range(blocks)]
        cut_cost = [model.cut(index) for index in range(blocks)]
        input_cost = [model.encoders(start) if start else 0.0 for start in range(blocks)]
    cuts = min_max_cuts(block_cost, cut_cost, config.local.modules, input_cost)
    unit = "s" if model.measure_time else "bytes"
    say(f"[partition] {config.local.partition}: per-block cost ({unit}) "
        f"{[round(c, 4) if model.measure_time else int(c) for c in block_cost]} -> cuts after blocks {cuts}")
    return cuts


def module_activation_bytes(config: Config, spec: DatasetSpec, cuts: list[int], batch: int) -> list[int]:
    """Activation memory of each module's training step (body, encoders, head, decoder) at ``batch``."""
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
        size, (inputs, output, _) = saved_activation_bytes(module, current)
        sizes.append(size)
        packet = None if module.last else module.next_packet(current, inputs, output)
    return sizes
