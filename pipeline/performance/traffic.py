"""Bytes on the wire: one packet between modules (the one owner of that figure), each mode's per step, and the
share of a step a process idles.

A packet is what the codec (pipeline/runtime/codec.py) puts in a frame: its header, sized by the codec for the
link's tensors, then the labels, the features and the context the ContextPlan sends (image, register), the
floating tensors in the wire's element width (pipeline.wire_dtype). What a step sends is fixed by the layout
(shapes, parameter counts), so it is computed here, not measured: the predictions from a profile
(pipeline/performance/cost.py) and the benchmark's figures from a layout both ask this module. Every per-step
figure is bytes sent per step of one global batch, summed over all processes (a link's bytes are counted
once, at the sender).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from torch import nn

from pipeline.model.context import ContextPlan
from pipeline.model.networks.base import BlockNet, Shape
from pipeline.runtime.codec import MessageCodec, carried_inputs
from pipeline.runtime.transport import header_length

LABEL_BYTES = 8  # int64: one label, and one value of a frame's header
FP32_BYTES = 4  # what a profile counts a feature's element in

# module k -> the bytes of one sample of module k's input (module 0's is the image) in fp32
InputBytes = Callable[[int], int]


def wire_element_bytes(wire_dtype: str) -> int:
    """Bytes of one activation element on a wire of ``pipeline.wire_dtype`` (fp32 or bf16); the
    classic pipeline sends in it too (pipeline/tools/classic_pp.py)."""
    return 2 if wire_dtype == "bf16" else FP32_BYTES


def header_bytes(plan: ContextPlan, receiver: int) -> int:
    """The header in front of every packet into ``receiver``: as long as the codec makes it for that link."""
    return LABEL_BYTES * header_length(MessageCodec(plan, receiver, ()).max_tensors)


def payload_bytes(plan: ContextPlan, receiver: int, input_bytes: InputBytes, batch: int, element_bytes: int) -> int:
    """One packet of ``batch`` samples into ``receiver`` without its header: labels, features, image, register,
    the floats in ``element_bytes`` (4: fp32, 2: bf16)."""
    floats = sum(input_bytes(module) for module in carried_inputs(plan, receiver))
    return batch * (LABEL_BYTES + floats * element_bytes // FP32_BYTES)


def packet_bytes(plan: ContextPlan, input_shapes: Sequence[Shape], receiver: int, batch: int,
                 element_bytes: int) -> int:
    """One training message into module ``receiver``: header, labels, features, image, register.

    ``input_shapes[k]`` is module k's input (the image for module 0); floating tensors travel in
    ``element_bytes`` (4: fp32, 2: pipeline.wire_dtype = bf16).
    """
    def input_bytes(module: int) -> int:
        return FP32_BYTES * math.prod(input_shapes[module])

    return header_bytes(plan, receiver) + payload_bytes(plan, receiver, input_bytes, batch, element_bytes)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def all_reduce_bytes(nbytes: int, processes: int) -> int:
    """A ring all-reduce of ``nbytes`` over ``processes``: each sends 2 (N - 1) / N x nbytes."""
    return 2 * (processes - 1) * nbytes


def ddp_bytes(module: nn.Module, processes: int) -> int:
    """DDP: the gradients' all-reduce, plus rank 0's buffers (batch-norm statistics) broadcast to
    every other rank before each forward (DistributedDataParallel's broadcast_buffers)."""
    return all_reduce_bytes(parameter_bytes(module), processes) + (processes - 1) * buffer_bytes(module)


def local_pipeline_bytes(plan: ContextPlan, input_shapes: Sequence[Shape], modules: Sequence[nn.Module],
                         batch: int, element_bytes: int, replicas: int = 1) -> int:
    """K x R local pipeline: each replica's chain carries its share of the batch forward only; each
    stage's R replicas all-reduce that module's gradients and broadcast its buffers."""
    shares = [batch // replicas + (1 if r < batch % replicas else 0) for r in range(replicas)]
    links = sum(packet_bytes(plan, input_shapes, receiver, share, element_bytes)
                for share in shares for receiver in range(1, len(modules)))
    if replicas == 1:
        return links
    return links + sum(ddp_bytes(module, replicas) for module in modules)


def classic_pp_bytes(net: BlockNet, cuts: Sequence[int], batch: int, element_bytes: int = FP32_BYTES) -> int:
    """torch.distributed.pipelining: each cut's activation forward and its gradient backward, for
    every sample of the batch (the microbatches add up to it), plus the labels rank 0 sends to
    the last stage."""
    if not cuts:
        return 0
    crossing = sum(math.prod(net.shape(cut)) for cut in cuts)
    return batch * (2 * crossing * element_bytes + LABEL_BYTES)


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle share of each stage's step under GPipe and 1F1B alike: (K - 1) / (M + K - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def measured_idle_fraction(busy_fractions: Sequence[float]) -> float:
    """1 - the processes' mean busy fraction (their compute seconds over their training seconds)."""
    return round(1.0 - statistics.fmean(busy_fractions), 4) if busy_fractions else 0.0
