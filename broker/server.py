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
import math
import signal
import sys
import time
from collections import deque
from typing import Any

import click
import zmq
from zmq.utils.monitor import parse_monitor_message

from chords_mq import __version__
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.core import BrokerCore, Send, TooManyPoolKeys
from chords_mq.broker.metrics import MetricsServer
from chords_mq.broker.peers import Role
from chords_mq.broker.tolerance import InvalidTolerance, expand_files
from chords_mq.keys import (
    CLIENT_DOMAIN,
    WORKER_DOMAIN,
    AllowList,
    KeyFileError,
    ZapHandler,
    is_loopback,
)
from chords_mq.logs import log_options, setup_logging
from chords_mq.options import (
    DAEMON_CONTEXT,
    ENDPOINT,
    METRICS_BIND,
    ConfigError,
    config_from_options,
    config_option,
    config_options,
)
from chords_mq.transport import NOW, PeerCongested, PeerUnreachable, readable, router, send_now
from chords_mq.wire import ErrorMessage, Kind, Message, WireError, decode

log = logging.getLogger("chords.broker")

PUMP_BUDGET = 256  # messages handled per loop callback before timers get a turn
CLIENT_OUTBOX = 4096  # messages one client may have waiting before it counts as gone
CLIENT_OUTBOX_BYTES = 1 << 30  # or tensor bytes (one message always fits)


class BrokerServer:
    """Runs a ``BrokerCore`` on two ROUTER sockets until the core has drained."""

    def __init__(
        self,
        core: BrokerCore,
        client_bind: str = "tcp://127.0.0.1:5555",
        worker_bind: str = "tcp://127.0.0.1:5556",
        client_send_timeout_s: float = 30.0,
        allow: AllowList | None = None,
    ) -> None:
        self.core = core
        self.allow = allow  # CURVE allow-lists; None: plain TCP (loopback or --insecure)
        self.zap: ZapHandler | None = None
        self.outbox_bytes: dict[bytes, int] = {}
        self.client_bind = client_bind
        self.worker_bind = worker_bind
        self.client_send_timeout_s = client_send_timeout_s
        self.outboxes: dict[bytes, deque[Message]] = {}
        self.stuck_since: dict[bytes, float] = {}
        self._stopped = asyncio.Event()
        self._alarm: asyncio.TimerHandle | None = None  # the next EVAL deadline's wake-up
        self._alarm_at = math.inf
        self._pump_scheduled = False
        self._closed = False  # the sockets are closed: callbacks still queued do nothing

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctx: zmq.Context[Any] = zmq.Context()
        allow = self.allow
        client_curve = worker_curve = None
        if allow is not None:
            # The ZAP handler must be bound before a CURVE socket takes its first connection.
            self.zap = ZapHandler(self.ctx, allow)
            client_curve = lambda sock: allow.serve(sock, CLIENT_DOMAIN)  # noqa: E731
            worker_curve = lambda sock: allow.serve(sock, WORKER_DOMAIN)  # noqa: E731
        self.clients = router(self.ctx, self.client_bind, secure=client_curve)
        self.workers = router(self.ctx, self.worker_bind, secure=worker_curve)
        self.monitor = self.workers.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sockets: tuple[Any, ...] = (self.clients, self.workers, self.monitor)
        if self.zap is not None:
            sockets += (self.zap.sock,)
            loop.add_reader(self.zap.sock.getsockopt(zmq.FD), self._authenticate)
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
            # A pump, tick or alarm already queued on the loop must not touch a closed socket
            # (it raised ENOTSOCK, "Socket operation on non-socket", after a drain).
            self._closed = True
            self._ticker.cancel()
            if self._alarm is not None:
                self._alarm.cancel()
            for sock in sockets:
                loop.remove_reader(sock.getsockopt(zmq.FD))
            self.workers.disable_monitor()
            for sock in sockets:
                sock.close(0)
            self.ctx.term()

    def _authenticate(self) -> None:
        assert self.zap is not None
        try:
            self.zap.handle()
        except Exception:  # a bug here must not stop the loop; the peer's handshake fails
            log.exception("ZAP handler failed")

    def reload_keys(self) -> None:
        """SIGHUP: re-read the allow-lists. A removed key loses access at its next message;
        every worker gets the pool's new worker keys (POOL) for its data server."""
        if self.allow is None:
            log.info("SIGHUP: no --curve folder to reload")
            return
        try:
            self.allow.reload()
        except Exception as exc:  # a half-written folder must not stop the broker
            log.error("SIGHUP: could not reload the keys: %s", exc)
            return
        try:
            sends = self.core.set_pool_keys(self.allow.keys["workers"])
        except TooManyPoolKeys as exc:
            log.error("SIGHUP: the workers keep the pool keys they have: %s", exc)
            return
        if not self._closed:
            self.emit(sends)

    def drain(self) -> None:
        """SIGTERM / SIGINT: the core stops taking requests and finishes or fails the rest."""
        if self._closed:
            return
        self.emit(self.core.begin_drain())

    # -- receiving -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Drain every socket without blocking. ZeroMQ's descriptor is edge-triggered and a send
        can consume its edge, so keep going until one full pass finds nothing to read."""
        self._pump_scheduled = False
        if self._closed:
            return
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
        while not self._closed and readable(self.monitor):
            self._monitor_event(self.monitor.recv_multipart(NOW))

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self._closed:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _peer(self, side: str, frames: list[zmq.Frame]) -> tuple[str | None, str] | None:
        """(principal, role) of a CURVE peer from the User-Id ZAP gave its connection, checked
        against the current allow-lists; None if its key is no longer listed."""
        if len(frames) < 2:
            return None
        _, _, key = str(frames[1].get("User-Id")).partition(":")
        assert self.allow is not None
        now = self.allow.role(WORKER_DOMAIN if side == "worker" else CLIENT_DOMAIN, key.encode())
        if now is None:
            return None
        return f"key:{key}", now

    def _deliver(self, side: str, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        principal: str | None = None
        role: Role = "client"
        if self.allow is not None:
            peer = self._peer(side, frames)
            if peer is None:
                return  # a key removed since it connected: it gets nothing
            principal, role = peer[0], "admin" if peer[1] == "admin" else "client"
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
            # Insecure, a worker is who its HELLO claims, on the host it connects from.
            address = None
            if principal is None and message.kind is Kind.HELLO:
                address = _peer_address(frames[1])
            self.emit(self.core.worker_message(identity, message, principal, address))
        else:
            self.emit(self.core.client_message(identity, message, principal, role))

    def _monitor_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.workers.getsockopt(zmq.EVENTS)  # let libzmq notice the pipe is gone first
            self.emit(self.core.connection_dropped())

    def _tick(self, interval: float) -> None:
        if self._closed:
            return
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
            except Exception as exc:  # unencodable, or the socket refused: the worker is lost
                log.error("could not send %s to worker %r: %s", message.kind.value, identity, exc)
                pending.extend(self.core.worker_unreachable(identity))
        if self.core.stopped:
            self._stopped.set()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """Wake at the earliest EVAL deadline, not only at the next tick: a hung worker's task
        is copied within its deadline."""
        deadline = self.core.next_deadline()
        if deadline is None or deadline >= self._alarm_at:
            return
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = deadline
        delay = max(0.0, deadline - self.core.clock()) + 0.001
        self._alarm = asyncio.get_running_loop().call_later(delay, self._on_alarm)

    def _on_alarm(self) -> None:
        self._alarm, self._alarm_at = None, math.inf
        if self._closed:
            return
        try:
            self.emit(self.core.tick(self.core.clock()))
            self._flush_clients()
        except Exception:  # as in _tick: housekeeping must go on
            log.exception("deadline check failed")
        self._schedule_pump()

    def _to_client(self, identity: bytes, message: Message, pending: deque[Send]) -> None:
        outbox = self.outboxes.get(identity)
        if outbox is None:
            outbox = self.outboxes[identity] = deque()
        size = sum(t.nbytes for t in message.tensors.values())
        held = self.outbox_bytes.get(identity, 0)
        if len(outbox) >= CLIENT_OUTBOX or (outbox and held + size > CLIENT_OUTBOX_BYTES):
            log.warning(
                "client %r has %d messages (%.0f MiB) waiting; disconnecting it and cancelling "
                "its requests",
                identity[:64],
                len(outbox),
                held / 2**20,
            )
            self._drop_client(identity, pending)
            return
        outbox.append(message)
        self.outbox_bytes[identity] = held + size
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
            message = outbox[0]
            try:
                send_now(self.clients, message, identity)
            except PeerCongested:
                since = self.stuck_since.setdefault(identity, time.monotonic())
                if time.monotonic() - since > self.client_send_timeout_s:
                    self._drop_client(identity, pending)
                return
            except PeerUnreachable:
                self._drop_client(identity, pending)
                return
            except Exception as exc:  # one unsendable message must not cut the client off
                self._unsendable(identity, message, exc)
            outbox.popleft()
            sent = sum(t.nbytes for t in message.tensors.values())
            self.outbox_bytes[identity] = max(0, self.outbox_bytes.get(identity, 0) - sent)
            self.stuck_since.pop(identity, None)
        del self.outboxes[identity]
        self.outbox_bytes.pop(identity, None)

    def _unsendable(self, identity: bytes, message: Message, exc: Exception) -> None:
        """A message that could not be sent (a bug: the core keeps replies under the limits):
        the client hears a small ERROR instead, so a request never waits for it forever."""
        log.error("could not send %s to client %r: %s", message.kind.value, identity[:64], exc)
        if isinstance(message, ErrorMessage) or message.request is None:
            return
        text = f"the broker could not send a {message.kind.value}"
        error = ErrorMessage(code="internal", message=text, request=message.request)
        with contextlib.suppress(Exception):
            send_now(self.clients, error, identity)

    def _drop_client(self, identity: bytes, pending: deque[Send]) -> None:
        self.outboxes.pop(identity, None)
        self.outbox_bytes.pop(identity, None)
        self.stuck_since.pop(identity, None)
        pending.extend(s for s in self.core.client_gone(identity) if s.to == "worker")


def _peer_address(frame: zmq.Frame) -> str | None:
    """The host a message came from (ZeroMQ's Peer-Address of its connection), if it says."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return address if isinstance(address, str) and address else None


@click.command(context_settings={"help_option_names": ["-h", "--help"], **DAEMON_CONTEXT})
@config_option
@click.option(
    "--client-bind",
    type=ENDPOINT,
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="Endpoint clients connect to (loopback unless you say otherwise).",
)
@click.option(
    "--worker-bind",
    type=ENDPOINT,
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="Endpoint workers connect to.",
)
@click.option(
    "--curve",
    "curve_dir",
    type=click.Path(file_okay=False),
    envvar="CHORDS_CURVE",
    default=None,
    help="CurveZMQ on both sockets: KEYS/broker.key_secret, and the allowed public keys in "
    "KEYS/clients/, KEYS/workers/ and KEYS/admins/ (re-read on SIGHUP).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Bind a non-loopback address without --curve: any peer that reaches it is trusted.",
)
@config_options(BrokerConfig)  # --heartbeat-ms ... --cores-policy: defaults and help there
@click.option(
    "--metrics-bind",
    type=METRICS_BIND,
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics and /healthz over HTTP here (e.g. 127.0.0.1:9100).",
)
@log_options
@click.version_option(__version__, prog_name="chords-broker")
def main(
    client_bind: str,
    worker_bind: str,
    curve_dir: str | None,
    insecure: bool,
    metrics_bind: tuple[str, int] | None,
    log_level: str,
    log_format: str,
    **settings: Any,
) -> None:
    """Run the chords-mq broker: owns every request's plan and streams hits to clients."""
    setup_logging("chords-broker", log_level, log_format)
    if curve_dir is None and not insecure:
        for endpoint in (client_bind, worker_bind):
            if not is_loopback(endpoint):
                raise click.UsageError(
                    f"refusing to bind {endpoint} without --curve KEYS: off loopback every "
                    "peer must authenticate (--insecure accepts any peer that reaches it)"
                )
    exposed = [endpoint for endpoint in (client_bind, worker_bind) if not is_loopback(endpoint)]
    if curve_dir is None and exposed:
        log.warning(
            "INSECURE: %s bound off loopback without --curve (--insecure). Any host that "
            "reaches it can submit requests, register as a worker and return wrong results, "
            "and knock a worker off the broker if it learns its routing id; a worker's "
            "quarantine follows only the name it claims. Use --curve KEYS off loopback "
            "(README, 'Across machines').",
            " and ".join(exposed),
        )
    allow = None
    if curve_dir is not None:
        try:
            allow = AllowList(curve_dir)
        except KeyFileError as exc:
            raise click.UsageError(str(exc)) from None
    try:
        if settings.get("verify_tolerance"):  # @FILE entries: chords-calibrate --out files
            settings["verify_tolerance"] = expand_files(settings["verify_tolerance"])
        config = config_from_options(
            BrokerConfig, settings, client_endpoint=client_bind, worker_endpoint=worker_bind
        )
    except InvalidTolerance as exc:
        raise click.UsageError(str(exc)) from None
    core = BrokerCore(config)
    if allow is not None:
        try:
            core.set_pool_keys(allow.keys["workers"])  # no worker yet: nothing to send
        except TooManyPoolKeys as exc:
            raise click.UsageError(f"--curve {curve_dir}: {exc}") from None
    server = BrokerServer(core, client_bind, worker_bind, allow=allow)
    gc.collect()  # the imports' long-lived objects: keep the cyclic collector off them
    gc.freeze()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.drain)
        loop.add_signal_handler(signal.SIGHUP, server.reload_keys)
        metrics = None
        if metrics_bind is not None:
            metrics = MetricsServer(server.core, *metrics_bind)
            try:
                await metrics.start()
            except OSError as exc:
                raise ConfigError(f"--metrics-bind: cannot listen: {exc.strerror}") from None
        try:
            await server.run()
        finally:
            if metrics is not None:
                await metrics.close()

    try:
        asyncio.run(serve())
    except zmq.ZMQError as exc:  # the port is in use, or the address is not this host's
        raise ConfigError(f"cannot bind: {exc}") from None
    with contextlib.suppress(Exception):
        sys.stdout.flush()
