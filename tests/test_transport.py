"""The wire header: every tensor's dtype and shape survive the round trip; bad headers are refused."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import StageFailure
from pipeline.transport import HEADER_LEN, MAX_TENSORS, Kind, decode_header, encode_header


def test_header_round_trip_for_mixed_tensors() -> None:
    tensors = [
        torch.zeros(7, dtype=torch.int64),  # labels of a partial batch
        torch.zeros(7, 16, 32, 32),
        torch.zeros(7, 1, 32, 32, dtype=torch.bfloat16),
        torch.zeros(7, 32, 16, 16, dtype=torch.float16),
    ]
    header = encode_header(Kind.EVAL, tensors)
    assert header.dtype == torch.int64 and header.shape == (HEADER_LEN,)
    kind, specs = decode_header(header)
    assert kind == Kind.EVAL
    assert specs == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_control_messages_carry_no_or_small_tensors() -> None:
    assert decode_header(encode_header(Kind.STOP, [])) == (Kind.STOP, [])
    kind, specs = decode_header(encode_header(Kind.END_EPOCH, [torch.zeros(5, dtype=torch.int64)]))
    assert kind == Kind.END_EPOCH and specs == [(torch.int64, (5,))]


def test_unsendable_messages_are_refused() -> None:
    with pytest.raises(ValueError, match="at most"):
        encode_header(Kind.TRAIN, [torch.zeros(1)] * (MAX_TENSORS + 1))
    with pytest.raises(ValueError, match="cannot send"):
        encode_header(Kind.TRAIN, [torch.zeros(1, 1, 1, 1, 1)])
    with pytest.raises(ValueError, match="cannot send"):
        encode_header(Kind.TRAIN, [torch.zeros(2, dtype=torch.float64)])


def test_corrupt_kind_is_a_stage_failure() -> None:
    header = encode_header(Kind.TRAIN, [])
    header[0] = 99
    with pytest.raises(StageFailure, match="corrupt message header"):
        decode_header(header)
