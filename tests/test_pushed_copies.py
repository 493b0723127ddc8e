"""The worker's ``PushedCopies`` inbox (issue 25): results other workers pushed here, kept only
for a request this worker prepared and only of its latent's dtype and shape, within a budget
of bytes and copies (the oldest go first), each read once by the EVAL that takes it and freed
by DROP and RELEASE. A reader waiting for a copy on its way gets it from the data server's
thread, and a wait for one that will never be here (refused, evicted, given up, read) ends at
once, so the reader pulls it instead. Every wait is bounded; no test asserts a duration."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.workers.store import PushedCopies, PushRefused, StoreError

SHAPE = (2, 4, 8)  # 64 float32 elements: 256 bytes
BYTES = 256
REQ = "req-1"
LONG_S = 5.0  # a wait that must not run out: its end is a bug's sign, not a timing


def latent(seed: int, dtype: torch.dtype = torch.float32, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def inbox(budget_bytes: int = 16 * BYTES, max_copies: int = 16) -> PushedCopies:
    copies = PushedCopies(budget_bytes, max_copies)
    copies.expect(REQ, torch.float32, SHAPE)
    return copies


def refused(copies: PushedCopies, ref: Ref, tensor: torch.Tensor, request: str = REQ) -> str:
    with pytest.raises(PushRefused) as caught:
        copies.put(request, ref, tensor, None)
    assert isinstance(caught.value, StoreError)
    return caught.value.reason


class Waiter:
    """``take`` on its own thread (the compute thread's wait), joined within a bound."""

    def __init__(self, copies: PushedCopies, ref: Ref, wait_s: float = LONG_S) -> None:
        self.result: tuple[torch.Tensor, str | None] | str | None = "not done"
        self._thread = threading.Thread(target=self._run, args=(copies, ref, wait_s), daemon=True)
        self._thread.start()

    def _run(self, copies: PushedCopies, ref: Ref, wait_s: float) -> None:
        self.result = copies.take(REQ, ref, wait_s)

    def ended(self, within_s: float = LONG_S) -> bool:
        self._thread.join(within_s)
        return not self._thread.is_alive()


def waiting(copies: PushedCopies, ref: Ref) -> Waiter:
    """A reader asleep in ``take`` for ``ref`` (in the condition's wait) before the test goes
    on, so what the test does next is what wakes it."""
    waiter = Waiter(copies, ref)
    pause = threading.Event()
    for _ in range(5000):  # bounded: until the waiter sleeps in the condition's wait
        with copies._cond:
            if copies._cond._waiters:  # type: ignore[attr-defined]
                return waiter
        pause.wait(0.001)
    raise AssertionError("the reader never waited")


# -- what is kept, what is refused ---------------------------------------------------------------


def test_a_copy_is_kept_and_taken_once_with_every_byte_counted():
    copies = inbox()
    tensor = latent(1)
    copies.put(REQ, Ref(3, 7), tensor, "sender-key")
    assert copies.holds(REQ, Ref(3, 7)) and copies.held_bytes == BYTES and copies.kept == 1
    got = copies.take(REQ, Ref(3, 7))
    assert got is not None
    taken, sender = got
    assert taken is tensor and sender == "sender-key"
    assert copies.held_bytes == 0 and copies.used == 1 and not copies.holds(REQ, Ref(3, 7))
    assert copies.take(REQ, Ref(3, 7), LONG_S) is None  # read already: at once, not in 5 s
    assert copies.used == 1


def test_a_copy_for_a_request_not_prepared_here_is_refused_as_unknown():
    copies = inbox()
    assert refused(copies, Ref(1, 2), latent(0), request="other") == "unknown_request"
    assert copies.held_bytes == 0 and copies.kept == 0


def test_a_copy_of_another_dtype_or_shape_is_a_mismatch_and_ends_its_wait():
    copies = inbox()
    assert refused(copies, Ref(1, 2), latent(0, torch.bfloat16)) == "mismatch"
    assert refused(copies, Ref(1, 3), latent(0, shape=(2, 4, 9))) == "mismatch"
    assert copies.held_bytes == 0 and copies.kept == 0
    assert copies.take(REQ, Ref(1, 2), LONG_S) is None  # refused: at once

    waiter = waiting(copies, Ref(4, 4))
    assert refused(copies, Ref(4, 4), latent(0, torch.float64)) == "mismatch"
    assert waiter.ended() and waiter.result is None
    assert refused(copies, Ref(4, 4), latent(0)) == "unwanted"  # its reader pulled it


def test_a_copy_larger_than_the_budget_is_refused_as_no_room_and_ends_its_wait():
    copies = inbox(budget_bytes=BYTES - 1)
    waiter = waiting(copies, Ref(2, 5))
    assert refused(copies, Ref(2, 5), latent(0)) == "no_room"
    assert waiter.ended() and waiter.result is None
    assert copies.held_bytes == 0 and copies.evicted == 0


def test_a_copy_put_again_after_it_was_read_is_refused_as_unwanted():
    copies = inbox()
    copies.put(REQ, Ref(1, 1), latent(1), None)
    assert copies.take(REQ, Ref(1, 1)) is not None
    assert refused(copies, Ref(1, 1), latent(1)) == "unwanted"
    assert copies.held_bytes == 0 and copies.kept == 1


def test_a_copy_put_twice_before_it_is_read_is_counted_once():
    copies = inbox()
    copies.put(REQ, Ref(1, 1), latent(1), None)
    second = latent(2)
    copies.put(REQ, Ref(1, 1), second, None)
    assert copies.held_bytes == BYTES
    got = copies.take(REQ, Ref(1, 1))
    assert got is not None and got[0] is second and copies.held_bytes == 0


# -- the budget: the oldest go first, and their readers pull -------------------------------------


def test_past_the_byte_budget_the_oldest_copies_are_evicted_and_counted():
    copies = inbox(budget_bytes=3 * BYTES)
    for task in range(5):
        copies.put(REQ, Ref(task, 9), latent(task), None)
        assert copies.held_bytes == min(task + 1, 3) * BYTES
    assert copies.evicted == 2 and copies.kept == 5
    held = [copies.holds(REQ, Ref(task, 9)) for task in range(5)]
    assert held == [False, False, True, True, True]
    copies.put(REQ, Ref(9, 9), latent(9), None)
    assert copies.evicted == 3 and copies.held_bytes == 3 * BYTES


def test_past_the_copy_bound_the_oldest_copies_are_evicted():
    copies = inbox(budget_bytes=100 * BYTES, max_copies=2)
    for task in range(4):
        copies.put(REQ, Ref(task, 1), latent(task), None)
    assert copies.evicted == 2 and copies.held_bytes == 2 * BYTES
    assert not copies.holds(REQ, Ref(0, 1)) and not copies.holds(REQ, Ref(1, 1))
    assert copies.holds(REQ, Ref(2, 1)) and copies.holds(REQ, Ref(3, 1))


def test_an_evicted_copy_is_gone_its_take_ends_at_once_and_it_is_not_kept_again():
    """Eviction is a refusal after the fact: the reader must pull at once instead of waiting
    the whole bounded wait for a copy that will never come back, and the same copy pushed
    again (a producer's retry) is not worth its budget any more."""
    copies = inbox(budget_bytes=BYTES)
    copies.put(REQ, Ref(1, 1), latent(1), None)
    copies.put(REQ, Ref(2, 1), latent(2), None)  # evicts 1:1
    assert copies.evicted == 1
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(copies.take(REQ, Ref(1, 1), LONG_S)))
    reader.start()
    reader.join(LONG_S / 2)  # a take still waiting past half its wait would be the bug
    assert not reader.is_alive() and result == [None]
    assert refused(copies, Ref(1, 1), latent(1)) == "unwanted"
    assert copies.holds(REQ, Ref(2, 1)) and copies.held_bytes == BYTES


def test_a_reader_waiting_while_its_copy_lands_and_is_evicted_ends_its_wait_at_once():
    """The copy lands and is pushed out by a newer one before its reader wakes (both puts
    under the inbox's lock): the reader finds it gone and pulls, it does not sleep on."""
    copies = inbox(budget_bytes=BYTES)
    waiter = waiting(copies, Ref(5, 5))
    with copies._cond:  # (reentrant: the puts take it again) the reader wakes after both
        copies.put(REQ, Ref(5, 5), latent(5), None)
        copies.put(REQ, Ref(6, 5), latent(6), None)  # evicts 5:5
    assert waiter.ended(LONG_S / 2) and waiter.result is None
    assert copies.evicted == 1 and copies.held_bytes == BYTES and copies.holds(REQ, Ref(6, 5))


# -- waits across threads ------------------------------------------------------------------------


def test_a_take_waiting_for_a_copy_on_its_way_gets_the_one_put_from_another_thread():
    copies = inbox()
    waiter = waiting(copies, Ref(7, 8))
    tensor = latent(7)
    copies.put(REQ, Ref(7, 8), tensor, "k")
    assert waiter.ended()
    assert isinstance(waiter.result, tuple)
    assert waiter.result[0] is tensor and waiter.result[1] == "k"
    assert copies.held_bytes == 0 and copies.used == 1


def test_a_take_for_a_copy_that_never_comes_ends_within_its_wait():
    copies = inbox()
    assert copies.take(REQ, Ref(1, 1), 0.05) is None
    assert refused(copies, Ref(1, 1), latent(1)) == "unwanted"  # its reader pulled it


def test_give_up_ends_a_waiter_at_once():
    copies = inbox()
    waiter = waiting(copies, Ref(3, 3))
    copies.give_up(REQ, Ref(3, 3))
    assert waiter.ended() and waiter.result is None
    assert refused(copies, Ref(3, 3), latent(3)) == "unwanted"


def test_forget_ends_a_waiter_and_frees_every_byte_of_its_request():
    copies = inbox()
    copies.expect("req-2", torch.float32, SHAPE)
    copies.put(REQ, Ref(1, 1), latent(1), None)
    copies.put(REQ, Ref(2, 1), latent(2), None)
    copies.put("req-2", Ref(1, 1), latent(3), None)
    waiter = waiting(copies, Ref(9, 9))
    assert copies.forget(REQ) == 2 * BYTES
    assert waiter.ended() and waiter.result is None
    assert copies.held_bytes == BYTES and copies.holds("req-2", Ref(1, 1))
    assert refused(copies, Ref(1, 1), latent(1)) == "unknown_request"
    assert copies.forget(REQ) == 0  # twice is harmless


def test_a_request_prepared_again_after_forget_keeps_its_copies_anew():
    """A take after RELEASE remembers nothing of the request: the same request prepared
    again (the broker prepares a worker again after its cache let it go) takes its pushes."""
    copies = inbox()
    copies.put(REQ, Ref(1, 1), latent(1), None)
    assert copies.take(REQ, Ref(1, 1)) is not None
    copies.forget(REQ)
    assert copies.take(REQ, Ref(2, 2), LONG_S) is None  # not prepared: at once
    copies.expect(REQ, torch.float32, SHAPE)
    copies.put(REQ, Ref(1, 1), latent(1), None)
    copies.put(REQ, Ref(2, 2), latent(2), None)
    assert copies.held_bytes == 2 * BYTES


def test_discard_frees_the_dropped_copies_and_refuses_one_still_on_its_way():
    copies = inbox()
    for task in range(3):
        copies.put(REQ, Ref(task, 1), latent(task), None)
    assert copies.discard(REQ, [Ref(0, 1), Ref(2, 1), Ref(8, 1)]) == 2 * BYTES
    assert copies.held_bytes == BYTES and copies.holds(REQ, Ref(1, 1))
    # 8:1 was on its way when the DROP came: it is not held for nothing until RELEASE
    assert refused(copies, Ref(8, 1), latent(8)) == "unwanted"
    assert copies.held_bytes == BYTES
    assert copies.discard("never-prepared", [Ref(1, 1)]) == 0


# -- the bounds on what is remembered ------------------------------------------------------------


def test_at_most_max_requests_are_expected_the_oldest_forgotten():
    copies = PushedCopies(budget_bytes=1 << 30, max_copies=1000)
    count = PushedCopies.MAX_REQUESTS + 2
    for index in range(count):
        copies.expect(f"r{index}", torch.float32, SHAPE)
        copies.put(f"r{index}", Ref(1, 1), latent(index), None)
    assert copies.held_bytes == PushedCopies.MAX_REQUESTS * BYTES
    assert not copies.holds("r0", Ref(1, 1)) and not copies.holds("r1", Ref(1, 1))
    assert refused(copies, Ref(1, 2), latent(0), request="r0") == "unknown_request"
    assert copies.holds(f"r{count - 1}", Ref(1, 1))
    copies.expect("r2", torch.float32, SHAPE)  # expected again: the newest now
    copies.expect("r-new", torch.float32, SHAPE)
    assert copies.holds("r2", Ref(1, 1)) and not copies.holds("r3", Ref(1, 1))


def test_at_most_max_gone_copies_are_remembered():
    copies = inbox()
    for task in range(PushedCopies.MAX_GONE + 10):
        copies.give_up(REQ, Ref(task, 1))
    assert len(copies._gone) == PushedCopies.MAX_GONE
    # the oldest are forgotten (a copy of them is kept again), the newest still refused
    copies.put(REQ, Ref(0, 1), latent(0), None)
    assert refused(copies, Ref(PushedCopies.MAX_GONE + 9, 1), latent(0)) == "unwanted"


@pytest.mark.parametrize(
    "make", [lambda: PushedCopies(-1, 1), lambda: PushedCopies(0, 0)], ids=["bytes", "copies"]
)
def test_a_negative_budget_or_no_copy_at_all_is_refused(make: Callable[[], PushedCopies]):
    with pytest.raises(ValueError):
        make()
