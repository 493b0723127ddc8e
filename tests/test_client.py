"""The client's timed waits (chords_mq.client.within): a cancellation is never lost."""

from __future__ import annotations

import asyncio

import pytest

from chords_mq.client import within


async def test_a_cancel_that_lands_as_the_value_arrives_still_cancels():
    """A message put on the queue in the same loop turn as the cancel (a hit arriving as the
    user presses Ctrl-C): the waiter must end cancelled, not carry on with the message.
    ``asyncio.wait_for`` before Python 3.12 returns the message and drops the cancel."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    waiter = asyncio.create_task(within(queue.get(), 10.0))
    await asyncio.sleep(0)  # it waits on the queue now
    queue.put_nowait("hit")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_value_within_the_timeout_is_returned_and_none_times_out():
    queue: asyncio.Queue[str] = asyncio.Queue()
    queue.put_nowait("hit")
    assert await within(queue.get(), 1.0) == "hit"
    with pytest.raises(asyncio.TimeoutError):
        await within(queue.get(), 0.01)
    queue.put_nowait("later")
    assert await within(queue.get(), None) == "later"  # the timed-out get took nothing
