"""The wire header: a frame's integers and every tensor's dtype and shape survive the round trip."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import StageFailure
from pipeline.transport import META_LEN, Frame, decode_header, encode_header, header_length


def test_header_round_trip_for_mixed_tensors() -> None:
    tensors = [
        torch.zeros(7, dtype=torch.int64),  # labels of a partial batch
        torch.zeros(7, 16, 32, 32),
        torch.zeros(7, 1, 32, 32, dtype=torch.bfloat16),
        torch.zeros(7, 32, 16, 16, dtype=torch.float16),
    ]
    header = encode_header(Frame((2, 5), tensors), max_tensors=6)
    assert header.dtype == torch.int64 and header.shape == (header_length(6),)
    meta, specs = decode_header(header)
    assert meta == (2, 5) + (0,) * (META_LEN - 2)
    assert specs == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_a_frame_without_tensors_keeps_its_integers() -> None:
    meta, specs = decode_header(encode_header(Frame((3, 1, 2, 0, 17, 1), []), max_tensors=2))
    assert meta == (3, 1, 2, 0, 17, 1) and specs == []


def test_unsendable_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 2 tensors"):
        encode_header(Frame((1,), [torch.zeros(1)] * 3), max_tensors=2)
    with pytest.raises(ValueError, match="at most"):
        encode_header(Frame(tuple(range(META_LEN + 1)), []), max_tensors=2)
    with pytest.raises(ValueError, match="cannot send"):
        encode_header(Frame((1,), [torch.zeros(1, 1, 1, 1, 1)]), max_tensors=2)
    with pytest.raises(ValueError, match="cannot send"):
        encode_header(Frame((1,), [torch.zeros(2, dtype=torch.float64)]), max_tensors=2)


@pytest.mark.parametrize("slot, value", [(META_LEN, 99), (META_LEN + 1, 42), (META_LEN + 2, 9)])
def test_corrupt_headers_are_a_stage_failure(slot: int, value: int) -> None:
    header = encode_header(Frame((1,), [torch.zeros(3, 2)]), max_tensors=2)
    header[slot] = value  # tensor count, dtype id, number of dims
    with pytest.raises(StageFailure, match="corrupt message header"):
        decode_header(header)
