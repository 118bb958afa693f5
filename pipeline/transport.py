"""The wire between neighbouring stages: a bounded queue at each end, a thread per direction.

On rank k a sender thread drains the outbox towards rank k+1 with blocking sends; on rank
k+1 a receiver thread fills the inbox. Compute overlaps communication, a full outbox blocks
the producer and an empty inbox the consumer, and every wait has a deadline.

What travels is a ``Frame``: a few opaque integers and a list of tensors. On the wire it is a
fixed-length int64 header, then the tensors in header order:
    header = [meta * META_LEN, count, (dtype id, ndim, d0, d1, d2, d3) * max_tensors]
The receiver allocates every tensor from the header, so partial and evaluation batches need no
special case. What the integers and tensors mean belongs to the codec each end is given
(pipeline/runners/codec.py); this module never looks inside. Each link has its own process
group: NCCL ignores tags, and one group per link keeps exactly one ordered stream on it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from pipeline.errors import StageFailure
from pipeline.runners.messages import Message

META_LEN = 6
MAX_NDIM = 4
_SLOT = 2 + MAX_NDIM
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
DTYPE_ID = {dtype: index for index, dtype in enumerate(DTYPES)}


@dataclass
class Frame:
    meta: tuple[int, ...]  # at most META_LEN integers, meaningful to the codec only
    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None = field(default=None, compare=False)  # GPU: the producer's kernels end here
    message: Message | None = field(default=None, compare=False)  # the receiving end's decoding


class Codec(Protocol):
    """Turns messages into frames and back (pipeline/runners/codec.py)."""

    @property
    def max_tensors(self) -> int: ...

    def encode(self, message: Message) -> Frame: ...

    def decode(self, frame: Frame) -> Message: ...

    def closes(self, message: Message) -> bool:
        """No message follows this one on the link."""
        ...


def header_length(max_tensors: int) -> int:
    return META_LEN + 1 + max_tensors * _SLOT


def encode_header(frame: Frame, max_tensors: int) -> torch.Tensor:
    tensors = frame.tensors
    if len(frame.meta) > META_LEN:
        raise ValueError(f"a frame carries at most {META_LEN} integers, got {len(frame.meta)}")
    if len(tensors) > max_tensors:
        raise ValueError(f"a frame of this link holds at most {max_tensors} tensors, got {len(tensors)}")
    values = [*frame.meta, *[0] * (META_LEN - len(frame.meta)), len(tensors)]
    for tensor in tensors:
        if tensor.dim() > MAX_NDIM or tensor.dtype not in DTYPE_ID:
            raise ValueError(f"cannot send a {tensor.dtype} tensor of {tensor.dim()} dims")
        dims = list(tensor.shape) + [0] * (MAX_NDIM - tensor.dim())
        values += [DTYPE_ID[tensor.dtype], tensor.dim(), *dims]
    values += [0] * (header_length(max_tensors) - len(values))
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[torch.dtype, tuple[int, ...]]]]:
    values: list[int] = header.tolist()
    meta, count = tuple(values[:META_LEN]), values[META_LEN]
    slots = (len(values) - META_LEN - 1) // _SLOT
    if not 0 <= count <= slots:
        raise StageFailure(f"corrupt message header ({count} tensors in a header of {slots} slots)")
    specs = []
    for index in range(count):
        base = META_LEN + 1 + index * _SLOT
        dtype_id, ndim = values[base], values[base + 1]
        if not (0 <= dtype_id < len(DTYPES) and 0 <= ndim <= MAX_NDIM):
            raise StageFailure(f"corrupt message header (dtype id {dtype_id}, {ndim} dims)")
        specs.append((DTYPES[dtype_id], tuple(values[base + 2 : base + 2 + ndim])))
    return meta, specs


class _Failed:
    """Placed in an inbox when the receiver thread dies, so the consumer raises its cause."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


class Link:
    """Common parts of both ends: the peer, the group, the codec, the bounded queue, the deadline."""

    def __init__(self, rank: int, peer: int, group: dist.ProcessGroup, codec: Codec, device: torch.device,
                 depth: int, timeout_s: float, wire_dtype: torch.dtype | None = None) -> None:
        self.rank, self.peer, self.group, self.codec, self.device = rank, peer, group, codec, device
        self.header_length = header_length(codec.max_tensors)
        # Floating tensors travel in wire_dtype (when set) and are restored to float32 on arrival.
        self.wire_dtype = wire_dtype
        # GPU: communication runs on a stream of its own, so it never queues behind compute.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.Queue[Frame | _Failed | None] = queue.Queue(maxsize=depth)
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop_guarded, daemon=True, name=f"{type(self).__name__}-{rank}")

    def start(self) -> None:
        self.thread.start()

    def _loop_guarded(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # a new thread starts on GPU 0: no stray context there
            self._loop()
        except BaseException as err:  # noqa: BLE001 -- any failure must reach the stage, never die silently
            self.error = err
            self._on_error(err)

    def _loop(self) -> None:
        raise NotImplementedError

    def _on_error(self, err: BaseException) -> None:
        pass


class Sender(Link):
    """Rank k's end of link k -> k+1: an Outbox."""

    def put(self, message: Message) -> None:
        """Queue a message; blocks while the queue is full, up to the deadline."""
        frame = self.codec.encode(message)
        if self.stream is not None:
            # The tensors may still be in flight on the compute stream: the send stream waits for this point.
            frame.ready = torch.cuda.Event()
            frame.ready.record(torch.cuda.current_stream(self.device))
        self._enqueue(frame)

    def _enqueue(self, frame: Frame | None) -> None:
        deadline = time.perf_counter() + self.timeout_s
        while True:
            if self.error is not None:
                raise StageFailure(f"rank {self.rank}: sending to rank {self.peer} failed: {describe(self.error)}") \
                    from self.error
            try:
                self.queue.put(frame, timeout=min(1.0, max(deadline - time.perf_counter(), 0.001)))
                return
            except queue.Full:
                if time.perf_counter() >= deadline:
                    raise StageFailure(
                        f"rank {self.rank}: rank {self.peer} took no message for {self.timeout_s:.0f} s "
                        f"(pipeline.timeout_s); it is stuck or dead"
                    ) from None

    def close(self) -> None:
        """Send everything still queued, then stop the thread."""
        self._enqueue(None)
        self.thread.join(self.timeout_s)
        if self.error is not None:
            raise StageFailure(f"rank {self.rank}: sending to rank {self.peer} failed: {describe(self.error)}") \
                from self.error
        if self.thread.is_alive():
            raise StageFailure(f"rank {self.rank}: rank {self.peer} did not take the last messages within "
                               f"{self.timeout_s:.0f} s (pipeline.timeout_s)")

    def _loop(self) -> None:
        while True:
            frame = self.queue.get()
            if not isinstance(frame, Frame):
                return
            if self.stream is not None and frame.ready is not None:
                self.stream.wait_event(frame.ready)
                with torch.cuda.stream(self.stream):
                    self._send(frame)
                # Hold the tensors until the stream has sent them; only then may the allocator reuse them.
                self.stream.synchronize()
            else:
                self._send(frame)

    def _send(self, frame: Frame) -> None:
        tensors = frame.tensors
        if self.wire_dtype is not None:
            tensors = [t.to(self.wire_dtype) if t.is_floating_point() else t for t in tensors]
        header = encode_header(Frame(frame.meta, tensors), self.codec.max_tensors)
        dist.send(header.to(self.device), self.peer, group=self.group)
        for tensor in tensors:
            dist.send(tensor.contiguous(), self.peer, group=self.group)


class Receiver(Link):
    """Rank k+1's end of link k -> k+1: an Inbox."""

    def get(self) -> Message:
        """The next message; waits up to the deadline for it."""
        try:
            item = self.queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise StageFailure(
                f"rank {self.rank}: no message from rank {self.peer} for {self.timeout_s:.0f} s "
                f"(pipeline.timeout_s); it is stuck or dead"
            ) from None
        if isinstance(item, _Failed):
            raise StageFailure(f"rank {self.rank}: receiving from rank {self.peer} failed: {describe(item.cause)}") \
                from item.cause
        assert isinstance(item, Frame) and item.message is not None
        if item.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(item.ready)
            for tensor in item.tensors:
                tensor.record_stream(compute)  # allocated on the receive stream, used on the compute one
        return item.message

    def _loop(self) -> None:
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            while True:
                frame = self._receive()
                # Decoded here, off the consumer's path; a packet that does not fit ends this thread.
                frame.message = self.codec.decode(frame)
                self.queue.put(frame)
                if self.codec.closes(frame.message):
                    return

    def _receive(self) -> Frame:
        header = torch.empty(self.header_length, dtype=torch.int64, device=self.device)
        dist.recv(header, self.peer, group=self.group)
        meta, specs = decode_header(header.cpu())
        tensors = []
        for dtype, shape in specs:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(tensor, self.peer, group=self.group)
            tensors.append(tensor.float() if self.wire_dtype is not None and dtype == self.wire_dtype else tensor)
        frame = Frame(meta, tensors)
        if self.stream is not None:
            frame.ready = torch.cuda.Event()
            frame.ready.record(self.stream)
        return frame

    def _on_error(self, err: BaseException) -> None:
        self.queue.put(_Failed(err))


def describe(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its text."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
