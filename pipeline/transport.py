"""The wire between neighbouring stages: a bounded queue at each end, a thread per direction.

On rank k a sender thread drains the outbox towards rank k+1 with blocking sends; on rank
k+1 a receiver thread fills the inbox. Compute overlaps communication, a full outbox blocks
the producer and an empty inbox the consumer, and every wait has a deadline.

Message = a fixed-length int64 header, then its tensors in header order:
    header = [kind, count, (dtype id, ndim, d0, d1, d2, d3) * MAX_TENSORS]
The receiver allocates every tensor from the header, so partial and evaluation batches need
no special case. Each link has its own process group: NCCL ignores tags, and one group per
link keeps exactly one ordered stream of messages on it.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.config import MAX_CONTEXT_DEPTH
from pipeline.errors import StageFailure


class Kind(enum.IntEnum):
    TRAIN = 1
    EVAL = 2
    END_EPOCH = 3
    STOP = 4


MAX_TENSORS = 3 + MAX_CONTEXT_DEPTH  # labels, features, image, then the register
MAX_NDIM = 4
_SLOT = 2 + MAX_NDIM
HEADER_LEN = 2 + MAX_TENSORS * _SLOT
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
DTYPE_ID = {dtype: index for index, dtype in enumerate(DTYPES)}


@dataclass
class Message:
    kind: Kind
    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None = None  # GPU: marks when the producer's kernels for the tensors end


def encode_header(kind: Kind, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    values = [int(kind), len(tensors)]
    for tensor in tensors:
        if tensor.dim() > MAX_NDIM or tensor.dtype not in DTYPE_ID:
            raise ValueError(f"cannot send a {tensor.dtype} tensor of {tensor.dim()} dims")
        dims = list(tensor.shape) + [0] * (MAX_NDIM - tensor.dim())
        values += [DTYPE_ID[tensor.dtype], tensor.dim(), *dims]
    values += [0] * (HEADER_LEN - len(values))
    return torch.tensor(values, dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[Kind, list[tuple[torch.dtype, tuple[int, ...]]]]:
    values = header.tolist()
    try:
        kind = Kind(values[0])
    except ValueError:
        raise StageFailure(f"corrupt message header (kind {values[0]})") from None
    specs = []
    for index in range(values[1]):
        base = 2 + index * _SLOT
        dtype, ndim = DTYPES[values[base]], values[base + 1]
        specs.append((dtype, tuple(values[base + 2 : base + 2 + ndim])))
    return kind, specs


class _Failed:
    """Placed in an inbox when the receiver thread dies, so the consumer raises its cause."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


class Link:
    """Common parts of both ends: the peer, the group, the bounded queue, the deadline."""

    def __init__(self, rank: int, peer: int, group: dist.ProcessGroup, device: torch.device,
                 depth: int, timeout_s: float, wire_dtype: torch.dtype | None = None) -> None:
        self.rank, self.peer, self.group, self.device = rank, peer, group, device
        # Floating tensors travel in wire_dtype (when set) and are restored to float32 on arrival.
        self.wire_dtype = wire_dtype
        # GPU: communication runs on a stream of its own, so it never queues behind compute.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.Queue[Message | _Failed | None] = queue.Queue(maxsize=depth)
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
        except BaseException as err:  # any failure must reach the stage, never die silently
            self.error = err
            self._on_error(err)

    def _loop(self) -> None:
        raise NotImplementedError

    def _on_error(self, err: BaseException) -> None:
        pass


class Sender(Link):
    """Rank k's end of link k -> k+1."""

    def put(self, kind: Kind, tensors: Sequence[torch.Tensor]) -> float:
        """Queue a message; returns the seconds spent waiting for room."""
        message = Message(kind, list(tensors))
        if self.stream is not None:
            # The tensors may still be in flight on the compute stream: the send stream waits for this point.
            message.ready = torch.cuda.Event()
            message.ready.record(torch.cuda.current_stream(self.device))
        return self._enqueue(message)

    def _enqueue(self, message: Message | None) -> float:
        started = time.perf_counter()
        deadline = started + self.timeout_s
        while True:
            if self.error is not None:
                raise StageFailure(f"rank {self.rank}: sending to rank {self.peer} failed: {_describe(self.error)}")
            try:
                self.queue.put(message, timeout=min(1.0, max(deadline - time.perf_counter(), 0.001)))
                return time.perf_counter() - started
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
            raise StageFailure(f"rank {self.rank}: sending to rank {self.peer} failed: {_describe(self.error)}")
        if self.thread.is_alive():
            raise StageFailure(f"rank {self.rank}: rank {self.peer} did not take the last messages within "
                               f"{self.timeout_s:.0f} s (pipeline.timeout_s)")

    def _loop(self) -> None:
        while True:
            message = self.queue.get()
            if message is None or isinstance(message, _Failed):
                return
            if self.stream is not None and message.ready is not None:
                self.stream.wait_event(message.ready)
                with torch.cuda.stream(self.stream):
                    self._send(message.kind, message.tensors)
                # Hold the tensors until the stream has sent them; only then may the allocator reuse them.
                self.stream.synchronize()
            else:
                self._send(message.kind, message.tensors)

    def _send(self, kind: Kind, tensors: list[torch.Tensor]) -> None:
        if self.wire_dtype is not None:
            tensors = [t.to(self.wire_dtype) if t.is_floating_point() else t for t in tensors]
        header = encode_header(kind, tensors).to(self.device)
        dist.send(header, self.peer, group=self.group)
        for tensor in tensors:
            dist.send(tensor.contiguous(), self.peer, group=self.group)


class Receiver(Link):
    """Rank k+1's end of link k -> k+1."""

    def get(self) -> tuple[Message, float]:
        """The next message and the seconds spent waiting for it."""
        started = time.perf_counter()
        try:
            item = self.queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise StageFailure(
                f"rank {self.rank}: no message from rank {self.peer} for {self.timeout_s:.0f} s "
                f"(pipeline.timeout_s); it is stuck or dead"
            ) from None
        if isinstance(item, _Failed):
            raise StageFailure(f"rank {self.rank}: receiving from rank {self.peer} failed: {_describe(item.cause)}")
        assert item is not None
        if item.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(item.ready)
            for tensor in item.tensors:
                tensor.record_stream(compute)  # allocated on the receive stream, used on the compute one
        return item, time.perf_counter() - started

    def _loop(self) -> None:
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with context:
            while True:
                message = self._receive()
                self.queue.put(message)
                if message.kind == Kind.STOP:
                    return

    def _receive(self) -> Message:
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(header, self.peer, group=self.group)
        kind, specs = decode_header(header.cpu())
        tensors = []
        for dtype, shape in specs:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(tensor, self.peer, group=self.group)
            tensors.append(tensor.float() if self.wire_dtype is not None and dtype == self.wire_dtype else tensor)
        message = Message(kind, tensors)
        if self.stream is not None:
            message.ready = torch.cuda.Event()
            message.ready.record(self.stream)
        return message

    def _on_error(self, err: BaseException) -> None:
        self.queue.put(_Failed(err))


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
