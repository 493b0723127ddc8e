"""Who sent a message, and a log that a noisy peer cannot flood.

``Peer`` is passed explicitly to every handler of the broker core: the routing id a reply goes
to, the principal it authenticated as (its CURVE key; insecure, a worker's claimed name and
host, anyone else's connection) and its role. ``PeerLog`` rate-limits warnings per peer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("chords.broker")

Role = Literal["worker", "client", "admin"]


@dataclass(frozen=True)
class Peer:
    """The sender of the message being handled."""

    identity: bytes  # the ROUTER routing id: where a reply goes
    # who it is: "key:<public key>"; without CURVE a worker's "name:<name>@<host>" (once it
    # said HELLO), anyone else's "conn:<routing id>"
    principal: str
    role: Role = "client"

    @classmethod
    def of(cls, identity: bytes, principal: str | None, role: Role) -> Peer:
        """A peer that authenticated as ``principal``, or (None) is known by its connection."""
        return cls(identity, principal or connection_principal(identity), role)

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def connection_principal(identity: bytes) -> str:
    """The principal of a peer without a key: its connection (routing id)."""
    return "conn:" + identity.hex()


def claimed_principal(name: str, host: str | None) -> str:
    """The principal of a worker without a key: the name its HELLO claims and its host, so
    its strikes, quarantine and learnt speed outlast a reconnect. Weak: anyone who reaches
    the broker can claim a name (docs/architecture.md, "Trust")."""
    return f"name:{name}@{host or '?'}"


def endpoint_host(endpoint: str | None) -> str | None:
    """The host of ``tcp://HOST:PORT`` (None for anything else)."""
    if endpoint is None or not endpoint.startswith("tcp://"):
        return None
    host, sep, _ = endpoint.removeprefix("tcp://").rpartition(":")
    return host if sep and host else None


class PeerLog:
    """Rate-limited warnings per peer, so a noisy or hostile peer cannot flood the log: the
    first ``burst`` lines pass, then one per ``interval_s``, saying how many were suppressed.
    Remembers at most ``peers`` peers (the oldest is forgotten first)."""

    def __init__(
        self, clock: Callable[[], float], burst: int, interval_s: float, peers: int = 1024
    ) -> None:
        self.clock = clock
        self.burst = burst
        self.interval_s = interval_s
        self.peers = peers
        self._seen: OrderedDict[Any, list[float]] = OrderedDict()  # [lines, last, suppressed]

    def warning(self, peer: Any, text: str, *args: Any) -> None:
        now = self.clock()
        entry = self._seen.get(peer)
        if entry is None:
            entry = self._seen[peer] = [0.0, -1e18, 0.0]
            while len(self._seen) > self.peers:
                self._seen.popitem(last=False)
        self._seen.move_to_end(peer)
        lines, last, suppressed = entry
        if lines < self.burst or now - last >= self.interval_s:
            if suppressed:
                text += f" ({int(suppressed)} similar lines from this peer suppressed)"
            log.warning(text, *args)
            entry[:] = [lines + 1, now, 0.0]
        else:
            entry[2] = suppressed + 1
