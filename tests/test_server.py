"""BrokerServer's client outboxes, against a stand-in for the ZeroMQ socket (the one thing not
ours): an unsendable message never cuts a client off, and a client whose outbox passes its
bound is dropped with its requests cancelled. The real sockets are in tests/integration."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import zmq

from chords_mq.broker import server as server_module
from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.server import BrokerServer
from chords_mq.request import RequestSpec
from chords_mq.wire import Message, decode
from tests.test_broker_core import as_sent, hello_body, raw

CLIENT = b"client-1"


class Socket:
    """Records what is sent per routing id; ``fail(frames)`` may raise to refuse a message."""

    def __init__(self, fail: Any = None) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes, Message]] = []
        self._frames: list[Any] = []

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> None:
        self._frames.append(bytes(frame))
        if flags & zmq.SNDMORE:
            return
        frames, self._frames = self._frames, []
        message = decode(frames[1:])
        if self.fail is not None:
            self.fail(message)
        self.sent.append((frames[0], message))

    def kinds(self) -> list[str]:
        return [m.kind for _, m in self.sent]


def make(fail: Any = None) -> tuple[BrokerServer, Socket]:
    core = BrokerCore(epoch=3)
    server = BrokerServer(core)
    sock = Socket(fail)
    server.clients = sock
    server.workers = Socket()
    return server, sock


def submit(server: BrokerServer, request: str = "r1") -> None:
    spec = RequestSpec(model="m", steps=4, method="sequential")
    message = as_sent(raw("SUBMIT", {"request": spec.to_dict()}, request=request))
    server.emit(server.core.client_message(CLIENT, message))


@pytest.mark.parametrize(
    "error",
    [
        zmq.ZMQError(errno.EINVAL),  # any other ZeroMQ error
        RuntimeError("a bug in encoding"),
        ValueError("header too large"),
    ],
    ids=["zmq-error", "runtime-error", "value-error"],
)
def test_an_unsendable_message_does_not_cut_the_client_off(error):
    def fail(message: Message) -> None:
        if message.kind == "PROGRESS":
            raise error

    server, sock = make(fail)
    for kind in ("ACCEPTED", "PROGRESS", "HIT", "DONE"):
        body = {
            "ACCEPTED": {"steps": 1, "method": "x", "hit_rounds": []},
            "PROGRESS": {"evaluations": 1},
            "HIT": {"core": 1, "round": 1, "steps": 1, "elapsed_s": 0.1},
            "DONE": {"stats": {}},
        }[kind]
        server.emit([Send("client", CLIENT, as_sent(raw(kind, body, request="r1")))])
    # the PROGRESS became a small ERROR for its request; everything after it went out
    assert sock.kinds() == ["ACCEPTED", "ERROR", "HIT", "DONE"]
    assert sock.sent[1][1].code == "internal" and sock.sent[1][1].request == "r1"
    assert server.outboxes == {}


def test_a_client_past_its_outbox_bound_is_dropped_and_its_requests_cancelled(monkeypatch):
    monkeypatch.setattr(server_module, "CLIENT_OUTBOX", 10)

    def congested(message: Message) -> None:
        if message.kind != "ACCEPTED":
            raise zmq.Again()

    server, sock = make(congested)
    submit(server)
    assert len(server.core.sessions) == 1 and sock.kinds() == ["ACCEPTED"]
    for i in range(10):  # a client that stopped reading
        server.emit([Send("client", CLIENT, as_sent(raw("HEARTBEAT", {"missing": []})))])
        assert len(server.outboxes[CLIENT]) == i + 1
    server.emit([Send("client", CLIENT, as_sent(raw("HEARTBEAT", {"missing": []})))])
    assert CLIENT not in server.outboxes and CLIENT not in server.outbox_bytes
    assert server.core.sessions == {}  # its request was cancelled, its workers released


def test_a_client_stuck_past_the_send_timeout_is_dropped(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: clock[0])

    def congested(message: Message) -> None:
        if message.kind != "ACCEPTED":
            raise zmq.Again()

    server, _ = make(congested)
    submit(server)
    server.emit([Send("client", CLIENT, as_sent(raw("HEARTBEAT", {"missing": []})))])
    assert CLIENT in server.outboxes
    clock[0] += server.client_send_timeout_s + 1
    server._flush_clients()
    assert CLIENT not in server.outboxes and server.core.sessions == {}


def test_a_worker_that_cannot_be_sent_to_is_lost_not_the_broker():
    server, _ = make()

    def broken(message: Message) -> None:
        raise zmq.ZMQError(errno.ENOTSOCK)

    server.workers = Socket(broken)
    server.emit(server.core.worker_message(b"worker/w", as_sent(raw("HELLO", hello_body("w")))))
    assert server.core.registry.workers == {}  # the WELCOME could not go: it is lost
