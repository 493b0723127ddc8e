"""ZeroMQ sockets for chords-mq: the options every socket needs, and Message send/receive.

Bytes stay in :mod:`chords_mq.wire`; this module only owns socket set-up (ROUTER_MANDATORY,
ROUTER_HANDOVER, linger 0, small high-water marks, MAXMSGSIZE, reconnect backoff) and moves
encoded frames with ``copy=False`` in both directions. The broker and the worker use plain
(blocking-API) sockets with non-blocking sends, ``send_now``; the client uses ``zmq.asyncio``
sockets and ``send``.
"""

from __future__ import annotations

import os
import socket as pysocket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import zmq
import zmq.asyncio

from chords_mq.keys import CurveClient
from chords_mq.wire import DEFAULT_LIMITS, Message, WireLimits, decode, encode

HWM = 64  # messages per peer; memory is bounded by HWM x largest message x peers
# Frames below this are copied on send. Above it pyzmq sends zero-copy and hands the buffer to
# its garbage-collector thread to release once libzmq is done: a thread wake-up and a GIL
# hand-off per message, which costs more than copying a few hundred KiB.
COPY_THRESHOLD = 256 * 1024
# Plain ints: pyzmq's flag enums cost a Python-level call on every operation of the hot path.
MORE_NOW = int(zmq.SNDMORE) | int(zmq.DONTWAIT)
NOW = int(zmq.DONTWAIT)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
ZMTP_IVL_MS = 1000
ZMTP_TIMEOUT_MS = 3000


def readable(sock: Any) -> bool:
    """Does the socket have a message waiting? (Also lets libzmq process pending commands.)"""
    return bool(sock.getsockopt(EVENTS) & POLLIN)


class PeerUnreachable(Exception):
    """A ROUTER send found no connected peer with that routing id (EHOSTUNREACH)."""


class PeerCongested(Exception):
    """A peer's queue is at its high-water mark (EAGAIN on a non-blocking send)."""


def _common(sock: zmq.Socket, limits: WireLimits) -> None:  # type: ignore[type-arg]
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    # MAXMSGSIZE is per frame; a peer announcing a bigger frame is dropped by libzmq.
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes + 1024)
    sock.copy_threshold = COPY_THRESHOLD


def _zmtp_heartbeats(sock: Any) -> None:
    """libzmq's own PING/PONG: a connection whose peer went silent (a partition, a host that
    vanished) is closed within ``ZMTP_TIMEOUT_MS``, so a reconnect is not refused by a stale
    half-open pipe. It cannot see a hung application; the broker's heartbeats do that."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, ZMTP_TIMEOUT_MS)


def router(
    ctx: Any,
    endpoint: str,
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    handover: bool = True,
    secure: Callable[[Any], None] | None = None,
) -> Any:
    """A bound ROUTER from ``ctx`` (a plain or an asyncio context: the socket is of its kind).

    ``handover``: a new connection with a routing id in use takes it over, so a peer that
    reconnects (after a partition, say) under its id gets its replies at once. Routing ids are
    long and random (``stable_identity``) and never shown to other clients, and the broker
    checks every message's principal. ``secure`` sets CURVE server options before the bind.
    """
    sock = ctx.socket(zmq.ROUTER)
    _common(sock, limits)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> EHOSTUNREACH, not a silent drop
    sock.setsockopt(zmq.ROUTER_HANDOVER, int(handover))
    # No ZMTP heartbeats on the broker's side: with them, libzmq 4.3.5 aborts the process
    # (``!_io_error`` in stream_engine_base.cpp) under a flood from peers that reconnect
    # often (benchmarks/flood.py: 3 of 3 runs); the connecting side runs them instead.
    if secure is not None:
        secure(sock)
    sock.bind(endpoint)
    return sock


def dealer(
    ctx: Any,
    endpoint: str,
    identity: bytes,
    limits: WireLimits = DEFAULT_LIMITS,
    curve: CurveClient | None = None,
) -> Any:
    """A DEALER with a stable routing id, connecting to ``endpoint`` (reconnects by itself),
    with CURVE when ``curve`` names the key pair and the broker's public key."""
    sock = ctx.socket(zmq.DEALER)
    _common(sock, limits)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    _zmtp_heartbeats(sock)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    return sock


def stable_identity(role: str, device: str = "") -> bytes:
    """A routing id that is stable for this process and names it: ``role/host/device/pid-uuid``.

    It must not start with a zero byte (ZeroMQ reserves those for generated ids).
    """
    # 128 random bits: nobody can take over a peer's connection by guessing its id.
    name = f"{role}/{pysocket.gethostname()}/{device or '-'}/{os.getpid()}-{uuid.uuid4().hex}"
    return name.encode()[:255]


@contextmanager
def _typed_send_errors(identity: bytes | None) -> Iterator[None]:
    """ZeroMQ's send errors as our types: EAGAIN is a congested peer, EHOSTUNREACH a gone one."""
    try:
        yield
    except zmq.Again:
        raise PeerCongested(identity) from None
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            raise PeerUnreachable(identity) from None
        raise


async def send(
    sock: zmq.asyncio.Socket,
    message: Message,
    identity: bytes | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
    block: bool = False,
) -> None:
    """Send without waiting (unless ``block``); ROUTER errors become typed exceptions."""
    frames: list[bytes | memoryview] = encode(message, limits)
    if identity is not None:
        frames.insert(0, identity)
    with _typed_send_errors(identity):
        await sock.send_multipart(frames, copy=False, flags=0 if block else zmq.DONTWAIT)


def send_now(
    sock: zmq.Socket,  # type: ignore[type-arg]
    message: Message,
    identity: bytes | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> None:
    """Send on a plain socket at once or fail at once (DONTWAIT): a peer at its high-water mark
    is ``PeerCongested``, a ROUTER peer that is gone ``PeerUnreachable``."""
    frames = encode(message, limits)
    with _typed_send_errors(identity):
        # A ROUTER refuses at the first frame (an unknown peer, a peer at its high-water
        # mark), so a message is never half sent.
        if identity is not None:
            sock.send(identity, MORE_NOW)
        for frame in frames[:-1]:
            sock.send(frame, MORE_NOW, copy=False)
        sock.send(frames[-1], NOW, copy=False)


def decode_frames(frames: list[zmq.Frame], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    return decode(frames, limits)
