"""The replay buffer's rule without processes: priority-LIFO, overwriting, the reuse limit, controls."""

from __future__ import annotations

import itertools
import random

import pytest

from pipeline.runtime.replay_buffer import ReplayBuffer, Taken


def take_entry(buffer: ReplayBuffer[str, str]) -> tuple[int, int]:
    taken = buffer.take()
    assert isinstance(taken, Taken), f"expected a batch, got {taken!r}"
    return taken.entry, taken.use


def test_freshest_first_then_least_used() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=3)
    for entry in (1, 2, 3):
        buffer.put(entry, f"b{entry}")
    taken = buffer.take()
    assert taken == Taken(3, 1, "b3")  # unused, freshest
    assert [take_entry(buffer) for _ in range(5)] == [(2, 1), (1, 1), (3, 2), (2, 2), (1, 2)]
    buffer.put(4, "b4")  # a new batch is the least used: it goes next
    assert take_entry(buffer) == (4, 1)


def test_a_full_buffer_overwrites_the_oldest() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=2)
    for entry in (1, 2, 3):
        buffer.put(entry, f"b{entry}")
    assert len(buffer) == 2
    assert [take_entry(buffer) for _ in range(4)] == [(3, 1), (2, 1), (3, 2), (2, 2)]  # batch 1 is gone


def test_the_reuse_limit_drops_a_spent_batch_and_then_waits() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=4, max_reuse=2)
    buffer.put(1, "b1")
    buffer.put(2, "b2")
    assert [take_entry(buffer) for _ in range(4)] == [(2, 1), (1, 1), (2, 2), (1, 2)]
    assert buffer.take() is None and len(buffer) == 0  # every batch spent: the consumer waits
    buffer.put(3, "b3")
    assert take_entry(buffer) == (3, 1)


def test_unlimited_reuse_never_waits_once_a_batch_is_there() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=1)
    buffer.put(7, "b7")
    assert [take_entry(buffer) for _ in range(50)] == [(7, use) for use in range(1, 51)]


def test_a_control_goes_first_and_later_data_wait_behind_it() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=4)
    buffer.put(1, "b1")
    buffer.put_control("end 1", pauses=False)
    buffer.put(2, "b2")  # arrived after the epoch end: not trainable before it is taken
    assert buffer.take() == "end 1"
    assert [take_entry(buffer) for _ in range(2)] == [(2, 1), (1, 1)]


def test_a_pausing_control_holds_training_until_one_that_does_not() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=4)
    buffer.put(1, "b1")
    buffer.put_control("eval a", pauses=True)
    assert buffer.take() == "eval a"
    assert buffer.take() is None  # evaluating: the weights must not move between test batches
    buffer.put_control("eval b", pauses=True)
    buffer.put(2, "b2")
    buffer.put_control("end", pauses=False)
    assert [buffer.take(), buffer.take()] == ["eval b", "end"]
    assert take_entry(buffer) == (2, 1)


def test_a_batch_id_is_unique_on_its_link() -> None:
    buffer: ReplayBuffer[str, str] = ReplayBuffer(capacity=4)
    buffer.put(1, "b1")
    with pytest.raises(ValueError, match="arrived twice"):
        buffer.put(1, "again")


@pytest.mark.parametrize("capacity, max_reuse", list(itertools.product((1, 2, 5), (0, 1, 3))))
def test_random_streams_follow_the_rule(capacity: int, max_reuse: int) -> None:
    """Against a direct statement of the rule, on seeded streams of puts, controls and takes."""
    rng = random.Random(capacity * 10 + max_reuse)
    buffer: ReplayBuffer[int, str] = ReplayBuffer(capacity, max_reuse)
    present: dict[int, int] = {}  # entry -> uses, in arrival order
    behind: list[tuple[str, int]] = []  # what waits behind an untaken control
    paused, entry = False, 0
    for _ in range(400):
        roll = rng.random()
        if roll < 0.4:
            entry += 1
            buffer.put(entry, entry)
            behind.append(("data", entry)) if behind else present.__setitem__(entry, 0)
            while len(present) > capacity:
                del present[next(iter(present))]
        elif roll < 0.5:
            pauses = rng.random() < 0.5
            buffer.put_control(f"c{entry}{pauses}", pauses)
            behind.append(("pause" if pauses else "go", entry))
        else:
            taken = buffer.take()
            if behind:
                kind, _ = behind.pop(0)
                assert isinstance(taken, str) and not isinstance(taken, Taken)
                paused = kind == "pause"
                while behind and behind[0][0] == "data":
                    present[behind.pop(0)[1]] = 0
                    while len(present) > capacity:
                        del present[next(iter(present))]
                continue
            usable = {e: u for e, u in present.items() if not max_reuse or u < max_reuse}
            if paused or not usable:
                assert taken is None
                continue
            fewest = min(usable.values())
            expected = max(e for e, u in usable.items() if u == fewest)
            assert isinstance(taken, Taken) and taken.entry == expected == taken.item
            present[expected] += 1
            assert taken.use == present[expected]
            if max_reuse and present[expected] >= max_reuse:
                del present[expected]
        assert len(buffer) == len(present) <= capacity
