"""What one device holds and spends per training step: its stage's module, its links and its replicas.

A device holds its module's weights, gradients and SGD momentum (and DDP's gradient buckets where replicas
share the module), the activations of one batch (pipeline/performance/cost.py composes them from a profile)
and the packets its links may queue; its step is its module's, transfers included, plus its share of the
gradients' ring all-reduce (pipeline/performance/traffic.py) over the link. DDP with activation
checkpointing holds the E2E network, its activations as recomputation leaves them, and spends one more
forward of the recomputed segments. The planner (pipeline/tools/plan.py) asks these for every layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.model.context import ContextPlan
from pipeline.performance.cost import (
    END_TO_END,
    NetworkProfile,
    Starts,
    predicted_checkpointed_activation_bytes,
    received_bytes,
    recompute_seconds,
    sent_bytes,
    stage_activation_bytes,
    stage_parameter_bytes,
    stage_seconds,
)
from pipeline.performance.traffic import all_reduce_bytes

OPTIMIZER_COPIES = 3  # weights, gradients, SGD momentum


def allreduce_bytes(parameter_bytes: int, replicas: int) -> int:
    """What each device sends in the gradients' ring all-reduce (pipeline/performance/traffic.py counts all devices)."""
    return all_reduce_bytes(parameter_bytes, replicas) // replicas


def state_bytes(parameter_bytes: int, replicas: int) -> int:
    """Weights, gradients and momentum, and DDP's gradient buckets where replicas share the module."""
    return parameter_bytes * (OPTIMIZER_COPIES + (1 if replicas > 1 else 0))


def device_memory_bytes(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int,
                        batch: int, replicas: int, queue_depth: int, starts: Starts = None) -> int:
    """A stage's device: weights, gradients and momentum (and DDP's gradient buckets), the
    activations of one batch, and the packets its links may hold."""
    state = state_bytes(stage_parameter_bytes(profile, plan, index, start, end, starts), replicas)
    queued = queue_depth * (received_bytes(profile, plan, index, start, batch, starts)
                            + sent_bytes(profile, plan, index, end, batch, starts))
    return state + stage_activation_bytes(profile, plan, index, start, end, batch, starts) + queued


def device_seconds(profile: NetworkProfile, plan: ContextPlan, index: int, start: int, end: int, batch: int,
                   replicas: int, link_bytes_per_s: float, starts: Starts = None) -> float:
    """A stage's device: its module's step at ``batch``, transfers included, and its share of the all-reduce."""
    parameters = stage_parameter_bytes(profile, plan, index, start, end, starts)
    return (stage_seconds(profile, plan, index, start, end, batch, link_bytes_per_s, starts)
            + allreduce_bytes(parameters, replicas) / link_bytes_per_s)


def checkpointed_memory_bytes(profile: NetworkProfile, segments: int, batch: int, replicas: int) -> int:
    """A DDP device whose E2E network recomputes the first S - 1 of ``segments`` in backward: its state and
    the activations recomputation leaves."""
    parameters = stage_parameter_bytes(profile, END_TO_END, 0, 0, len(profile))
    return state_bytes(parameters, replicas) + predicted_checkpointed_activation_bytes(profile, segments, batch)


def checkpointed_seconds(profile: NetworkProfile, segments: int, batch: int, replicas: int,
                         link_bytes_per_s: float) -> float:
    """That device's step: E2E's, the recomputed forward and its share of the all-reduce."""
    parameters = stage_parameter_bytes(profile, END_TO_END, 0, 0, len(profile))
    return (stage_seconds(profile, END_TO_END, 0, 0, len(profile), batch, link_bytes_per_s)
            + recompute_seconds(profile, segments, batch) + allreduce_bytes(parameters, replicas) / link_bytes_per_s)


def largest_batch(memory_at: Callable[[int], float], capacity_bytes: float) -> int:
    """The largest batch a device of ``capacity_bytes`` holds, its memory at a batch ``memory_at`` (affine in it)."""
    probe = 1 << 16
    fixed = memory_at(0)
    per_sample = (memory_at(probe) - fixed) / probe
    return max(0, math.floor((capacity_bytes - fixed) / per_sample))
