"""What travels down a chain of stages: typed messages that carry their own epoch and step.

A stage never re-derives where the run stands from a count of messages: each training
message says which epoch and step it is, and each epoch end says where a resumed run picks up.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import EpochEnd, SavePoint


@dataclass(frozen=True)
class Train:
    """One training batch: module k trains on it, then module k+1 on module k's output."""

    epoch: int
    step: int  # 1-based count of steps once this one is done
    samples: int  # the global batch's size, whatever share of it this process holds
    packet: Packet
    # Buffered schedule: the batch's id on its link (the sending stage's own step that produced it;
    # a data batch's step) and how many times the receiving stage has now trained on it.
    entry: int = 0
    use: int = 1


@dataclass(frozen=True)
class Eval:
    """One test batch, flowing through every module without training any."""

    epoch: int
    packet: Packet


@dataclass(frozen=True)
class Stop:
    """The run is over: every stage passes it on, then ends. ``preempted``: by a stop signal, after a
    save point, before the run's end (the process exits with EXIT_PREEMPTED)."""

    preempted: bool = False


Message = Train | Eval | EpochEnd | SavePoint | Stop

__all__ = ["EpochEnd", "Eval", "Message", "SavePoint", "Stop", "Train"]
