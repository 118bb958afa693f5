"""Activation checkpointing of the end-to-end network's blocks (precision.checkpoint_segments = S).

The blocks form S segments of whole blocks (sizes differing by at most one, as the equal cuts);
the first S - 1 run under torch's non-reentrant checkpoint, which keeps only each segment's
input and runs the segment's forward again during backward. The last segment runs as usual:
its activations would be recomputed at once (torch.utils.checkpoint.checkpoint_sequential
does the same). Torch's checkpoint runs the second forward in training mode, which would
update batch norm's running statistics a second time (torch leaves this to the caller); the
recomputation here restores them afterwards, so a step updates them once, as without
recomputation, and computes the same values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from pipeline.model.partition import segment_ranges


@contextlib.contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Batch norm's running statistics (and batch count) of ``module`` as they were before: the
    recomputation runs the very operations of the first forward (the checkpoint checks that it saves
    the same tensors), and what they add to the running statistics is taken back."""
    norms = [layer for layer in module.modules() if isinstance(layer, _BatchNorm) and layer.track_running_stats]
    kept = [[buffer.clone() for buffer in layer.buffers()] for layer in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(norms, kept):
                for buffer, before in zip(layer.buffers(), buffers):
                    buffer.copy_(before)


def checkpointed_body(body: nn.Sequential, inputs: torch.Tensor, segments: int) -> torch.Tensor:
    """``body(inputs)`` with the first ``segments`` - 1 segments recomputed in backward."""
    ranges = segment_ranges(len(body), segments)
    out = inputs
    for start, end in ranges[:-1]:
        part = body[start:end]

        def contexts(part: nn.Module = part) -> tuple[contextlib.AbstractContextManager[None],
                                                     contextlib.AbstractContextManager[None]]:
            return contextlib.nullcontext(), running_statistics_kept(part)

        out = checkpoint(part, out, use_reentrant=False, context_fn=contexts)
    start, end = ranges[-1]
    result: torch.Tensor = body[start:end](out)
    return result
