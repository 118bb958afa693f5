"""The wire between neighbouring stages: a bounded queue at each end, one courier thread per rank.

Each rank has one communication thread, its ``Courier``: it drains the outbox towards rank k+1
and fills the inbox from rank k-1 with isend/irecv, every work waited on with a deadline.
Compute overlaps communication, a full outbox blocks the producer and an empty inbox the
consumer, and every wait has a deadline.

What travels is a ``Frame``: a few opaque integers and a list of tensors. On the wire it is a
fixed-length int64 header, then the tensors in header order:
    header = [meta * META_LEN, count, (dtype id, ndim, d0, d1, d2, d3) * max_tensors]
The receiver allocates every tensor from the header, so partial and evaluation batches need no
special case. What the integers and tensors mean belongs to the codec each end is given
(pipeline/runtime/codec.py); this module never looks inside. Each link has its own process
group: NCCL ignores tags, and one group per link keeps exactly one ordered stream on it.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from pipeline.errors import StageFailure, StuckPeer
from pipeline.runtime.messages import Message

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
    """Turns messages into frames and back (pipeline/runtime/codec.py)."""

    @property
    def max_tensors(self) -> int: ...

    def encode(self, message: Message) -> Frame: ...

    def decode(self, frame: Frame) -> Message: ...

    def closes(self, message: Message) -> bool:
        """No message follows this one on the link."""
        ...


def header_length(max_tensors: int) -> int:
    return META_LEN + 1 + max_tensors * _SLOT


def encode_header(meta: tuple[int, ...], specs: list[tuple[torch.dtype, tuple[int, ...]]],
                  max_tensors: int) -> torch.Tensor:
    """The header of a frame of ``meta`` whose tensors have ``specs`` ((dtype, shape) each, as
    ``decode_header`` returns them): it needs no tensor's data."""
    if len(meta) > META_LEN:
        raise ValueError(f"a frame carries at most {META_LEN} integers, got {len(meta)}")
    if len(specs) > max_tensors:
        raise ValueError(f"a frame of this link holds at most {max_tensors} tensors, got {len(specs)}")
    values = [*meta, *[0] * (META_LEN - len(meta)), len(specs)]
    for dtype, shape in specs:
        if len(shape) > MAX_NDIM or dtype not in DTYPE_ID:
            raise ValueError(f"cannot send a {dtype} tensor of {len(shape)} dims")
        values += [DTYPE_ID[dtype], len(shape), *shape, *[0] * (MAX_NDIM - len(shape))]
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
    """Placed in an inbox when the courier thread dies, so the consumer raises its cause."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


class Link:
    """Common parts of both ends: the peer, the group, the codec, the bounded queue, the deadline.

    A link end does no I/O itself: this rank's ``Courier`` thread moves its frames (one thread for
    both of a rank's links, see ``Courier``).
    """

    def __init__(self, rank: int, peer: int, group: dist.ProcessGroup, codec: Codec, device: torch.device,
                 depth: int, timeout_s: float, wire_dtype: torch.dtype | None = None,
                 channels_last: bool = False, keep_wire_dtype: bool = False) -> None:
        self.rank, self.peer, self.group, self.codec, self.device = rank, peer, group, codec, device
        self.header_length = header_length(codec.max_tensors)
        # Floating tensors travel in wire_dtype (when set) and are restored to float32 on arrival,
        # unless the receiving module runs under bf16 autocast with a bf16 wire (keep_wire_dtype):
        # autocast would cast them straight back, a copy and a float32 buffer per tensor for nothing.
        self.wire_dtype = wire_dtype
        self.keep_wire_dtype = keep_wire_dtype
        # 4-D tensors travel in the layout both modules compute in (precision.channels_last), so neither
        # end converts them: the sender would copy a channels_last output to NCHW and the receiving
        # module copy it back, two full copies per tensor per step.
        self.channels_last = channels_last
        # GPU: communication runs on a stream of its own, so it never queues behind compute.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue: queue.Queue[Frame | _Failed | None] = queue.Queue(maxsize=depth)
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        self.courier: Courier | None = None

    @property
    def thread(self) -> threading.Thread:
        assert self.courier is not None, "the link was never started"
        return self.courier.thread

    def on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """The dense buffer that carries ``tensor``: itself, or for a channels_last 4-D tensor its
        storage seen as an NHWC tensor (gloo sends contiguous tensors only; this view is one)."""
        if self.channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return tensor.contiguous()

    def arriving(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor of ``shape``, the dense buffer to receive into): ``on_wire``'s inverse."""
        if self.channels_last and len(shape) == 4:
            n, c, h, w = shape
            buffer = torch.empty((n, h, w, c), dtype=dtype, device=self.device)
            return buffer.permute(0, 3, 1, 2), buffer
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        return buffer, buffer

    def _wake(self) -> None:
        if self.courier is not None:
            self.courier.wake.set()

    def _on_error(self, err: BaseException) -> None:
        self.error = err


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
                self._wake()
                return
            except queue.Full:
                if time.perf_counter() >= deadline:
                    raise StuckPeer(
                        f"rank {self.rank}: rank {self.peer} took no message for {self.timeout_s:.0f} s "
                        f"(pipeline.timeout_s); it is stuck or dead", self.peer
                    ) from None

    def close(self) -> None:
        """Send everything still queued, then release the courier from this link."""
        self._enqueue(None)
        assert self.courier is not None, "the link was never started"
        drained = self.courier.drained.wait(self.timeout_s)
        if self.error is not None:
            raise StageFailure(f"rank {self.rank}: sending to rank {self.peer} failed: {describe(self.error)}") \
                from self.error
        if not drained:
            raise StuckPeer(f"rank {self.rank}: rank {self.peer} did not take the last messages within "
                               f"{self.timeout_s:.0f} s (pipeline.timeout_s)", self.peer)

    def header(self, frame: Frame) -> torch.Tensor:
        """``frame``'s header where it is sent from, built from the tensors' shapes alone.

        On a GPU the courier uploads it before its link stream waits for the producer's kernels,
        from pinned memory and without blocking: a copy from pageable memory would hold the
        courier until the link stream (waiting on compute) reached it, so it could neither post
        the next receive nor see a deadline pass until this rank's step ended.
        """
        wire = self.wire_dtype
        specs = [(wire if wire is not None and tensor.is_floating_point() else tensor.dtype, tuple(tensor.shape))
                 for tensor in frame.tensors]
        header = encode_header(frame.meta, specs, self.codec.max_tensors)
        if self.device.type == "cuda":
            return header.pin_memory().to(self.device, non_blocking=True)
        return header

    def post(self, frame: Frame, header: torch.Tensor) -> tuple[list[torch.Tensor], list[Work]]:
        """Start sending ``frame`` after its ``header``, all in flight at once; returns what must stay
        referenced until the works complete (the courier keeps it) and the works.

        That is the sent buffers and the frame's own tensors: on a GPU a wire-dtype or layout copy
        reads them on the link stream, later than the host gets here, and the allocator knows only
        their compute stream: freed now, the next step could reuse their memory before the copy ran.
        """
        tensors = frame.tensors
        if self.wire_dtype is not None:
            tensors = [t.to(self.wire_dtype) if t.is_floating_point() else t for t in tensors]
        buffers = [header, *(self.on_wire(tensor) for tensor in tensors)]
        works = [_started(dist.isend(tensor, self.peer, group=self.group)) for tensor in buffers]
        return [*buffers, *frame.tensors], works


class Receiver(Link):
    """Rank k+1's end of link k -> k+1: an Inbox."""

    def get(self) -> Message:
        """The next message; waits up to the deadline for it."""
        try:
            item = self.queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise StuckPeer(
                f"rank {self.rank}: no message from rank {self.peer} for {self.timeout_s:.0f} s "
                f"(pipeline.timeout_s); it is stuck or dead", self.peer
            ) from None
        self._wake()
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

    def post_header(self) -> tuple[torch.Tensor, list[Work]]:
        header = torch.empty(self.header_length, dtype=torch.int64, device=self.device)
        return header, [_started(dist.irecv(header, self.peer, group=self.group))]

    def post_tensors(self, header: torch.Tensor) -> tuple[Frame, list[Work]]:
        meta, specs = decode_header(header.cpu())
        arrivals = [self.arriving(shape, dtype) for dtype, shape in specs]
        works = [_started(dist.irecv(buffer, self.peer, group=self.group)) for _, buffer in arrivals]
        return Frame(meta, [tensor for tensor, _ in arrivals]), works

    def deliver(self, frame: Frame) -> bool:
        """Decode an arrived frame into the inbox (room is there: only the courier fills it); True at the end."""
        wire = self.wire_dtype
        if wire is not None and not self.keep_wire_dtype:
            frame.tensors = [t.float() if t.dtype == wire else t for t in frame.tensors]
        if self.stream is not None:
            frame.ready = torch.cuda.Event()
            frame.ready.record(self.stream)
        # Decoded here, off the consumer's path; a packet that does not fit ends the courier.
        frame.message = self.codec.decode(frame)
        self.queue.put_nowait(frame)
        return self.codec.closes(frame.message)

    def _on_error(self, err: BaseException) -> None:
        self.error = err
        with self.queue.mutex:  # past the bound if need be: the consumer reaches the cause after the frames
            self.queue.queue.append(_Failed(err))
            self.queue.unfinished_tasks += 1
            self.queue.not_empty.notify()


class Work(Protocol):
    """What torch.distributed's isend/irecv return."""

    def is_completed(self) -> bool: ...

    def wait(self, timeout: datetime.timedelta = ...) -> bool: ...


def _started(work: Work | None) -> Work:
    assert work is not None, "isend/irecv returned no work handle"
    return work


@dataclass
class _Pending:
    """Works in flight on one link and when they must have completed."""

    works: list[Work]
    deadline: float
    peer: int
    what: str  # for the failure line: "sending to rank 2" / "receiving from rank 0"
    header: torch.Tensor | None = None  # a receive: the header still to be read
    frame: Frame | None = None  # a receive: the frame whose tensors arrive
    buffers: list[torch.Tensor] = field(default_factory=list)  # a send: held until its works complete


class Courier:
    """This rank's one communication thread: it receives on link k-1 -> k and sends on link k -> k+1.

    One thread issues every point-to-point call of the rank, so no two threads ever drive two
    communicators at once (PyTorch asks for explicit ordering there; NCCL can hang without it).
    Each call is asynchronous (isend / irecv) and waited on with the deadline ``timeout_s``:
    - NCCL (``poll``): the host polls ``is_completed`` of the works of both links, so a send and
      a receive are in flight together; a work still pending at its deadline raises StageFailure
      naming the peer, on the host, instead of a CUDA sync that a dead peer never releases.
    - gloo: its asynchronous p2p completes only inside ``wait``, and a timed-out wait breaks the
      group, so the courier waits on one link at a time with ``wait(timeout)``: a queued send
      first, else a receive while the inbox has room. It cannot deadlock: a wait on link k -> k+1
      depends on rank k+1 only, whose courier blocks on k+2 or on k itself; the chain of messages
      0 -> 1 -> ... -> K-1 has no cycle, and the last rank only receives (docs/design.md).
    """

    IDLE_S = 0.05  # how long an idle courier sleeps before looking again (it is woken sooner)
    POLL_S = 0.0002  # NCCL: the pause between two polls of pending works

    def __init__(self, inbound: Receiver | None, outbound: Sender | None, poll: bool | None = None) -> None:
        assert inbound is not None or outbound is not None
        self.inbound, self.outbound = inbound, outbound
        some = inbound if inbound is not None else outbound
        assert some is not None
        self.rank, self.device, self.timeout_s = some.rank, some.device, some.timeout_s
        if poll is None:
            poll = some.device.type == "cuda" or dist.get_backend(some.group) == "nccl"
        self.poll = poll
        self.wake = threading.Event()
        self.drained = threading.Event()  # the outbound link is closed and everything on it was sent
        self.error: BaseException | None = None
        for link in (inbound, outbound):
            if link is not None:
                link.courier = self
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"Courier-{self.rank}")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # a new thread starts on GPU 0: no stray context there
            self._loop()
        except BaseException as err:  # noqa: BLE001 -- any failure must reach the stage, never die silently
            self.error = err
            for link in (self.inbound, self.outbound):
                if link is not None:
                    link._on_error(err)
            self.drained.set()  # a close() waiting for the last sends raises the error now, not at its deadline

    def _loop(self) -> None:
        receiving, sending = self.inbound is not None, self.outbound is not None
        if not sending:
            self.drained.set()
        incoming: _Pending | None = None
        outgoing: _Pending | None = None
        while receiving or sending or incoming or outgoing:
            self.wake.clear()
            if sending and outgoing is None:
                outgoing, sending = self._next_send()
            # gloo waits on one link at a time: a receive is posted only while nothing is to be sent.
            if receiving and incoming is None and (self.poll or outgoing is None):
                incoming = self._post_receive()
            if outgoing is None and incoming is None:
                if sending or receiving:
                    self.wake.wait(self.IDLE_S)  # nothing queued to send, no room in the inbox
                continue
            if self.poll:
                outgoing, incoming, receiving = self._poll(outgoing, incoming, receiving)
            elif outgoing is not None:
                self._wait(outgoing)
                outgoing = None
            elif incoming is not None:
                self._wait(incoming)
                incoming, receiving = self._arrived(incoming, receiving)

    def _next_send(self) -> tuple[_Pending | None, bool]:
        link = self.outbound
        assert link is not None
        try:
            frame = link.queue.get_nowait()
        except queue.Empty:
            return None, True
        if not isinstance(frame, Frame):  # close(): everything before it has been sent
            self.drained.set()
            return None, False
        with self._on(link):
            header = link.header(frame)  # first: it needs no data, so no wait for compute
            if link.stream is not None and frame.ready is not None:
                link.stream.wait_event(frame.ready)  # the tensors: on the device only, the host goes on
            buffers, works = link.post(frame, header)
        return _Pending(works, time.perf_counter() + link.timeout_s, link.peer, f"sending to rank {link.peer}",
                        buffers=buffers), True

    def _post_receive(self) -> _Pending | None:
        link = self.inbound
        assert link is not None
        if link.queue.full():
            return None
        with self._on(link):
            header, works = link.post_header()
        return _Pending(works, time.perf_counter() + link.timeout_s, link.peer, f"receiving from rank {link.peer}",
                        header=header)

    def _arrived(self, incoming: _Pending, receiving: bool) -> tuple[_Pending | None, bool]:
        """A receive's works completed: post the tensors after a header, or deliver the frame."""
        link = self.inbound
        assert link is not None
        with self._on(link):
            if self.poll:  # NCCL: the receive stream waits for the transfer (no host wait: it is complete)
                for work in incoming.works:
                    work.wait()  # never twice on gloo: a second wait there waits for another message
            if incoming.header is not None:
                frame, works = link.post_tensors(incoming.header)
                if works:
                    return _Pending(works, time.perf_counter() + link.timeout_s, link.peer, incoming.what,
                                    frame=frame), receiving
            else:
                assert incoming.frame is not None
                frame = incoming.frame
            return None, not link.deliver(frame)

    def _poll(self, outgoing: _Pending | None, incoming: _Pending | None,
              receiving: bool) -> tuple[_Pending | None, _Pending | None, bool]:
        progressed = False
        if outgoing is not None and all(work.is_completed() for work in outgoing.works):
            # NCCL reports a failed work as completed too: wait() raises its error (no host wait: done)
            assert self.outbound is not None
            with self._on(self.outbound):
                for work in outgoing.works:
                    work.wait()
            outgoing, progressed = None, True
        if incoming is not None and all(work.is_completed() for work in incoming.works):
            incoming, receiving = self._arrived(incoming, receiving)
            progressed = True
        if not progressed:
            now = time.perf_counter()
            for pending in (outgoing, incoming):
                if pending is not None and now >= pending.deadline:
                    raise StuckPeer(self._late(pending), pending.peer)
            time.sleep(self.POLL_S)
        return outgoing, incoming, receiving

    def _wait(self, pending: _Pending) -> None:
        for work in pending.works:
            left = max(pending.deadline - time.perf_counter(), 0.001)
            try:
                work.wait(timeout=datetime.timedelta(seconds=left))
            except RuntimeError as err:
                if "timed out" in str(err).lower() or time.perf_counter() >= pending.deadline:
                    raise StuckPeer(f"{self._late(pending)} ({describe(err)})", pending.peer) from err
                # Failed before its deadline: the peer's end of the connection went (reset or closed).
                # Not a StuckPeer: the peer may be writing its own error line, and must not be killed.
                raise StageFailure(f"rank {pending.peer} closed the connection: its process ended (its own "
                                   f"line says why)") from err

    def _late(self, pending: _Pending) -> str:
        return (f"rank {self.rank}: {pending.what} did not complete within {self.timeout_s:.0f} s "
                f"(pipeline.timeout_s); it is stuck or dead")

    def _on(self, link: Link) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(link.stream) if link.stream is not None else contextlib.nullcontext()


def describe(err: BaseException) -> str:
    """An exception as one line: the first line of its text, after its type unless it is ours (it says what failed)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(err, StageFailure) else f"{type(err).__name__}: {line}"
