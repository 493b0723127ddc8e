"""chords-broker's I/O edge: sockets, the monitor, client outboxes, signals and ``main``.

Every decision is ``BrokerCore``'s; this module only moves bytes. It is an asyncio program: the
event loop watches the file descriptors of two plain ZeroMQ ROUTER sockets (clients, workers)
and the worker socket's monitor, and when one is readable it drains every socket without
blocking, feeds each decoded message to the core and sends what the core returns at once
(``DONTWAIT``). No futures or tasks per message: the hot path is one loop callback. A slow or
vanished client never stalls the loop: its messages wait in its own bounded outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections import deque
from typing import Any

import click
import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.core import BrokerConfig, BrokerCore, Send
from chords_mq import __version__
from chords_mq.transport import NOW, PeerCongested, PeerUnreachable, readable, router, send_now
from chords_mq.wire import Message, WireError, decode

log = logging.getLogger("chords.broker")

PUMP_BUDGET = 256  # messages handled per loop callback before timers get a turn
CLIENT_OUTBOX = 4096  # messages one client may have waiting before it counts as gone


class BrokerServer:
    """Runs a ``BrokerCore`` on two ROUTER sockets until the core has drained."""

    def __init__(
        self,
        core: BrokerCore,
        client_bind: str = "tcp://127.0.0.1:5555",
        worker_bind: str = "tcp://127.0.0.1:5556",
        client_send_timeout_s: float = 30.0,
    ) -> None:
        self.core = core
        self.client_bind = client_bind
        self.worker_bind = worker_bind
        self.client_send_timeout_s = client_send_timeout_s
        self.outboxes: dict[bytes, deque[Message]] = {}
        self.stuck_since: dict[bytes, float] = {}
        self._stopped = asyncio.Event()
        self._pump_scheduled = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.clients = router(self.ctx, self.client_bind)
        self.workers = router(self.ctx, self.worker_bind)
        self.monitor = self.workers.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sockets = (self.clients, self.workers, self.monitor)
        log.info(
            "broker epoch %d: clients on %s, workers on %s",
            self.core.epoch,
            self.client_bind,
            self.worker_bind,
        )
        for sock in (self.clients, self.workers):
            loop.add_reader(sock.getsockopt(zmq.FD), self._pump)
        loop.add_reader(self.monitor.getsockopt(zmq.FD), self._watch)
        interval = min(0.1, self.core.config.heartbeat_s / 2)
        ticker = loop.call_later(interval, self._tick, interval)
        self._ticker: asyncio.TimerHandle = ticker
        loop.call_soon(self._pump)
        try:
            await self._stopped.wait()
            deadline = time.monotonic() + 1.0  # let final ERRORs and DONEs reach the clients
            while self.outboxes and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                self._flush_clients()
        finally:
            self._ticker.cancel()
            for sock in sockets:
                loop.remove_reader(sock.getsockopt(zmq.FD))
            self.workers.disable_monitor()
            for sock in sockets:
                sock.close(0)
            self.ctx.term()

    def drain(self) -> None:
        """SIGTERM / SIGINT: the core stops taking requests and finishes or fails the rest."""
        self.emit(self.core.begin_drain())

    # -- receiving -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Drain every socket without blocking. ZeroMQ's descriptor is edge-triggered and a send
        can consume its edge, so keep going until one full pass finds nothing to read."""
        self._pump_scheduled = False
        budget = PUMP_BUDGET
        workers, clients = self.workers, self.clients
        while budget > 0:
            busy = False
            while budget > 0 and readable(workers):
                self._deliver("worker", workers.recv_multipart(NOW, copy=False))
                busy, budget = True, budget - 1
            while budget > 0 and readable(clients):
                self._deliver("client", clients.recv_multipart(NOW, copy=False))
                busy, budget = True, budget - 1
            if not busy:
                return
        self._schedule_pump()  # more waiting: let the timers run first

    def _watch(self) -> None:
        """The monitor's descriptor fired: read its events (nothing else sends on it)."""
        while readable(self.monitor):
            self._monitor_event(self.monitor.recv_multipart(NOW))

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _deliver(self, side: str, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        try:
            message = decode(frames[1:])
        except WireError as exc:
            self.emit(
                self.core.bad_message(
                    "worker" if side == "worker" else "client", identity, str(exc)
                )
            )
            return
        if side == "worker":
            self.emit(self.core.worker_message(identity, message))
        else:
            self.emit(self.core.client_message(identity, message))

    def _monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.workers.getsockopt(zmq.EVENTS)  # let libzmq notice the pipe is gone first
            self.emit(self.core.connection_dropped())

    def _tick(self, interval: float) -> None:
        try:
            self.emit(self.core.tick(self.core.clock()))
            self._flush_clients()
        except Exception:  # a bug in housekeeping must not stop heartbeats for good
            log.exception("tick failed")
        self._ticker = asyncio.get_running_loop().call_later(interval, self._tick, interval)
        self._schedule_pump()

    # -- sending ---------------------------------------------------------------------------------

    def emit(self, sends: list[Send]) -> None:
        """Send what the core decided; what cannot be sent goes back to the core as an event."""
        pending = deque(sends)
        while pending:
            to, identity, message = pending.popleft()
            if to == "client":
                self._to_client(identity, message, pending)
                continue
            try:
                send_now(self.workers, message, identity)
            except (PeerUnreachable, PeerCongested):
                pending.extend(self.core.worker_unreachable(identity))
            except WireError as exc:
                log.error("could not encode %s for worker %r: %s", message.kind, identity, exc)
        if self.core.stopped:
            self._stopped.set()

    def _to_client(self, identity: bytes, message: Message, pending: deque[Send]) -> None:
        outbox = self.outboxes.get(identity)
        if outbox is None:
            outbox = self.outboxes[identity] = deque()
        if len(outbox) >= CLIENT_OUTBOX:
            log.warning("client %r has %d messages waiting; dropping it", identity, len(outbox))
            self._drop_client(identity, pending)
            return
        outbox.append(message)
        self._flush_client(identity, pending)

    def _flush_clients(self) -> None:
        pending: deque[Send] = deque()
        for identity in list(self.outboxes):
            self._flush_client(identity, pending)
        if pending:
            self.emit(list(pending))

    def _flush_client(self, identity: bytes, pending: deque[Send]) -> None:
        outbox = self.outboxes[identity]
        while outbox:
            try:
                send_now(self.clients, outbox[0], identity)
            except PeerCongested:
                since = self.stuck_since.setdefault(identity, time.monotonic())
                if time.monotonic() - since > self.client_send_timeout_s:
                    self._drop_client(identity, pending)
                return
            except PeerUnreachable:
                self._drop_client(identity, pending)
                return
            except WireError as exc:  # one unsendable message must not cut the client off
                log.error("could not encode %s for client %r: %s", outbox[0].kind, identity, exc)
            outbox.popleft()
            self.stuck_since.pop(identity, None)
        del self.outboxes[identity]

    def _drop_client(self, identity: bytes, pending: deque[Send]) -> None:
        self.outboxes.pop(identity, None)
        self.stuck_since.pop(identity, None)
        pending.extend(s for s in self.core.client_gone(identity) if s.to == "worker")


def parse_bytes(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1e9`` or a plain number of bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    units.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1})
    cleaned = text.strip().lower()
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if cleaned.endswith(suffix):
            number, scale = cleaned[: -len(suffix)].strip(), factor
            break
    else:
        number, scale = cleaned, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 8GiB or 512MiB") from None
    if not value >= 1:
        raise click.BadParameter(f"{text!r}: a size must be at least one byte")
    return int(value)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--client-bind",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="Endpoint clients connect to (loopback unless you say otherwise).",
)
@click.option(
    "--worker-bind",
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="Endpoint workers connect to.",
)
@click.option("--heartbeat-ms", type=click.IntRange(min=20), default=250, show_default=True)
@click.option(
    "--liveness",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Missed heartbeats before a worker is declared dead.",
)
@click.option(
    "--worker-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds a request waits for a capable worker before it fails.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds SIGTERM waits for running requests.",
)
@click.option(
    "--max-task-retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Failures of one task (or prepare, or decode) before its request fails.",
)
@click.option(
    "--max-request-bytes",
    default="8GiB",
    show_default=True,
    help="Refuse (too_large) a request whose latents would hold more than this in the broker.",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.version_option(__version__, prog_name="chords-broker")
def main(
    client_bind: str,
    worker_bind: str,
    heartbeat_ms: int,
    liveness: int,
    worker_timeout: float,
    drain_timeout: float,
    max_task_retries: int,
    max_request_bytes: str,
    log_level: str,
) -> None:
    """Run the chords-mq broker: owns every request's plan and streams hits to clients."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s chords-broker %(levelname)s %(message)s",
    )
    config = BrokerConfig(
        heartbeat_s=heartbeat_ms / 1000.0,
        liveness=liveness,
        worker_timeout_s=worker_timeout,
        drain_timeout_s=drain_timeout,
        max_task_retries=max_task_retries,
        max_request_bytes=parse_bytes(max_request_bytes),
    )
    server = BrokerServer(BrokerCore(config), client_bind, worker_bind)
    gc.collect()  # the imports' long-lived objects: keep the cyclic collector off them
    gc.freeze()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.drain)
        await server.run()

    try:
        asyncio.run(serve())
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind: {exc}") from None
    with contextlib.suppress(Exception):
        sys.stdout.flush()
