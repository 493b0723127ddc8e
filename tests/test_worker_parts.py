"""The worker's side of a hit's latent in pieces (``broker.parts``), in process with real
ZeroMQ sockets: a DECODE that asks for ``parts`` is answered by each piece as a PART
(``wire.part_bounds``: their bytes, in order, are the latent's) and then the DECODED with
their count and no latent. A piece the broker's socket cannot take yet is waited for, not
dropped (a missing piece would read as a lie); past ``PART_WAIT_S`` the worker gives the decode
up and sends nothing more of it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from chords_mq.request import RequestSpec
from chords_mq.transport import dealer, router
from chords_mq.wire import (
    DecodedMessage,
    DecodeMessage,
    FailedMessage,
    Message,
    PartMessage,
    PrepareMessage,
    decode,
    encode,
    part_bounds,
)
from chords_mq.wire.named import X0_REF, Holder, NamedInput, NamedRef
from chords_mq.workers import worker as worker_module
from chords_mq.workers.models.synthetic import SyntheticAdapter
from chords_mq.workers.worker import Worker

SHAPE = [4, 256, 256]  # float32, 1 MiB
X0_VALUE = NamedInput("x0", (NamedRef(X0_REF, (Holder("tcp://127.0.0.2:7000"),)),))


@pytest.fixture
def endpoint(tmp_path) -> str:
    """An endpoint nothing else can take meanwhile (a socket file of this test's own)."""
    return f"ipc://{tmp_path}/broker.sock"


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker("tcp://127.0.0.1:9", SyntheticAdapter(), "synthetic", "cpu")
    try:
        spec = RequestSpec("synthetic", steps=4, seed=2, params={"shape": SHAPE})
        reply = worker._job(PrepareMessage(spec=spec.to_dict(), request="r", epoch=3))
        assert not isinstance(reply, FailedMessage), reply
        yield worker
    finally:
        with worker.lock:
            if worker.sock is not None:
                worker.sock.close(0)
                worker.sock = None
        worker.close()
        worker.store.release("r")


def unconnected(worker: Worker, endpoint: str) -> zmq.Socket:  # type: ignore[type-arg]
    """The worker's DEALER to ``endpoint``, where nothing listens yet; with ZMQ_IMMEDIATE no
    message is queued before a connection: every send finds the broker's queue full."""
    sock = worker.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.ROUTING_ID, b"w-parts")
    sock.connect(endpoint)
    return sock


def asked(parts: int) -> DecodeMessage:
    message = DecodeMessage(
        value=X0_VALUE, want_latent=True, parts=parts, request="r", task=5, epoch=3
    )
    decoded = decode(encode(message))  # as it travels
    assert isinstance(decoded, DecodeMessage)
    return decoded


def received(sock: zmq.Socket, count: int, timeout_s: float = 10.0) -> list[Message]:  # type: ignore[type-arg]
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart(copy=False)
            out.append(decode(frames[1:]))  # (the routing id first)
    return out


def test_a_decode_asked_in_pieces_is_answered_by_its_pieces_then_the_decoded(worker, endpoint):
    broker = router(worker.ctx, endpoint)
    try:
        worker.sock = dealer(worker.ctx, endpoint, b"w-parts")
        worker._handle(asked(3))
        messages = received(broker, 4)
    finally:
        broker.close(0)
    x0 = worker.store.get("r", X0_REF)
    raw = x0.contiguous().view(-1).view(torch.uint8)
    bounds = part_bounds(raw.numel(), 4, 3)
    assert len(bounds) == 3 and len(messages) == 4
    *pieces, last = messages
    assert isinstance(last, DecodedMessage) and last.latent is None and last.parts == 3
    assert (last.request, last.task) == ("r", 5)
    for index, (piece, (start, stop)) in enumerate(zip(pieces, bounds, strict=True)):
        assert isinstance(piece, PartMessage) and (piece.index, piece.parts) == (index, 3)
        assert (piece.request, piece.task) == ("r", 5)
        assert torch.equal(piece.data, raw[start:stop])


def test_a_piece_waits_for_the_brokers_socket_and_goes_when_it_can(worker, endpoint):
    """No broker yet (no connection: the socket takes nothing): the pieces wait and go once
    the broker binds, all of them, in order."""
    worker.sock = unconnected(worker, endpoint)
    bound: list[zmq.Socket] = []  # type: ignore[type-arg]

    def bind_later() -> None:
        time.sleep(0.3)
        bound.append(router(worker.ctx, endpoint))

    later = threading.Thread(target=bind_later)
    later.start()
    try:
        started = time.monotonic()
        worker._handle(asked(2))
        waited = time.monotonic() - started
        later.join()
        messages = received(bound[0], 3)
    finally:
        later.join()
        for sock in bound:
            sock.close(0)
    assert waited >= 0.25  # it waited for the broker instead of dropping the pieces
    assert [type(m).__name__ for m in messages] == ["PartMessage", "PartMessage", "DecodedMessage"]
    assert [m.index for m in messages if isinstance(m, PartMessage)] == [0, 1]


def test_past_the_wait_the_decode_is_given_up_and_nothing_more_is_sent(
    worker, endpoint, monkeypatch, caplog
):
    worker.sock = unconnected(worker, endpoint)
    monkeypatch.setattr(worker_module, "PART_WAIT_S", 0.2)
    monkeypatch.setattr(worker_module, "TRANSFER_FLOOR_BYTES_S", 1e12)
    with caplog.at_level(logging.WARNING, logger="chords.worker"):
        started = time.monotonic()
        worker._handle(asked(2))
        waited = time.monotonic() - started
    assert 0.2 <= waited < 5.0
    assert "took no PART" in caplog.text and "another worker" in caplog.text
    late = router(worker.ctx, endpoint)  # the broker now: nothing of that decode comes
    try:
        assert received(late, 1, timeout_s=0.5) == []
    finally:
        late.close(0)
