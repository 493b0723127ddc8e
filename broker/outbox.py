"""What one input of the broker core decided to send: a list of ``Send``, each message stamped
with the broker's epoch. Every input builds a fresh ``Outbox`` and returns its sends; nothing is
kept between inputs."""

from __future__ import annotations

from typing import Literal, NamedTuple

from chords_mq.wire import ErrorMessage, Message

Side = Literal["worker", "client"]


class Send(NamedTuple):
    """One message the I/O edge must send: to a worker or a client, by routing id."""

    to: Side
    identity: bytes
    message: Message


class Outbox:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.sends: list[Send] = []

    def to_worker(self, identity: bytes, message: Message) -> None:
        self.sends.append(Send("worker", identity, message.stamped(self.epoch)))

    def to_client(self, identity: bytes, message: Message) -> None:
        self.sends.append(Send("client", identity, message.stamped(self.epoch)))

    def client_error(self, identity: bytes, code: str, text: str, request: str | None) -> None:
        self.to_client(identity, ErrorMessage(code=code, message=text, request=request))
