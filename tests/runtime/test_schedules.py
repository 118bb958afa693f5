"""Schedules as plain lists, without processes or tensors: lockstep, buffered (priority-LIFO), seeded."""

from __future__ import annotations

from pipeline.runtime.run_order import Position, RunLength
from pipeline.runtime.schedules import (
    Ended,
    Schedule,
    Step,
    Trained,
    buffered_schedule,
    lockstep_schedule,
    seeded_schedule,
)


def trained(schedule: Schedule, module: int) -> list[tuple[int, int]]:
    return [(step.entry, step.use) for step in schedule[module] if isinstance(step, Trained)]


def test_lockstep_trains_every_module_on_every_batch_once_in_order() -> None:
    schedule = lockstep_schedule(Position(), RunLength(epochs=2, batches=2, max_steps=3), 3)
    expected = [Trained(1, 1), Trained(2, 1), Ended(1), Trained(3, 1), Ended(2)]  # max_steps ends epoch 2 early
    assert schedule == [expected] * 3


def test_a_resumed_lockstep_schedule_starts_at_its_position() -> None:
    schedule = lockstep_schedule(Position(epoch=2, batch=1, step=4), RunLength(2, 3, 0), 2)
    assert schedule == [[Trained(5, 1), Trained(6, 1), Ended(2)]] * 2


def test_a_module_twice_as_fast_uses_each_batch_twice_freshest_first() -> None:
    schedule = buffered_schedule(Position(), RunLength(1, 4, 0), 2, capacity=3, max_reuse=0,
                                 step_time=lambda module: [1.0, 0.5][module])
    assert trained(schedule, 0) == [(1, 1), (2, 1), (3, 1), (4, 1)]
    # Batch 4 arrives with the final epoch end: the control goes first, and nothing trains after it.
    assert trained(schedule, 1) == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert [step for step in schedule[1] if isinstance(step, Ended)] == [Ended(1)]


def test_a_module_twice_as_slow_skips_to_the_freshest_batch() -> None:
    schedule = buffered_schedule(Position(), RunLength(1, 6, 0), 2, capacity=3, max_reuse=0,
                                 step_time=lambda module: [1.0, 2.0][module])
    assert trained(schedule, 1) == [(1, 1), (3, 1), (5, 1)]


def test_a_small_buffer_forgets_and_the_reuse_limit_holds() -> None:
    """Module 1 is four times as slow: with room for one batch it only sees the newest."""
    schedule = buffered_schedule(Position(), RunLength(1, 12, 0), 3, capacity=1, max_reuse=1,
                                 step_time=lambda module: [1.0, 4.0, 0.25][module])
    assert trained(schedule, 1) == [(1, 1), (5, 1), (9, 1)]
    assert all(use == 1 for module in (1, 2) for _, use in trained(schedule, module))
    assert [entry for entry, _ in trained(schedule, 2)] == [1, 2]  # module 1's own steps, each once


def ends_at(plan: list[Step]) -> list[tuple[int, int]]:
    """At each epoch end: (the module's own steps so far, the newest batch it has trained on)."""
    steps, newest, found = 0, 0, []
    for step in plan:
        if isinstance(step, Ended):
            found.append((steps, newest))
        else:
            steps, newest = steps + 1, max(newest, step.entry)
    return found


def test_epoch_ends_keep_their_place_among_the_batches() -> None:
    """Before an epoch end a module trains only on batches its upstream sent before that epoch end,
    every module takes every epoch end, and nothing trains after the final one."""
    schedule = buffered_schedule(Position(), RunLength(3, 4, 0), 3, capacity=2, max_reuse=0,
                                 step_time=lambda module: [1.0, 0.3, 1.7][module])
    for module, plan in enumerate(schedule):
        assert [step for step in plan if isinstance(step, Ended)] == [Ended(1), Ended(2), Ended(3)]
        assert isinstance(plan[-1], Ended)
        if module:
            sent = [steps for steps, _ in ends_at(schedule[module - 1])]
            newest = [entry for _, entry in ends_at(plan)]
            assert all(entry <= upstream for entry, upstream in zip(newest, sent))
    uses: dict[tuple[int, int], int] = {}
    for module, plan in enumerate(schedule):
        for step in plan:
            if isinstance(step, Trained):
                uses[module, step.entry] = uses.get((module, step.entry), 0) + 1
                assert step.use == uses[module, step.entry]  # counted one by one
    assert max(uses[1, entry] for entry in range(1, 12)) > 1  # the fast module reuses


def test_the_seeded_order_depends_only_on_its_seed() -> None:
    def seeded(seed: int) -> Schedule:
        return seeded_schedule(Position(), RunLength(2, 30, 0), 3, [1.0, 1.5, 1.0], capacity=4, max_reuse=0,
                               seed=seed)

    assert seeded(1) == seeded(1)
    assert seeded(1) != seeded(2)
    assert trained(seeded(1), 0) == [(step, 1) for step in range(1, 61)]  # the data's order, whatever the speeds


def test_no_slowdown_means_equal_speeds() -> None:
    assert seeded_schedule(Position(), RunLength(1, 20, 0), 2, [], 4, 0, seed=5) == \
        seeded_schedule(Position(), RunLength(1, 20, 0), 2, [1.0, 1.0], 4, 0, seed=5)
