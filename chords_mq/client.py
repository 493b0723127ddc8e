"""AsyncClient: submit requests to a chords-broker and stream their hits, fastest core first.

One DEALER socket per client, one receiver task that routes messages to per-request queues, and
a heartbeat task. The heartbeat replies carry the broker's epoch: when it changes (the broker
restarted) or the broker no longer lists a running request, the client submits it again under
the same id. Outputs are deterministic given the seed, so the user only sees a delay, and hits
already delivered are not repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio

from chords_mq.errors import ChordsError
from chords_mq.keys import curve_client
from chords_mq.request import RequestSpec
from chords_mq.transport import PeerCongested, dealer, decode_frames, send, stable_identity
from chords_mq.wire import (
    DTYPES,
    HEARTBEAT_IDS,
    AcceptedMessage,
    CancelMessage,
    DoneMessage,
    ErrorMessage,
    HeartbeatMessage,
    HitMessage,
    Message,
    PartMessage,
    ProgressMessage,
    StatusMessage,
    SubmitMessage,
    WireError,
    bytes_as,
)

# Hits' latents one request may have coming in PARTs at once (one per core; a request has at
# most this many): the pieces a broker could make a client hold are bounded.
MAX_STREAMS = 64


class _Resubmitted:
    """Queued for a stream when the client submitted its request again (a broker restart)."""


async def within(awaitable: Any, timeout: float | None) -> Any:
    """``await awaitable`` for at most ``timeout`` seconds (None: no limit), raising
    ``asyncio.TimeoutError`` past it, like ``asyncio.wait_for``, except that a cancellation is
    never lost. Before Python 3.12, ``wait_for`` cancelled at the moment its awaitable completes
    returns the result and drops the cancellation: a Ctrl-C landing as a hit or a progress
    message arrives left ``chords run`` streaming to the end."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


class RequestFailed(ChordsError):
    """The broker could not finish a request; ``code`` says why (no_worker, invalid_request ...)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # with code "busy": when trying again is worth it


class RequestTimeout(ChordsError, TimeoutError):
    """A request (or a status call) did not finish within its timeout."""


class BrokerSilent(RequestTimeout):
    """No broker answered at the client's address: nothing accepted a request or a status call
    in time, or no connection took a message."""


class BrokerLost(RequestFailed):
    """The broker went silent while a request ran (killed, or its host or link is down) and
    did not come back within the client's ``broker_lost_after_s``; ``code`` is ``broker_lost``.
    A broker restarted within that time takes the request back instead (same id, same hits)."""

    def __init__(self, address: str, silent_s: float, request_id: str) -> None:
        super().__init__(
            "broker_lost",
            f"the broker at {address} has been silent for {silent_s:.0f}s; request "
            f"{request_id} is lost (the client waits broker_lost_after_s for a restarted "
            "broker to take it back)",
        )
        self.address = address
        self.silent_s = silent_s


@dataclass(frozen=True)
class ClientHit:
    """One core's output as the client sees it."""

    request: str
    core: int
    round: int
    steps: int
    elapsed_s: float
    latent: torch.Tensor | None  # None when the request asked for output="media"
    media: torch.Tensor | None = None  # decoded pixels (uint8) with output "media" or "both"

    @property
    def speedup(self) -> float:
        """The round-speedup ``N / round`` of this hit."""
        return self.steps / self.round


@dataclass
class _Pending:
    spec: RequestSpec
    queue: asyncio.Queue[Message | _Resubmitted] = field(default_factory=asyncio.Queue)
    epoch: int | None = None
    finished: bool = False
    cores_seen: set[int] = field(default_factory=set)
    wait_for_worker_s: float | None = None
    # a hit's latent coming in PARTs, by core: the decode they are of (the header's task) and
    # the pieces so far; a piece of another decode, or of index 0, starts over
    pieces: dict[int, tuple[int | None, list[torch.Tensor]]] = field(default_factory=dict)

    def piece(self, message: PartMessage) -> None:
        """Keep a piece of a hit's latent until its HIT comes (``broker.parts``)."""
        core = message.core or 0
        decode, kept = self.pieces.get(core, (None, None))
        if kept is None or message.index == 0 or decode != message.task:
            if kept is None and len(self.pieces) >= MAX_STREAMS:
                return  # (more latents at once than a request has cores: a broker bug)
            kept = []
            self.pieces[core] = (message.task, kept)
        if len(kept) == message.index:  # else a gap: the HIT will say what is missing
            kept.append(message.data)

    def assembled(self, message: HitMessage) -> HitMessage | ErrorMessage:
        """The HIT with its latent made of its decode's pieces that came before it; an ERROR if
        they do not make it."""
        decode, kept = self.pieces.pop(message.core, (None, []))
        if decode != message.task:
            kept = []
        dtype = DTYPES.get(message.dtype or "")
        shape = message.shape or []
        expected = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
        got = sum(piece.numel() for piece in kept)
        if dtype is None or len(kept) != message.parts or got != expected:
            text = (
                f"the hit of core {message.core} came in {len(kept)} of {message.parts} pieces, "
                f"{got} of {expected} bytes"
            )
            return ErrorMessage(code="bad_hit", message=text, request=message.request)
        latent = bytes_as(torch.cat(kept), dtype).view(shape)
        return dataclasses.replace(
            message, latent=latent, parts=None, shape=None, dtype=None, task=None
        )


class RequestStream:
    """An async iterator over one request's hits; ``accepted``, ``progress`` and ``stats`` fill
    in as the broker reports them. Leaving the loop early cancels the request."""

    def __init__(
        self,
        client: AsyncClient,
        request_id: str,
        spec: RequestSpec,
        timeout: float | None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        wait_for_worker: float | None = None,
    ) -> None:
        self.client = client
        self.on_progress = on_progress
        self.wait_for_worker = wait_for_worker
        self.id = request_id
        self.spec = spec
        self.timeout = timeout
        self.accepted: dict[str, Any] | None = None
        self.progress: dict[str, Any] = {}
        self.stats: dict[str, Any] | None = None
        self.resubmissions = 0
        self._over = False

    @property
    def waiting(self) -> dict[str, Any] | None:
        """While the request waits for a worker (none serves its model now): the model, the
        seconds waited (``since_s``) and left before it fails (``fails_in_s``); else None."""
        waiting: dict[str, Any] | None = self.progress.get("waiting")
        return waiting

    def __aiter__(self) -> AsyncIterator[ClientHit]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ClientHit]:
        client = self.client
        pending = _Pending(self.spec, wait_for_worker_s=self.wait_for_worker)
        client._pending[self.id] = pending
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        answer_by = time.monotonic() + client.accept_timeout_s
        self._over = False  # DONE or ERROR came (or the broker is gone): nothing to cancel
        try:
            await client._submit(self.id, pending)
            while True:
                # (outside the try: the request's own RequestTimeout is a TimeoutError too)
                wait = self._wait_s(deadline, answer_by)
                try:
                    message = await within(pending.queue.get(), wait)
                except asyncio.TimeoutError:
                    self._silence(deadline)
                    continue
                if isinstance(message, HitMessage):
                    if message.core in pending.cores_seen:
                        continue  # a resubmitted request repeats hits we already gave out
                    pending.cores_seen.add(message.core)
                    yield ClientHit(
                        self.id,
                        message.core,
                        message.round,
                        message.steps,
                        float(message.elapsed_s),
                        message.latent,
                        message.media,
                    )
                elif self._take(message):
                    return
        finally:
            client._pending.pop(self.id, None)
            if not self._over and client._sock is not None:
                with contextlib.suppress(Exception):
                    await client._send(CancelMessage(request=self.id), 1.0)

    def _wait_s(self, deadline: float | None, answer_by: float) -> float | None:
        """How long to wait for the next message: up to the request's timeout, and before
        ACCEPTED up to ``accept_timeout_s``, after it up to ``broker_lost_after_s`` past the
        broker's last word."""
        client = self.client
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RequestTimeout(f"request {self.id} timed out after {self.timeout}s")
        left = math.inf if remaining is None else remaining
        if self.accepted is None:  # say so instead of waiting forever on a missing broker
            return min(left, answer_by - time.monotonic())
        if client.broker_lost_after_s is not None:
            lost_at = client.last_heard + client.broker_lost_after_s
            return max(0.0, min(left, lost_at - time.monotonic()))
        return remaining

    def _silence(self, deadline: float | None) -> None:
        """Nothing came in time: the broker never answered, or went silent after ACCEPTED
        (typed errors), or only the request's own deadline is near (go on)."""
        client, now = self.client, time.monotonic()
        if self.accepted is None and (deadline is None or now < deadline):
            raise BrokerSilent(
                f"no answer from a broker at {client.address} in "
                f"{client.accept_timeout_s:g}s (is chords-broker running?)"
            ) from None
        silent, lost_after = now - client.last_heard, client.broker_lost_after_s
        if self.accepted is not None and lost_after is not None and silent >= lost_after:
            self._over = True  # no CANCEL: it could only wait for a broker that is gone
            raise BrokerLost(client.address, silent, self.id) from None

    def _take(self, message: Message | _Resubmitted) -> bool:
        """Take in a message other than a HIT; True when the request is over (DONE)."""
        if isinstance(message, AcceptedMessage):
            self.accepted = message.body()
        elif isinstance(message, ProgressMessage):
            self.progress = message.body()
            if self.on_progress is not None:
                self.on_progress(self.progress)
        elif isinstance(message, DoneMessage):
            self._over = True
            self.stats = message.stats
            return True
        elif isinstance(message, ErrorMessage):
            # (bad_hit is this client's own finding: the broker runs on, so it is cancelled)
            self._over = message.code != "bad_hit"
            raise RequestFailed(message.code, message.message, message.retry_after_s)
        elif isinstance(message, _Resubmitted):
            self.resubmissions += 1
        return False


class AsyncClient:
    """``async with AsyncClient("tcp://127.0.0.1:5555") as client: ...``

    Across machines, give the client its key pair and the broker's public key (files from
    ``chords keygen``): ``AsyncClient(address, curve_secret="me.key_secret",
    broker_key="broker.key")``. Both, or neither.
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        heartbeat_s: float = 0.5,
        accept_timeout_s: float = 30.0,
        broker_lost_after_s: float | None = 60.0,
        curve_secret: str | os.PathLike[str] | None = None,
        broker_key: str | os.PathLike[str] | None = None,
    ) -> None:
        if broker_lost_after_s is not None and not broker_lost_after_s > 0:
            raise ValueError(
                f"broker_lost_after_s must be positive or None, not {broker_lost_after_s!r}"
            )
        self.address = address
        self.curve = curve_client(curve_secret, broker_key)
        self.accept_timeout_s = accept_timeout_s
        # A running request fails with BrokerLost once the broker has been silent this long
        # (None: no bound but the request's own timeout). The broker answers every heartbeat, so
        # silence means it is gone; 60 s leaves a restarted broker time to take requests back.
        self.broker_lost_after_s = broker_lost_after_s
        self.last_heard = time.monotonic()  # when the broker last sent us anything
        self.heartbeat_s = heartbeat_s
        self.broker_epoch: int | None = None
        self._pending: dict[str, _Pending] = {}
        self._status: asyncio.Future[dict[str, Any]] | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._page = 0

    async def __aenter__(self) -> AsyncClient:
        self._ctx = zmq.asyncio.Context()
        self._sock = dealer(self._ctx, self.address, stable_identity("client"), curve=self.curve)
        self.last_heard = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._beat())]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a task that ignored its cancel must not hang close()
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def generate(
        self,
        model: str,
        *,
        method: str = "chords",
        steps: int = 50,
        cores: int | None = None,
        init_sequence: list[int] | None = None,
        stop: str | None = None,
        seed: int = 0,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        batch: int = 1,
        output: str = "latent",
        tolerance: float | None = None,
        iterations: int | None = None,
        exact_cores: bool = False,
        wait_for_worker: float | None = None,
    ) -> RequestStream:
        """Submit a request; iterate the result to receive its hits as they arrive.

        Bad arguments raise ``InvalidRequest`` here, before anything is sent. ``batch`` > 1 lets
        a worker evaluate up to that many ready tasks in one forward: faster on big pools, but
        no longer bitwise equal to the sequential pipeline (batch shape changes GEMM blocking).
        ``output`` is "latent", "media" (a worker decodes each hit) or "both". ``method`` is
        "chords", "sequential" or a baseline ("paradigms" with ``tolerance``, "srds",
        "srds-parareal" with ``iterations``); ``cores`` is K, the workers used at once: the
        most it wants, a broker under load may grant fewer (``accepted["cores"]``) unless
        ``exact_cores``. ``wait_for_worker``: see ``submit``.
        """
        spec = RequestSpec(
            model=model,
            method=method,
            steps=steps,
            cores=cores,
            init_sequence=None if init_sequence is None else tuple(init_sequence),
            stop=stop,
            seed=seed,
            params=params or {},
            batch=batch,
            output=output,
            tolerance=tolerance,
            iterations=iterations,
            exact_cores=exact_cores,
        )
        return self.submit(
            spec,
            timeout=timeout,
            request_id=request_id,
            on_progress=on_progress,
            wait_for_worker=wait_for_worker,
        )

    def submit(
        self,
        spec: RequestSpec,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        wait_for_worker: float | None = None,
    ) -> RequestStream:
        """Like ``generate``, for a request already built as a ``RequestSpec``. A model that
        no worker serves fails at once (``no_worker``, naming the served models) unless
        ``wait_for_worker`` gives the seconds to wait for one."""
        return RequestStream(
            self, request_id or uuid.uuid4().hex, spec, timeout, on_progress, wait_for_worker
        )

    async def cancel(self, request_id: str) -> None:
        await self._send(CancelMessage(request=request_id))

    async def status(self, timeout: float = 5.0, max_pages: int = 64) -> dict[str, Any]:
        """The broker's view: its workers and your running requests (an admin key's: every
        request). The broker answers in pages; this gathers up to ``max_pages`` of them."""
        deadline = time.monotonic() + timeout
        merged: dict[str, Any] = {}
        offset = 0
        for _ in range(max_pages):
            page = await self._status_page(offset, max(0.01, deadline - time.monotonic()))
            if not merged:
                merged = dict(page)
            else:
                merged["workers"] += page.get("workers", [])
                merged["sessions"] += page.get("sessions", [])
            shown = max(len(page.get("workers", [])), len(page.get("sessions", [])))
            offset += shown
            totals = max(page.get("workers_total", 0), page.get("sessions_total", 0))
            if shown == 0 or offset >= totals:
                break
        return merged

    async def _status_page(self, offset: int, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._status = loop.create_future()
        await self._send(StatusMessage(offset=offset or None))
        try:
            result: dict[str, Any] = await within(self._status, timeout)
            return result
        except asyncio.TimeoutError:
            raise BrokerSilent(f"no STATUS reply from {self.address} in {timeout}s") from None

    async def _send(self, message: Message, timeout: float | None = None) -> None:
        """Send, waiting at most ``timeout`` (default ``accept_timeout_s``) for the socket to
        take it. A DEALER with no connection (no broker, or a CURVE handshake the broker
        refused) blocks sends, so an unbounded wait would hang the caller."""
        if self._sock is None:
            raise ChordsError("the client is closed")
        limit = self.accept_timeout_s if timeout is None else timeout
        try:
            await within(send(self._sock, message, block=True), limit)
        except asyncio.TimeoutError:
            raise BrokerSilent(
                f"could not send {message.kind.value} to {self.address} in {limit:g}s: no "
                "connection "
                "(is chords-broker running there, and are --curve-secret and --broker-key the "
                "keys it allows?)"
            ) from None

    async def _submit(self, request_id: str, pending: _Pending) -> None:
        submit = SubmitMessage(
            spec=pending.spec.to_dict(),
            wait_for_worker_s=pending.wait_for_worker_s,
            hit_parts=True,
            request=request_id,
        )
        await self._send(submit)

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            self.last_heard = time.monotonic()
            try:
                message = decode_frames(frames)
            except WireError:
                continue  # nothing useful to do with a malformed reply; the request times out
            if isinstance(message, ErrorMessage) and message.request is None:
                self._connection_error(message)
            elif isinstance(message, HeartbeatMessage):
                await self._on_heartbeat(message)
            elif isinstance(message, StatusMessage):
                if self._status is not None and not self._status.done():
                    self._status.set_result(message.body())
            elif message.request is not None and message.request in self._pending:
                pending = self._pending[message.request]
                if isinstance(message, PartMessage):
                    pending.piece(message)
                    continue
                if isinstance(message, HitMessage) and message.parts is not None:
                    message = pending.assembled(message)
                if isinstance(message, AcceptedMessage):
                    pending.epoch = message.epoch
                    self.broker_epoch = message.epoch
                if isinstance(message, (DoneMessage, ErrorMessage)):
                    pending.finished = True
                pending.queue.put_nowait(message)

    def _connection_error(self, message: ErrorMessage) -> None:
        """An ERROR about the connection rather than one request. ``wrong_port`` (this address
        is the broker's worker port) fails every request and status call of this client at
        once, with the port to use; other codes concern a message we sent and are dropped."""
        if message.code != "wrong_port":
            return
        error = RequestFailed("wrong_port", f"{self.address}: {message.message}")
        if self._status is not None and not self._status.done():
            self._status.set_exception(error)
        for request_id, pending in self._pending.items():
            if not pending.finished:
                pending.finished = True
                pending.queue.put_nowait(
                    ErrorMessage(code=error.code, message=error.message, request=request_id)
                )

    def _waiting(self) -> list[str]:
        """The accepted, unfinished requests, one page of them per heartbeat, in turn."""
        waiting = [
            rid for rid, p in self._pending.items() if not p.finished and p.epoch is not None
        ]
        if len(waiting) <= HEARTBEAT_IDS:
            return waiting
        start = self._page % len(waiting)
        self._page += HEARTBEAT_IDS
        return (waiting[start:] + waiting[:start])[:HEARTBEAT_IDS]

    async def _on_heartbeat(self, message: HeartbeatMessage) -> None:
        restarted = self.broker_epoch is not None and message.epoch != self.broker_epoch
        self.broker_epoch = message.epoch
        missing = set(message.missing or [])
        for request_id, pending in list(self._pending.items()):
            if pending.finished or pending.epoch is None:
                continue
            if restarted or pending.epoch != message.epoch or request_id in missing:
                try:
                    await self._submit(request_id, pending)
                except RequestTimeout:
                    continue  # no connection now: the next heartbeat tries again
                pending.epoch = None
                pending.queue.put_nowait(_Resubmitted())

    async def _beat(self) -> None:
        while True:
            # Never a waiting send here: with no connection the beat is skipped, and a plain
            # await is always cancellable (asyncio.wait_for can swallow a cancel in 3.11).
            if self._sock is not None:
                beat = HeartbeatMessage(in_flight=self._waiting())
                with contextlib.suppress(PeerCongested):
                    await send(self._sock, beat)
            await asyncio.sleep(self.heartbeat_s)


class Client:
    """A small blocking wrapper for scripts: ``Client(address).generate(...)`` -> list of hits."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", **options: Any) -> None:
        self.address = address
        self.options = options  # AsyncClient's: curve_secret, broker_key, accept_timeout_s

    def generate(self, model: str, **kwargs: Any) -> list[ClientHit]:
        async def collect() -> list[ClientHit]:
            async with AsyncClient(self.address, **self.options) as client:
                return [hit async for hit in client.generate(model, **kwargs)]

        return asyncio.run(collect())

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        async def ask() -> dict[str, Any]:
            async with AsyncClient(self.address, **self.options) as client:
                return await client.status(timeout)

        return asyncio.run(ask())
