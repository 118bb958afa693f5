"""The wire: the header round trip, and real and polled links (one courier per rank, deadlines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.errors import StageFailure
from pipeline.runtime.transport import (
    META_LEN,
    Courier,
    Frame,
    Receiver,
    Sender,
    decode_header,
    encode_header,
    header_length,
)


def _specs(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(tensor.dtype, tuple(tensor.shape)) for tensor in tensors]


def test_header_round_trip_for_mixed_tensors() -> None:
    tensors = [
        torch.zeros(7, dtype=torch.int64),  # labels of a partial batch
        torch.zeros(7, 16, 32, 32),
        torch.zeros(7, 1, 32, 32, dtype=torch.bfloat16),
        torch.zeros(7, 32, 16, 16, dtype=torch.float16),
    ]
    header = encode_header((2, 5), _specs(tensors), max_tensors=6)
    assert header.dtype == torch.int64 and header.shape == (header_length(6),)
    meta, specs = decode_header(header)
    assert meta == (2, 5) + (0,) * (META_LEN - 2)
    assert specs == [(t.dtype, tuple(t.shape)) for t in tensors]


def test_a_frame_without_tensors_keeps_its_integers() -> None:
    meta, specs = decode_header(encode_header((3, 1, 2, 0, 17, 1), _specs([]), max_tensors=2))
    assert meta == (3, 1, 2, 0, 17, 1) and specs == []


def test_unsendable_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 2 tensors"):
        encode_header((1,), _specs([torch.zeros(1)] * 3), max_tensors=2)
    with pytest.raises(ValueError, match="at most"):
        encode_header(tuple(range(META_LEN + 1)), _specs([]), max_tensors=2)
    with pytest.raises(ValueError, match="cannot send"):
        encode_header((1,), _specs([torch.zeros(1, 1, 1, 1, 1)]), max_tensors=2)
    with pytest.raises(ValueError, match="cannot send"):
        encode_header((1,), _specs([torch.zeros(2, dtype=torch.float64)]), max_tensors=2)


@pytest.mark.parametrize("slot, value", [(META_LEN, 99), (META_LEN + 1, 42), (META_LEN + 2, 9)])
def test_corrupt_headers_are_a_stage_failure(slot: int, value: int) -> None:
    header = encode_header((1,), _specs([torch.zeros(3, 2)]), max_tensors=2)
    header[slot] = value  # tensor count, dtype id, number of dims
    with pytest.raises(StageFailure, match="corrupt message header"):
        decode_header(header)


# Real links under gloo: processes started by torch.multiprocessing, each writing what it saw to a file.
_SCRIPT = r'''
import datetime, json, os, sys, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
from pipeline.runtime.transport import Courier, Frame, Receiver, Sender

class Codec:  # frames pass as they are: the message is the frame's integers and tensors
    max_tensors = 2
    def encode(self, message): return Frame(message[0], list(message[1]))
    def decode(self, frame): return (frame.meta, frame.tensors)
    def closes(self, message): return message[0][0] == 4

def main(rank, world, scenario, out, timeout_s):
    dist.init_process_group("gloo", init_method="file://" + out + "/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    groups = [dist.new_group([k, k + 1]) for k in range(world - 1)]
    cpu, codec, result = torch.device("cpu"), Codec(), {}
    inbox = Receiver(rank, rank - 1, groups[rank - 1], codec, cpu, 2, timeout_s) if rank > 0 else None
    outbox = Sender(rank, rank + 1, groups[rank], codec, cpu, 2, timeout_s) if rank < world - 1 else None
    if scenario == "silent":  # rank 0 stays alive and never sends, until rank 1 has written what it saw
        if rank == 0:
            deadline = time.monotonic() + timeout_s + 4
            while not os.path.exists(f"{out}/rank_1.done") and time.monotonic() < deadline:
                time.sleep(0.05)
            os._exit(0)
        started = time.monotonic()
        Courier(inbox, None).start()
        inbox.thread.join(timeout_s + 3)
        result = {"alive": inbox.thread.is_alive(), "error": repr(inbox.error), "s": time.monotonic() - started}
        try:
            inbox.get()
        except Exception as err:
            result["get"] = str(err)
    else:  # a chain: rank 0 sends 20 frames, the middle ranks pass them on with one courier each
        Courier(inbox, outbox).start()
        seen = []
        for step in range(21):
            meta, tensors = ((1, step), [torch.full((step + 1, 3), float(step)), torch.arange(step)]) \
                if rank == 0 else inbox.get()
            if step == 20 and rank == 0:
                meta, tensors = (4,), []
            seen.append([list(meta), [t.tolist() for t in tensors]])
            if outbox is not None:
                outbox.put((meta, tensors))
        if outbox is not None:
            outbox.close()
        result = {"seen": seen}
    with open(f"{out}/rank_{rank}.json", "w") as handle:
        json.dump(result, handle)
    open(f"{out}/rank_{rank}.done", "w").close()
    os._exit(0)

if __name__ == "__main__":
    world, scenario, out, timeout_s = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    mp.spawn(main, args=(world, scenario, out, timeout_s), nprocs=world)
'''


def _spawn(tmp_path: Path, world: int, scenario: str, timeout_s: float) -> list[dict[str, Any]]:
    script = tmp_path / "links.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(world), scenario, str(tmp_path), str(timeout_s)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in range(1, world)]


@pytest.mark.slow
def test_one_courier_per_rank_passes_frames_down_a_chain(tmp_path: Path) -> None:
    """Rank 1 receives from 0 and sends to 2 from one thread: every frame arrives whole, in order."""
    middle, last = _spawn(tmp_path, 3, "chain", 30.0)
    expected = [[[1, step, 0, 0, 0, 0], [[[float(step)] * 3] * (step + 1), list(range(step))]] for step in range(20)]
    assert middle["seen"][:20] == expected and last["seen"][:20] == expected
    assert last["seen"][20][0] == [4, 0, 0, 0, 0, 0]


@pytest.mark.slow
def test_a_receiver_whose_peer_never_sends_fails_at_the_deadline(tmp_path: Path) -> None:
    """gloo: the courier waits on its irecv with wait(timeout) and fails naming the peer, in time."""
    (receiver,) = _spawn(tmp_path, 2, "silent", 2.0)
    assert not receiver["alive"] and receiver["s"] < 2.0 + 3
    assert "StuckPeer" in receiver["error"] and "receiving from rank 0 did not complete within 2 s" in \
        receiver["error"]
    assert "rank 0" in receiver["get"]


class _BrokenWork:
    """A gloo work whose peer's process ended: wait fails at once, long before its deadline."""

    def wait(self, timeout: Any = None) -> bool:
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41234: "
                           "Connection reset by peer")


@pytest.mark.parametrize("direction", ["send", "receive"])
def test_a_peer_whose_process_ended_is_named_at_once_not_called_a_timeout(
        monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    """gloo reports a killed peer as a reset connection: one short line says the peer closed it."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "isend", lambda *args, **kwargs: _BrokenWork())
    monkeypatch.setattr(dist, "irecv", lambda *args, **kwargs: _BrokenWork())
    cpu, started = torch.device("cpu"), time.monotonic()
    with pytest.raises(StageFailure) as caught:
        if direction == "send":
            outbox = Sender(0, 1, "01", _PassCodec(), cpu, 2, 300.0)  # type: ignore[arg-type]
            Courier(None, outbox, poll=False).start()  # gloo's path: wait(timeout) on each work
            outbox.put(((1, 0), [torch.zeros(2)]))
            outbox.close()
        else:
            inbox = Receiver(1, 0, "01", _PassCodec(), cpu, 2, 300.0)  # type: ignore[arg-type]
            Courier(inbox, None, poll=False).start()
            inbox.get()
    assert time.monotonic() - started < 10
    what = "sending to rank 1" if direction == "send" else "receiving from rank 0"
    peer = 1 if direction == "send" else 0
    rank = 1 - peer
    assert str(caught.value) == (f"rank {rank}: {what} failed: rank {peer} closed the connection: its process "
                                 f"ended (its own line says why)")


class _FakeWork:
    """A work handle as NCCL gives it: is_completed polls, wait only orders streams."""

    def __init__(self, done: Any) -> None:
        self.done = done

    def is_completed(self) -> bool:
        return bool(self.done())

    def wait(self, timeout: Any = None) -> bool:
        return True


def _fake_nccl(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """isend / irecv over in-process FIFOs, one per group; an irecv completes once its data is there."""
    import collections

    import torch.distributed as dist

    channels: dict[str, Any] = collections.defaultdict(collections.deque)

    def isend(tensor: torch.Tensor, dst: int, group: str) -> _FakeWork:
        channels[group].append(tensor.clone())
        return _FakeWork(lambda: True)

    def irecv(tensor: torch.Tensor, src: int, group: str) -> _FakeWork:
        filled: list[bool] = []

        def done() -> bool:
            if not filled and channels[group]:
                tensor.copy_(channels[group].popleft())
                filled.append(True)
            return bool(filled)
        return _FakeWork(done)

    monkeypatch.setattr(dist, "isend", isend)
    monkeypatch.setattr(dist, "irecv", irecv)
    return channels


class _PassCodec:
    max_tensors = 2

    def encode(self, message: Any) -> Frame:
        return Frame(message[0], list(message[1]))

    def decode(self, frame: Frame) -> Any:
        return (frame.meta, frame.tensors)

    def closes(self, message: Any) -> bool:
        return bool(message[0][0] == 4)


def test_polling_couriers_pass_a_chain_with_both_links_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NCCL path (poll is_completed) on fake works: three ranks, the middle one with one courier."""
    _fake_nccl(monkeypatch)
    cpu, codec = torch.device("cpu"), _PassCodec()
    first = Sender(0, 1, "01", codec, cpu, 2, 10.0)  # type: ignore[arg-type]
    middle_in, middle_out = Receiver(1, 0, "01", codec, cpu, 2, 10.0), Sender(1, 2, "12", codec, cpu, 2, 10.0)  # type: ignore[arg-type]
    last = Receiver(2, 1, "12", codec, cpu, 2, 10.0)  # type: ignore[arg-type]
    for courier in (Courier(None, first, poll=True), Courier(middle_in, middle_out, poll=True),
                    Courier(last, None, poll=True)):
        courier.start()
    messages = [((1, step), [torch.full((step + 1,), float(step))]) for step in range(10)] + [((4,), [])]
    for message in messages:
        first.put(message)
        meta, tensors = middle_in.get()
        middle_out.put((meta, tensors))
    first.close()
    middle_out.close()
    arrived = [last.get() for _ in messages]
    assert [meta[:2] for meta, _ in arrived[:-1]] == [(1, step) for step in range(10)]
    assert all(torch.equal(tensors[0], sent[1][0]) for (_, tensors), sent in zip(arrived[:-1], messages))
    assert arrived[-1][0][0] == 4
    middle_in.thread.join(5)
    assert not middle_in.thread.is_alive() and middle_in.error is None


def test_a_polled_receive_that_never_completes_fails_on_the_host_at_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL path: a dead peer leaves the irecv pending; the courier raises naming it, without waiting on it."""
    _fake_nccl(monkeypatch)
    inbox = Receiver(3, 2, "23", _PassCodec(), torch.device("cpu"), 2, 0.5)  # type: ignore[arg-type]
    Courier(inbox, None, poll=True).start()
    started = time.monotonic()
    with pytest.raises(StageFailure, match="receiving from rank 2|no message from rank 2"):
        inbox.get()
    inbox.thread.join(2)
    assert not inbox.thread.is_alive() and time.monotonic() - started < 2
    assert isinstance(inbox.error, StageFailure) and "did not complete within" in str(inbox.error)


def test_a_failed_send_reaches_put_and_close_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("Connection reset by peer")
    monkeypatch.setattr(dist, "isend", broken)
    outbox = Sender(0, 1, "01", _PassCodec(), torch.device("cpu"), 2, 30.0)  # type: ignore[arg-type]
    Courier(None, outbox, poll=True).start()
    started = time.monotonic()
    outbox.put(((1, 0), [torch.zeros(2)]))
    with pytest.raises(StageFailure, match="sending to rank 1 failed: RuntimeError: Connection reset by peer"):
        for _ in range(100):
            outbox.put(((1, 0), [torch.zeros(2)]))
            time.sleep(0.01)
        outbox.close()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("wire_dtype", [None, torch.bfloat16])
def test_channels_last_tensors_cross_a_link_without_a_layout_copy(monkeypatch: pytest.MonkeyPatch,
                                                                  wire_dtype: torch.dtype | None) -> None:
    """With precision.channels_last both ends keep the modules' layout: the sender posts the output's
    own storage (fp32 wire), the receiver fills channels_last buffers; other tensors stay as they are."""
    _fake_nccl(monkeypatch)
    cpu = torch.device("cpu")
    sender = Sender(0, 1, "01", _PassCodec(), cpu, 2, 10.0, wire_dtype, channels_last=True)  # type: ignore[arg-type]
    receiver = Receiver(1, 0, "01", _PassCodec(), cpu, 2, 10.0, wire_dtype, channels_last=True)  # type: ignore[arg-type]
    features = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(4)
    frame = Frame((1,), [labels, features])
    buffers, works = sender.post(frame, sender.header(frame))
    buffers = buffers[:len(works)]  # what was sent; the frame's own tensors follow
    assert all(buffer.is_contiguous() for buffer in buffers)  # what gloo sends
    assert buffers[2].shape == (4, 5, 5, 8)  # the channels_last storage as NHWC
    if wire_dtype is None:
        assert buffers[2].data_ptr() == features.data_ptr()  # sent as it is, no copy
    header, works = receiver.post_header()
    assert [work.is_completed() for work in works] == [True]
    frame, works = receiver.post_tensors(header)
    assert [work.is_completed() for work in works] == [True, True]
    assert frame.tensors[1].is_contiguous(memory_format=torch.channels_last)
    receiver.deliver(frame)
    (_, arrived) = receiver.queue.get_nowait().message  # type: ignore[union-attr]
    assert torch.equal(arrived[0], labels) and arrived[1].dtype == torch.float32
    assert arrived[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(arrived[1], features if wire_dtype is None else features.to(wire_dtype).float())


class _LoggedStream:
    """A link stream that records when it is made to wait for the producer's kernels."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def wait_event(self, event: Any) -> None:
        self.calls.append("stream waits for compute")


def test_the_header_is_sent_before_the_courier_waits_on_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU order of calls, on fake works: the header (shapes only) is built and uploaded before the link
    stream waits for the producer's event, and the sends are posted after it; the bf16 wire is in the
    header from the shapes alone."""
    import contextlib

    import torch.distributed as dist

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(dist, "isend", lambda tensor, dst, group: calls.append(f"isend {tensor.dtype}")
                        or _FakeWork(lambda: True))
    outbox = Sender(0, 1, "01", _PassCodec(), torch.device("cpu"), 2, 10.0, torch.bfloat16)  # type: ignore[arg-type]
    outbox.stream = _LoggedStream(calls)  # type: ignore[assignment]
    made = outbox.header

    def header(frame: Frame) -> torch.Tensor:
        calls.append("header")
        return made(frame)
    monkeypatch.setattr(outbox, "header", header)
    courier = Courier(None, outbox, poll=True)
    courier.start()
    outbox._enqueue(Frame((1, 0), [torch.ones(3, 2)], ready=object()))  # type: ignore[arg-type]
    outbox.close()
    courier.thread.join(5)
    assert calls == ["header", "stream waits for compute", "isend torch.int64", "isend torch.bfloat16"]
    assert courier.error is None


def test_a_polled_send_that_completed_with_an_error_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL's is_completed() is true for a failed work too: the courier waits on completed sends, so
    their error reaches close() naming the peer instead of the frame being dropped as sent."""
    import torch.distributed as dist

    class _Failed(_FakeWork):
        def wait(self, timeout: Any = None) -> bool:
            raise RuntimeError("NCCL communicator was aborted on rank 0")

    monkeypatch.setattr(dist, "isend", lambda tensor, dst, group: _Failed(lambda: True))
    outbox = Sender(0, 1, "01", _PassCodec(), torch.device("cpu"), 2, 30.0)  # type: ignore[arg-type]
    Courier(None, outbox, poll=True).start()
    outbox.put(((1, 0), [torch.zeros(2)]))
    with pytest.raises(StageFailure, match="sending to rank 1 failed: RuntimeError: NCCL communicator was aborted"):
        outbox.close()


def test_a_frame_s_tensors_live_until_its_send_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bf16 wire the sent buffers are copies made on the link stream: the frame's own tensors
    must stay referenced until the send completes, or the compute stream could reuse their memory
    before the copy read it. A weak reference shows when the courier lets go of them."""
    import gc
    import weakref

    import torch.distributed as dist

    sent = threading.Event()
    monkeypatch.setattr(dist, "isend", lambda tensor, dst, group: _FakeWork(sent.is_set))
    outbox = Sender(0, 1, "01", _PassCodec(), torch.device("cpu"), 2, 30.0, torch.bfloat16)  # type: ignore[arg-type]
    courier = Courier(None, outbox, poll=True)
    courier.start()
    output = torch.ones(4, 3)
    alive = weakref.ref(output)
    outbox.put(((1, 0), [output]))
    del output
    time.sleep(0.2)  # the courier has posted the send, which stays pending
    gc.collect()
    assert alive() is not None
    sent.set()
    outbox.close()
    courier.thread.join(5)
    gc.collect()
    assert alive() is None and courier.error is None


@pytest.mark.parametrize("amp, arrives_as", [("none", torch.float32), ("bf16", torch.bfloat16)])
def test_a_bf16_wire_stays_bf16_for_a_module_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch, amp: str,
                                                                arrives_as: torch.dtype) -> None:
    """The receiving end run.wire builds restores a bf16 wire to float32 only where the module computes
    in float32; under bf16 autocast the tensor stays as it came (autocast would cast it back)."""
    import pipeline.runtime.assemble as assemble
    from pipeline.config.loading import load_config
    from pipeline.model.network import make_layout
    from pipeline.runtime.topology import Topology

    _fake_nccl(monkeypatch)
    monkeypatch.setattr(assemble, "Courier", lambda inbound, outbound: types.SimpleNamespace(start=lambda: None))
    config = load_config(None, ["data.name=synthetic", "model.arch=resnet8", "local.modules=2",
                                "pipeline.wire_dtype=bf16", f"precision.amp={amp}"])
    from pipeline.data.specs import dataset_spec

    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, [2])
    topology = Topology(1, 2, torch.device("cpu"), 2, 1, (1,), links={0: "01"})  # type: ignore[dict-item]
    inbox, outbox = assemble.wire(config.pipeline, topology, layout, amp=config.precision.amp)
    assert isinstance(inbox, Receiver) and outbox is None
    inbox.codec, inbox.header_length = _PassCodec(), header_length(_PassCodec.max_tensors)  # type: ignore[assignment]
    sender = Sender(0, 1, "01", _PassCodec(), torch.device("cpu"), 2, 10.0, torch.bfloat16)  # type: ignore[arg-type]
    frame = Frame((1,), [torch.arange(4), torch.randn(4, 8, 5, 5)])
    sender.post(frame, sender.header(frame))
    header, works = inbox.post_header()
    assert all(work.is_completed() for work in works)
    arrived, works = inbox.post_tensors(header)
    assert all(work.is_completed() for work in works)
    assert arrived.tensors[1].dtype == torch.bfloat16  # what came over the wire
    inbox.deliver(arrived)
    assert arrived.tensors[1].dtype == arrives_as and arrived.tensors[0].dtype == torch.int64
