"""The worker's side of a push (issue 25), in process: an EVAL naming an input ``pushed`` reads
the copy from the worker's inbox (``PushedCopies``), one copy feeds every input of the EVAL that
reads it, the wait for it is reported as a fetch of no bytes, and an EVAL that fails on another
input lets go of the copies it will not read (the broker stopped counting them when it sent the
EVAL). A real ``Worker`` and its store; no broker, no sockets (its data client is never used:
nothing is fetched)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    EvalMessage,
    FailedMessage,
    PrepareMessage,
    ResultMessage,
    TaskEntry,
    decode,
    encode,
)
from chords_mq.wire.base import tensor_digest
from chords_mq.wire.named import X0_REF, Holder, NamedInput, NamedRef
from chords_mq.workers.models.synthetic import SyntheticAdapter
from chords_mq.workers.store import PushedCopies
from chords_mq.workers.worker import Worker

PRODUCER = "tcp://127.0.0.2:7000"  # a holder named in the EVAL; never reached


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker("tcp://127.0.0.1:9", SyntheticAdapter(), "synthetic", "cpu")
    worker.inbox = PushedCopies()
    try:
        spec = RequestSpec("synthetic", steps=4, params={"shape": [8, 8]})
        reply = worker._job(PrepareMessage(spec=spec.to_dict(), request="r", epoch=3))
        assert not isinstance(reply, FailedMessage), reply
        yield worker
    finally:
        worker.close()
        worker.store.release("r")


def _eval(inputs: tuple[NamedInput, ...], pushed: tuple[Ref, ...]) -> EvalMessage:
    entries = tuple(TaskEntry(task, 0, 0, 0, (1,)) for task in range(len(inputs)))
    message = EvalMessage(
        entries=entries,
        inputs=inputs,
        dtype="float32",
        pushed=pushed,
        request="r",
        task=0,
        attempt=0,
        epoch=3,
    )
    decoded = decode(encode(message))  # as it travels
    assert isinstance(decoded, EvalMessage)
    return decoded


def _named(ref: Ref, tensor: torch.Tensor | None) -> NamedRef:
    digest = None if tensor is None else tensor_digest(tensor)
    return NamedRef(ref, (Holder(PRODUCER, None, digest),))


def test_one_pushed_copy_feeds_every_input_that_reads_it_and_the_wait_is_reported(worker):
    """Two tasks of one EVAL read the same pushed result: both from the one copy (nothing is
    fetched), each result as if computed from the tensor itself, and the RESULT reports the
    wait for the copy as a fetch of no bytes from its producer."""
    copy = torch.randn(8, 8)
    ref = Ref(7, 1)
    worker.inbox.put("r", ref, copy.clone(), None)
    value = NamedInput("ref", (_named(ref, copy),))
    reply = worker._job(_eval((value, value), (ref,)))
    assert isinstance(reply, ResultMessage), reply
    assert worker.pulled == 0  # no fetch: the copy fed both
    assert worker.inbox.used == 1 and not worker.inbox.holds("r", ref)
    first, second = (worker.store.get("r", Ref(task, 1)) for task in (0, 1))
    assert torch.equal(first, second)
    assert reply.fetched is not None
    assert [(f.endpoint, f.nbytes) for f in reply.fetched] == [(PRODUCER, 0)]
    # the same step from the tensor itself, through an input the store holds (x0's name)
    worker.store.drop("r", (X0_REF,))
    worker.store.put("r", X0_REF, copy.clone())
    again = worker._job(_eval((NamedInput("ref", (NamedRef(X0_REF, ()),)),), ()))
    assert isinstance(again, ResultMessage), again
    assert torch.equal(worker.store.get("r", Ref(0, 1)), first)


def test_a_pushed_copy_with_another_digest_is_not_used(worker):
    """The copy in the inbox has not the digest the broker named for the result: the worker
    does not read it (it would fetch from the holder; here none answers: lost_input)."""
    ref = Ref(7, 1)
    worker.inbox.put("r", ref, torch.zeros(8, 8), None)
    value = NamedInput("ref", (_named(ref, torch.ones(8, 8)),))
    reply = worker._job(_eval((value,), (ref,)))
    assert isinstance(reply, FailedMessage) and reply.code == "lost_input", reply
    assert worker.pulled == 1  # it went to the holder instead


def test_an_eval_that_fails_on_an_input_lets_go_of_the_pushed_copies_it_will_not_read(worker):
    """The first input is held by nobody that answers (lost_input); the second was pushed
    here. The broker stopped counting the copy when it named it in this EVAL, so no DROP will
    come for it: the worker lets it go itself instead of holding it until RELEASE."""
    pushed = torch.randn(8, 8)
    lost, ref = Ref(5, 1), Ref(7, 1)
    worker.inbox.put("r", ref, pushed, None)
    inputs = (NamedInput("ref", (_named(lost, None),)), NamedInput("ref", (_named(ref, pushed),)))
    reply = worker._job(_eval(inputs, (ref,)))
    assert isinstance(reply, FailedMessage) and reply.code == "lost_input", reply
    assert not worker.inbox.holds("r", ref)
    assert worker.inbox.held_bytes == 0
