"""The message codec: every message kind survives encode -> decode; packets that do not fit are refused."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import StageFailure
from pipeline.model.context import ContextPlan
from pipeline.runtime.codec import MessageCodec
from pipeline.runtime.messages import EpochEnd, Eval, Stop, Train
from pipeline.runtime.packet import Packet
from pipeline.runtime.run_order import Position
from pipeline.runtime.transport import Frame

SHAPE = (16, 8, 8)


def _packet(batch: int, register: int, image: bool) -> Packet:
    return Packet(torch.arange(batch), torch.randn(batch, 16, 8, 8),
                  torch.randn(batch, 1, 32, 32) if image else None, [torch.randn(batch, 4, 32, 32)] * register)


@pytest.mark.parametrize("context, receiver, register, image", [
    ((3, 0, False, False), 1, 0, False),  # R0
    ((3, 0, True, False), 1, 0, True),  # E: the image travels
    ((4, 2, False, False), 2, 2, False),  # R2 into module 2: inputs of modules 1 and 0
    ((4, 1, True, True), 1, 0, True),  # R1E into module 1: module 0's input is the image itself
])
def test_every_kind_round_trips(context: tuple[int, int, bool, bool], receiver: int, register: int,
                                image: bool) -> None:
    codec = MessageCodec(ContextPlan(*context), receiver, SHAPE)
    assert codec.max_tensors == 2 + int(image) + register
    packet = _packet(5, register, image)
    for message in (Train(3, 41, 10, packet, entry=37), Eval(3, packet)):
        frame = codec.encode(message)
        decoded = codec.decode(Frame(frame.meta, frame.tensors))
        assert type(decoded) is type(message)
        assert decoded.epoch == 3 and getattr(decoded, "step", 41) == 41 and getattr(decoded, "samples", 10) == 10
        assert getattr(decoded, "entry", 37) == 37  # the buffered schedule's batch id travels in the header
        assert all(a is b for a, b in zip(decoded.packet.tensors(), packet.tensors()))
        assert (decoded.packet.image is None) == (not image)
    end = EpochEnd(2, Position(3, 0, 40), final=True)
    assert codec.decode(codec.encode(end)) == end
    assert isinstance(codec.decode(codec.encode(Stop())), Stop)
    assert codec.closes(Stop()) and not codec.closes(end)


def test_a_packet_for_another_module_is_refused() -> None:
    codec = MessageCodec(ContextPlan(3, 0, True, False), 1, SHAPE)
    wrong_count = codec.encode(Train(1, 1, 5, _packet(5, 0, image=False)))
    with pytest.raises(StageFailure, match="module 1 got 2 tensors .* expects 3 tensors"):
        codec.decode(wrong_count)
    wrong_shape = Frame((1, 1, 1, 5, 1), [torch.arange(5), torch.randn(5, 32, 8, 8), torch.randn(5, 1, 32, 32)])
    with pytest.raises(StageFailure, match=r"features \[5, 32, 8, 8\].*\[batch, 16, 8, 8\]"):
        codec.decode(wrong_shape)


def test_dense_links_fix_the_channels_only() -> None:
    """Segmentation evaluates whole images of any size: the spatial size travels in each header."""
    codec = MessageCodec(ContextPlan(2, 0, False, False), 1, SHAPE, dense=True)
    for side in ((8, 8), (5, 13)):
        packet = Packet(torch.zeros(2, side[0] * 8, side[1] * 8, dtype=torch.int64), torch.randn(2, 16, *side))
        decoded = codec.decode(codec.encode(Eval(1, packet)))
        assert isinstance(decoded, Eval) and decoded.packet.features.shape == (2, 16, *side)
    wrong = Frame((2, 1), [torch.zeros(2, 8, 8, dtype=torch.int64), torch.randn(2, 32, 8, 8)])
    with pytest.raises(StageFailure, match=r"features \[2, 32, 8, 8\].*\[batch, 16, height, width\]"):
        codec.decode(wrong)


def test_an_unknown_kind_is_refused() -> None:
    codec = MessageCodec(ContextPlan(2, 0, False, False), 1, SHAPE)
    with pytest.raises(StageFailure, match="unknown kind 9"):
        codec.decode(Frame((9,), []))
