"""The worker's data plane: a ``DataServer`` that hands the results its ``LatentStore`` holds to
other workers of the pool, and a ``DataClient`` that pulls results from them.

The server is a ROUTER on its own thread and its own TCP port, apart from the control DEALER,
so heartbeats never queue behind latent frames. It answers FETCH with the tensors (zero-copy
frames) or a typed refusal, and never unpickles anything. In a CURVE pool it is a CURVE server
with the worker's own key pair, and its ZAP handler admits only the pool's worker keys
(``set_pool_keys``); a peer outside the pool fails the handshake and gets nothing. Off loopback
without CURVE it refuses to start unless told ``insecure``, as the broker does. Everything is
bounded: the header, refs per fetch, bytes per reply, replies queued per peer, bytes in flight.
"""

from __future__ import annotations

import itertools
import logging
import socket as pysocket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from chords_mq.algorithms.base import Ref
from chords_mq.errors import ChordsError
from chords_mq.keys import CurveClient, ZapHandler, curve_server, is_loopback
from chords_mq.transport import MORE_NOW, NOW, dealer, readable, router, stable_identity
from chords_mq.wire import WireError, WireLimits
from chords_mq.wire.data import (
    DATA_LIMITS,
    DataMessage,
    DataPlaneMessage,
    FetchMessage,
    KeptMessage,
    PutMessage,
    RefusalReason,
    RefusedMessage,
    decode_data_message,
    encode_data_message,
)
from chords_mq.wire.named import MAX_PUSH_TO, MAX_PUSHES
from chords_mq.workers.store import (
    LatentStore,
    NotHeld,
    PushedCopies,
    PushRefused,
    UnknownRequest,
    nbytes_of,
)

log = logging.getLogger("chords.dataplane")

DATA_DOMAIN = "chords-data"  # the ZAP domain of data endpoints
KeyPair = tuple[bytes, bytes]  # (public, secret), z85
POLL_MS = 50  # how soon the server's thread sees close()
MAX_LOGGED = 4096  # distinct keys whose dropped messages are logged (each once)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class DataPlaneError(ChordsError):
    """Base of the data plane's typed errors."""


class InsecureBind(DataPlaneError, ValueError):
    """A data endpoint off loopback without CURVE, and ``insecure`` not given."""


class DataBindError(DataPlaneError, OSError):
    """The data endpoint cannot bind (a bad address, a port in use)."""


class PeerTimeout(DataPlaneError, TimeoutError):
    """A peer's data endpoint did not answer within the wait: unreachable, gone, or it does not
    admit us (a CURVE handshake that fails looks the same from here)."""


class FetchRefused(DataPlaneError):
    """The peer answered with a refusal; ``reason`` says why, ``refs`` which refs."""

    def __init__(self, message: RefusedMessage) -> None:
        super().__init__(f"{message.reason.value}: {message.detail}")
        self.reason = message.reason
        self.refs = message.refs


class BadData(DataPlaneError, WireError):
    """A peer's answer that is malformed or is not what was asked (refs, dtype, shape)."""


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of one data server, past which it refuses (or, for a peer that does not read
    its replies, stops answering it)."""

    max_reply_bytes: int = 1 << 30  # tensor bytes in one reply: else too_large
    max_inflight_bytes: int = 2 << 30  # reply bytes libzmq has not sent yet: else busy
    replies_per_peer: int = 4  # replies queued for one peer (its SNDHWM)
    wire: WireLimits = DATA_LIMITS


class PoolKeys:
    """The public keys of the pool's workers, replaced at once by ``set``; the data server's
    ZAP handler asks ``role``."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._keys: frozenset[bytes] = frozenset()
        self.set(keys)

    def set(self, keys: Iterable[bytes]) -> None:
        found = frozenset(keys)
        for key in found:
            if not isinstance(key, bytes) or len(key) != 40:
                raise DataPlaneError(f"{key!r} is not a z85 public key (40 characters)")
        self._keys = found  # one assignment: the server's thread sees the old set or the new

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def role(self, domain: str, key: bytes) -> str | None:
        return "worker" if domain == DATA_DOMAIN and key in self._keys else None


def default_data_bind(broker: str) -> str:
    """The data endpoint a worker binds by default: the local address it reaches ``broker``
    from (no packet is sent: a UDP socket's ``connect`` only picks the route), any port."""
    scheme, _, rest = broker.partition("://")
    host = rest.rsplit(":", 1)[0].strip("[]") if scheme == "tcp" else ""
    if not host or is_loopback(broker) or host == "*":
        return "tcp://127.0.0.1:0"
    try:
        family, _, _, _, address = pysocket.getaddrinfo(host, 9, type=pysocket.SOCK_DGRAM)[0]
        with pysocket.socket(family, pysocket.SOCK_DGRAM) as probe:
            probe.connect(address)
            local = str(probe.getsockname()[0])
    except OSError as exc:
        text = f"cannot find the address this host reaches {broker} from: {exc}"
        raise DataBindError(text) from None
    return f"tcp://[{local}]:0" if ":" in local else f"tcp://{local}:0"


def advertised_endpoint(bound: str, advertise: str | None) -> str:
    """What peers connect to: ``--advertise HOST:PORT`` (NAT, several interfaces), else the
    bound endpoint."""
    if advertise is None:
        return bound
    host, sep, port = advertise.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise DataPlaneError(f"--advertise {advertise!r} is not HOST:PORT")
    return f"tcp://{advertise}"


@dataclass
class ServerCounters:
    """What a data server did, for logs, metrics and tests."""

    served: int = 0
    bytes_served: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    unlisted: int = 0  # messages from a key no longer in the pool: dropped unanswered
    handshakes_failed: int = 0  # CURVE: peers without CURVE, or refused by the ZAP handler
    unsendable: int = 0  # replies to a peer that is gone or does not read: dropped
    pushes_kept: int = 0  # PUTs kept (``PushedCopies``)


class DataServer:
    """Serves ``store``'s results on its own ROUTER, thread and port. ``start`` binds and returns
    the bound endpoint; ``close`` stops the thread and closes the sockets."""

    def __init__(
        self,
        store: LatentStore,
        bind: str = "tcp://127.0.0.1:0",
        *,
        key_pair: KeyPair | None = None,
        pool_keys: Iterable[bytes] = (),
        insecure: bool = False,
        advertise: str | None = None,
        limits: ServerLimits = ServerLimits(),
        inbox: PushedCopies | None = None,
    ) -> None:
        if key_pair is None and not insecure and not is_loopback(bind):
            raise InsecureBind(
                f"refusing to bind the data endpoint {bind} without CURVE: off loopback every "
                "peer must authenticate (insecure=True accepts any peer that reaches it)"
            )
        self.store = store
        # where PUTs (results pushed here by their producers) are kept; None: PUT is refused
        self.inbox = inbox
        self.bind = bind
        self.key_pair = key_pair
        self.pool = PoolKeys(pool_keys)
        self.limits = limits
        self._advertise = advertise
        self.endpoint = ""
        self.advertised = ""
        self.counters = ServerCounters()
        # ``--fault serve:zeros`` (tests only): what is served instead of each held tensor
        self.serve_fault: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._inflight: list[tuple[zmq.MessageTracker, int]] = []
        self._inflight_lock = threading.Lock()  # the server's thread appends, anyone reads
        self._logged: set[bytes] = set()
        self._events_logged: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_pool_keys(self, keys: Iterable[bytes]) -> None:
        """The pool's worker keys (the broker hands them out): only these get data. A key
        removed here gets nothing more, on its open connection too."""
        self.pool.set(keys)

    def start(self) -> str:
        """Bind and start serving; returns the bound endpoint (the port resolved)."""
        if self._thread is not None:
            raise DataPlaneError("the data server is already started")
        self._stop.clear()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.zap: ZapHandler | None = None
        key_pair, limits = self.key_pair, self.limits

        def prepare(sock: Any) -> None:
            sock.setsockopt(zmq.SNDHWM, limits.replies_per_peer)
            if key_pair is not None:
                curve_server(sock, key_pair[0], key_pair[1], DATA_DOMAIN)

        try:
            if key_pair is not None:  # bound before the CURVE socket, as libzmq requires
                self.zap = ZapHandler(self.ctx, self.pool)
            self.sock = router(self.ctx, self.bind, limits.wire, secure=prepare)
        except zmq.ZMQError as exc:
            self.ctx.destroy(0)  # closes the socket ``router`` made before its bind failed
            raise DataBindError(f"cannot bind the data endpoint {self.bind}: {exc}") from None
        self.monitor: Any = None
        if key_pair is not None:  # a peer without CURVE never reaches ZAP: see it here
            self.monitor = self.sock.get_monitor_socket(_HANDSHAKE_FAILED)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.advertised = advertised_endpoint(self.endpoint, self._advertise)
        self._thread = threading.Thread(target=self._run, name="chords-data", daemon=True)
        self._thread.start()
        log.info("data endpoint on %s (CURVE: %s)", self.endpoint, key_pair is not None)
        return self.endpoint

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.ctx.term()

    def __enter__(self) -> DataServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inflight_bytes(self) -> int:
        """Reply bytes handed to libzmq and not yet sent (their buffers still held)."""
        with self._inflight_lock:
            self._inflight = [(t, n) for t, n in self._inflight if not t.done]
            return sum(n for _, n in self._inflight)

    # -- the server's thread -----------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        if self.zap is not None:
            poller.register(self.zap.sock, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                poller.poll(POLL_MS)
                if self.zap is not None:
                    try:
                        self.zap.handle()
                    except Exception:  # a bug here must not stop the endpoint
                        log.exception("data server: the ZAP handler failed")
                if self.monitor is not None:
                    self._watch()
                for _ in range(64):  # a bounded batch, then the ZAP handler again
                    if not readable(self.sock):
                        break
                    frames = self.sock.recv_multipart(NOW, copy=False)
                    try:
                        self._serve(frames)
                    except Exception:  # one bad message must not stop the endpoint
                        log.exception("data server: a message failed")
        finally:
            self._close_sockets()

    def _watch(self) -> None:
        """Count failed handshakes; the first one of each kind is logged (an unlisted key's is
        logged by the ZAP handler, once per key)."""
        for _ in range(64):
            if not readable(self.monitor):
                return
            event = recv_monitor_message(self.monitor, NOW)["event"]
            self.counters.handshakes_failed += 1
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and event not in self._events_logged:
                self._events_logged.add(event)
                log.warning(
                    "data server on %s: refused a peer without CURVE (logged once; counted in "
                    "handshakes_failed)",
                    self.endpoint,
                )

    def _close_sockets(self) -> None:
        if getattr(self, "monitor", None) is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
        for sock in (getattr(self, "sock", None), getattr(self.zap, "sock", None)):
            if sock is not None:
                sock.close(0)

    def _admitted(self, frames: list[zmq.Frame]) -> bool:
        """In a CURVE pool: is the peer's key (from ZAP's User-Id) still in the pool?"""
        if self.key_pair is None:
            return True
        if len(frames) < 2:
            return False
        key = _peer_key(frames[1])
        if key.encode() in self.pool:
            return True
        self.counters.unlisted += 1
        if key.encode() not in self._logged:
            if len(self._logged) >= MAX_LOGGED:
                self._logged.clear()
            self._logged.add(key.encode())
            log.warning("data server: dropped a message from %s, no longer in the pool", key)
        return False

    def _serve(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        if not self._admitted(frames):
            return
        try:
            message = decode_data_message(frames[1:], self.limits.wire)
        except WireError as exc:
            self._refuse(identity, RefusedMessage(0, None, RefusalReason.BAD_REQUEST, str(exc)))
            return
        if isinstance(message, PutMessage):
            sender = _peer_key(frames[1]) if self.key_pair is not None else None
            self._keep_pushed(identity, message, sender)
            return
        if not isinstance(message, FetchMessage):
            text = f"a data endpoint serves FETCH and PUT, not {type(message).__name__}"
            self._refuse(identity, RefusedMessage(message.fetch_id, None, _BAD, text))
            return
        fid, request = message.fetch_id, message.request
        try:
            tensors = self.store.get_many(request, message.refs)
        except UnknownRequest as exc:
            reason = RefusalReason.UNKNOWN_REQUEST
            self._refuse(identity, RefusedMessage(fid, request, reason, str(exc), message.refs))
            return
        except NotHeld as exc:
            refused = RefusedMessage(fid, request, RefusalReason.NOT_HELD, str(exc), exc.refs)
            self._refuse(identity, refused)
            return
        if self.serve_fault is not None:
            tensors = [self.serve_fault(tensor) for tensor in tensors]
        size = sum(nbytes_of(tensor) for tensor in tensors)
        if size > self.limits.max_reply_bytes:
            text = f"{size} bytes > the reply bound {self.limits.max_reply_bytes}"
            self._refuse(identity, RefusedMessage(fid, request, RefusalReason.TOO_LARGE, text))
            return
        if self.inflight_bytes() + size > self.limits.max_inflight_bytes:
            text = (
                f"{self.inflight_bytes()} bytes in flight; bound {self.limits.max_inflight_bytes}"
            )
            self._refuse(identity, RefusedMessage(fid, request, RefusalReason.BUSY, text))
            return
        reply = DataMessage(fid, request, tuple(zip(message.refs, tensors)))
        try:
            out = encode_data_message(reply, self.limits.wire)
        except WireError as exc:  # a tensor past the wire's frame bound: refused, not silence
            reason = RefusalReason.TOO_LARGE
            self._refuse(identity, RefusedMessage(fid, request, reason, str(exc), message.refs))
            return
        self._send(identity, out, served=size)

    def _keep_pushed(self, identity: bytes, message: PutMessage, sender: str | None) -> None:
        """A PUT from a pool worker (admitted as a fetch is): each copy checked against the
        request's latent (``PushedCopies.put``: a request prepared here, its dtype and shape,
        the budget) and kept, or a typed refusal naming them; nothing is unpickled."""
        fid, request = message.fetch_id, message.request
        refs = tuple(ref for ref, _ in message.tensors)
        if self.inbox is None:
            text = "this data endpoint keeps no pushed copies"
            self._refuse(identity, RefusedMessage(fid, request, _BAD, text, refs))
            return
        try:  # every copy or none: a refusal names all the PUT's refs
            self.inbox.put_many(request, message.tensors, sender)
        except PushRefused as exc:
            reason = RefusalReason(exc.reason)
            self._refuse(identity, RefusedMessage(fid, request, reason, str(exc), refs))
            return
        self.counters.pushes_kept += len(refs)
        self._send(identity, encode_data_message(KeptMessage(fid, request, refs)))

    def _refuse(self, identity: bytes, message: RefusedMessage) -> None:
        reason = message.reason.value
        self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
        self._send(identity, encode_data_message(message, self.limits.wire))

    def _send(
        self, identity: bytes, frames: Sequence[bytes | memoryview], served: int | None = None
    ) -> bool:
        """Send at once or not at all: a ROUTER refuses at the first frame (a gone peer, a
        peer whose queue is full), so a reply is never half sent. ``served``: a DATA reply of
        that many tensor bytes, counted once it will go and before it can arrive (a peer that
        has its answer sees it counted)."""
        try:
            self.sock.send(identity, MORE_NOW)
        except zmq.ZMQError:  # EHOSTUNREACH or EAGAIN: nobody to answer, or it does not read
            self.counters.unsendable += 1
            return False
        if served is not None:
            self.counters.served += 1
            self.counters.bytes_served += served
        *head, last = frames
        for frame in head:
            self._track(self.sock.send(frame, MORE_NOW, copy=False, track=True), frame)
        self._track(self.sock.send(last, NOW, copy=False, track=True), last)
        return True

    def _track(self, tracker: zmq.MessageTracker | None, frame: bytes | memoryview) -> None:
        if tracker is not None and not tracker.done:
            with self._inflight_lock:
                self._inflight.append((tracker, memoryview(frame).nbytes))


_BAD = RefusalReason.BAD_REQUEST


def _peer_key(frame: zmq.Frame) -> str:
    """The peer's CURVE public key (z85), from the User-Id ZAP gave its connection."""
    _, _, key = str(frame.get("User-Id")).partition(":")
    return key


@dataclass(frozen=True)
class LatentSpec:
    """What every fetched tensor must be: the request's latent dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LatentSpec:
        return cls(tensor.dtype, tuple(tensor.shape))


@dataclass
class TransferStats:
    """Fetches from one peer: how many, their tensor bytes, and the seconds from asking to
    having every byte (what bandwidth per host pair is learnt from)."""

    fetches: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class DataClient:
    """Pulls results from peers' data endpoints: one DEALER per peer (cached, at most
    ``max_peers``), a bounded wait, every answer checked against what was asked. For one thread
    (the worker's compute thread)."""

    def __init__(
        self,
        key_pair: KeyPair | None = None,
        timeout_s: float = 10.0,
        max_peers: int = 64,
        limits: WireLimits = DATA_LIMITS,
    ) -> None:
        self.key_pair = key_pair
        self.timeout_s = timeout_s
        self.max_peers = max_peers
        self.limits = limits
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.identity = stable_identity("data")
        self._peers: OrderedDict[tuple[str, bytes | None], Any] = OrderedDict()
        self._stats: OrderedDict[str, TransferStats] = OrderedDict()
        self._ids = itertools.count(1)

    def fetch(
        self,
        endpoint: str,
        request: str,
        refs: Sequence[Ref],
        like: LatentSpec | None = None,
        *,
        server_key: bytes | None = None,
        timeout_s: float | None = None,
    ) -> dict[Ref, torch.Tensor]:
        """The tensors of ``refs`` of ``request`` from the peer at ``endpoint`` (``server_key``:
        its public key, in a CURVE pool). Raises ``PeerTimeout`` past the wait,
        ``FetchRefused`` for a refusal, ``BadData`` for an answer that is not what was asked
        (``like``: the dtype and shape every tensor must have)."""
        wanted = tuple(refs)
        message = FetchMessage(next(self._ids), request, wanted)
        frames = encode_data_message(message, self.limits)
        sock = self._socket(endpoint, server_key)
        started = time.perf_counter()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            sock.send_multipart(frames, NOW)
        except zmq.Again:  # not connected yet and its queue is full, or a gone peer
            self._forget(endpoint, server_key)
            raise PeerTimeout(f"data endpoint {endpoint}: cannot queue a fetch") from None
        reply = self._await(sock, message.fetch_id, deadline, endpoint, server_key)
        elapsed = time.perf_counter() - started
        if isinstance(reply, RefusedMessage):
            raise FetchRefused(reply)
        if not isinstance(reply, DataMessage) or reply.request != request:
            raise BadData(f"data endpoint {endpoint}: an answer for another request")
        got = tuple(ref for ref, _ in reply.tensors)
        if got != wanted:
            raise BadData(f"data endpoint {endpoint}: answered {got}, asked {wanted}")
        tensors = dict(reply.tensors)
        for ref, tensor in tensors.items():
            if like is not None and (tensor.dtype, tuple(tensor.shape)) != (like.dtype, like.shape):
                raise BadData(
                    f"data endpoint {endpoint}: {ref} is {tensor.dtype}{list(tensor.shape)}, "
                    f"asked {like.dtype}{list(like.shape)}"
                )
        self._record(endpoint, sum(nbytes_of(t) for t in tensors.values()), elapsed)
        return tensors

    def push(
        self,
        endpoint: str,
        request: str,
        tensors: Sequence[tuple[Ref, torch.Tensor]],
        *,
        server_key: bytes | None = None,
        timeout_s: float | None = None,
    ) -> float:
        """PUT ``tensors`` of ``request`` to the peer at ``endpoint`` (a push: it keeps them
        for an EVAL that will read them); the seconds until it said KEPT. Raises
        ``PeerTimeout`` past the wait, ``FetchRefused`` for a refusal (``no_room``,
        ``unknown_request``, ``mismatch`` ...), ``BadData`` for another answer."""
        message = PutMessage(next(self._ids), request, tuple(tensors))
        frames = encode_data_message(message, self.limits)
        sock = self._socket(endpoint, server_key)
        started = time.perf_counter()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            sock.send_multipart(frames, NOW, copy=False)
        except zmq.Again:
            self._forget(endpoint, server_key)
            raise PeerTimeout(f"data endpoint {endpoint}: cannot queue a push") from None
        reply = self._await(sock, message.fetch_id, deadline, endpoint, server_key)
        if isinstance(reply, RefusedMessage):
            raise FetchRefused(reply)
        wanted = tuple(ref for ref, _ in message.tensors)
        if not isinstance(reply, KeptMessage) or reply.request != request or reply.refs != wanted:
            raise BadData(f"data endpoint {endpoint}: {type(reply).__name__} answered a PUT")
        return time.perf_counter() - started

    def _await(
        self, sock: Any, fetch_id: int, deadline: float, endpoint: str, key: bytes | None
    ) -> DataPlaneMessage:
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            try:
                reply = decode_data_message(sock.recv_multipart(NOW, copy=False), self.limits)
            except WireError as exc:
                raise BadData(f"data endpoint {endpoint}: {exc}") from None
            if reply.fetch_id == fetch_id:
                return reply
            if isinstance(reply, RefusedMessage) and reply.fetch_id == 0:
                raise FetchRefused(reply)  # the peer could not read our message at all
            # else: a late answer to a fetch that timed out earlier; skip it
        self._forget(endpoint, key)  # a late answer must not wait in a cached socket
        raise PeerTimeout(f"data endpoint {endpoint}: no answer within the wait")

    def _socket(self, endpoint: str, server_key: bytes | None) -> Any:
        slot = (endpoint, server_key)
        sock = self._peers.get(slot)
        if sock is not None:
            self._peers.move_to_end(slot)
            return sock
        curve = None
        if self.key_pair is not None or server_key is not None:
            if self.key_pair is None or server_key is None:
                raise DataPlaneError("CURVE needs both our key pair and the peer's public key")
            curve = CurveClient(self.key_pair[0], self.key_pair[1], server_key)
        if len(self._peers) >= self.max_peers:
            _, oldest = self._peers.popitem(last=False)
            oldest.close(0)
        sock = dealer(self.ctx, endpoint, self.identity, self.limits, curve)
        self._peers[slot] = sock
        return sock

    def _forget(self, endpoint: str, server_key: bytes | None) -> None:
        sock = self._peers.pop((endpoint, server_key), None)
        if sock is not None:
            sock.close(0)

    def _record(self, endpoint: str, nbytes: int, seconds: float) -> None:
        stats = self._stats.pop(endpoint, None) or TransferStats()
        stats.fetches += 1
        stats.bytes += nbytes
        stats.seconds += seconds
        self._stats[endpoint] = stats
        if len(self._stats) > self.max_peers * 4:  # bounded: the oldest peers go first
            self._stats.popitem(last=False)

    def transfer_stats(self) -> dict[str, TransferStats]:
        """Per peer endpoint: fetches, bytes and seconds so far (copies)."""
        return {
            peer: TransferStats(s.fetches, s.bytes, s.seconds) for peer, s in self._stats.items()
        }

    def close(self) -> None:
        for sock in self._peers.values():
            sock.close(0)
        self._peers.clear()
        self.ctx.term()

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PushJob:
    """One result to push: ``ref`` of ``request`` to the data endpoint ``endpoint``."""

    endpoint: str
    key: bytes | None
    request: str
    ref: Ref
    tensor: torch.Tensor


@dataclass
class PushCounters:
    pushed: int = 0
    bytes: int = 0
    failed: int = 0  # refused, timed out, or not queued (the queue was full)


class Pusher:
    """Pushes results to the workers that will read them (issue 25), on its own thread with
    its own ``DataClient``, so the compute thread goes on with the next EVAL while the bytes
    move. A bounded queue (a push past it is dropped: the reader pulls instead, once its
    wait for it is over), by default two EVALs' widest pushes (``MAX_PUSHES`` results to
    ``MAX_PUSH_TO`` readers each: an EVAL's pushes all queue behind a slow one); each push
    waits ``timeout_s`` plus its bytes at ``floor_bytes_s`` for the peer's answer, and a peer
    that does not answer in time has the pushes queued for it dropped too (counted failed)."""

    def __init__(
        self,
        key_pair: KeyPair | None = None,
        timeout_s: float = 1.0,
        floor_bytes_s: float = 100e6,
        max_queued: int = 2 * MAX_PUSHES * MAX_PUSH_TO,
    ) -> None:
        self.key_pair = key_pair
        self.timeout_s = timeout_s
        self.floor_bytes_s = floor_bytes_s
        self.max_queued = max_queued
        self.counters = PushCounters()
        self._queue: list[PushJob] = []
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="chords-push", daemon=True)
        self._thread.start()

    def submit(self, job: PushJob) -> bool:
        """Queue ``job``; False (dropped, counted as failed) past the queue's bound."""
        with self._cond:
            if self._stop or len(self._queue) >= self.max_queued:
                self.counters.failed += 1
                return False
            self._queue.append(job)
            self._cond.notify_all()
            return True

    def idle(self, timeout_s: float) -> bool:
        """Wait until every queued push is done (tests); False past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _run(self) -> None:
        client = DataClient(key_pair=self.key_pair, timeout_s=self.timeout_s)
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    job = self._queue.pop(0)
                    self._busy = True
                try:
                    self._push(client, job)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            client.close()

    def _push(self, client: DataClient, job: PushJob) -> None:
        size = nbytes_of(job.tensor)
        wait = self.timeout_s + size / self.floor_bytes_s
        try:
            client.push(
                job.endpoint,
                job.request,
                [(job.ref, job.tensor)],
                server_key=job.key,
                timeout_s=wait,
            )
        except PeerTimeout as exc:
            # The peer is gone or does not admit us: the pushes queued for it would each wait
            # as long for nothing while the other readers' pushes queue behind them. Dropped
            # (their readers pull); a push submitted later tries the peer again.
            dropped = self._drop_queued(job.endpoint)
            self._failed(1)
            log.info(
                "push of %s to %s failed (%d more dropped): %s", job.ref, job.endpoint, dropped, exc
            )
            return
        except (DataPlaneError, WireError) as exc:  # the reader pulls it instead
            self._failed(1)
            log.info("push of %s to %s failed: %s", job.ref, job.endpoint, exc)
            return
        except Exception:  # a bug must not stop the pushes
            self._failed(1)
            log.exception("push of %s to %s failed", job.ref, job.endpoint)
            return
        with self._cond:
            self.counters.pushed += 1
            self.counters.bytes += size

    def _failed(self, count: int) -> None:
        with self._cond:  # (``submit`` counts from the compute thread)
            self.counters.failed += count

    def _drop_queued(self, endpoint: str) -> int:
        """Drop the queued pushes to ``endpoint`` (counted failed); how many."""
        with self._cond:
            kept = [job for job in self._queue if job.endpoint != endpoint]
            dropped = len(self._queue) - len(kept)
            self._queue = kept
            self.counters.failed += dropped
            self._cond.notify_all()
            return dropped

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
