"""chords-broker: runs every request's plan and dispatches its tasks to workers over ZeroMQ.

Two ROUTER sockets (clients, workers) on one asyncio event loop. All state (registry, sessions,
client outboxes) is plain data owned by this loop; each message kind has one handler named after
it. Failures are values: a malformed message, a dead worker or an adapter error becomes an
ERROR for one request or a re-queued task, never a crashed broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from broker.dispatch import FairDispatcher
from broker.registry import Job, WorkerInfo, WorkerRegistry
from broker.session import RequestSession
from chords_mq import __version__
from chords_mq.algorithms.base import Hit
from chords_mq.errors import ChordsError
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_from_spec
from chords_mq.transport import (
    PeerCongested,
    PeerUnreachable,
    decode_frames,
    router,
    send,
    send_now,
)
from chords_mq.wire import PROTOCOL_VERSION, Message, WireError, task_entries

log = logging.getLogger("chords.broker")
Handler = Callable[[bytes, Message], Awaitable[None]]


class Broker:
    def __init__(
        self,
        client_bind: str = "tcp://127.0.0.1:5555",
        worker_bind: str = "tcp://127.0.0.1:5556",
        heartbeat_ms: int = 250,
        liveness: int = 3,
        worker_timeout_s: float = 30.0,
        drain_timeout_s: float = 30.0,
        max_task_retries: int = 3,
    ) -> None:
        self.client_bind = client_bind
        self.worker_bind = worker_bind
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.worker_timeout_s = worker_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.max_task_retries = max_task_retries
        self.epoch = int.from_bytes(os.urandom(6), "big") + 1
        self.registry = WorkerRegistry(timeout_s=liveness * self.heartbeat_s)
        self.sessions: dict[str, RequestSession] = {}
        self.dispatcher = FairDispatcher()
        self.outboxes: dict[bytes, asyncio.Queue[Message]] = {}
        self.draining = False
        self.stop = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()
        self.worker_handlers: dict[str, Handler] = {
            "HELLO": self.HELLO,
            "HEARTBEAT": self.worker_HEARTBEAT,
            "PREPARED": self.PREPARED,
            "RESULT": self.RESULT,
            "DECODED": self.DECODED,
            "FAILED": self.FAILED,
            "DISCONNECT": self.worker_DISCONNECT,
        }
        self.client_handlers: dict[str, Handler] = {
            "SUBMIT": self.SUBMIT,
            "CANCEL": self.CANCEL,
            "STATUS": self.STATUS,
            "HEARTBEAT": self.client_HEARTBEAT,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        self.clients = router(ctx, self.client_bind)
        self.workers = router(ctx, self.worker_bind)
        monitor = self.workers.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        log.info(
            "broker epoch %d: clients on %s, workers on %s",
            self.epoch,
            self.client_bind,
            self.worker_bind,
        )
        loops = [
            asyncio.create_task(self._receive(self.clients, self.client_handlers, "client")),
            asyncio.create_task(self._receive(self.workers, self.worker_handlers, "worker")),
            asyncio.create_task(self._watch(monitor)),
            asyncio.create_task(self._tick()),
        ]
        try:
            await self.stop.wait()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            self.workers.disable_monitor()
            for sock in (monitor, self.clients, self.workers):
                sock.close(0)
            ctx.term()

    async def drain(self) -> None:
        """SIGTERM: refuse new work, let running requests finish, fail what is left, stop."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d request(s), up to %.0fs", len(self.sessions), self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            self._fail(session, "shutdown", "the broker is shutting down")
        await self._flush_outboxes(1.0)
        for identity in list(self.registry.workers):
            self._to_worker(identity, Message("DISCONNECT", {"reason": "broker shutting down"}))
        self.stop.set()

    async def _flush_outboxes(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(not q.empty() for q in self.outboxes.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(
        self, sock: zmq.asyncio.Socket, handlers: dict[str, Handler], side: str
    ) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                message = decode_frames(frames[1:])
                handler = handlers.get(message.kind)
                if handler is None:
                    raise WireError(f"a {side} may not send {message.kind}")
            except WireError as exc:
                await self._reject(side, identity, str(exc))
                continue
            try:
                await handler(identity, message)
            except Exception:  # one bad message must never take the broker down
                log.exception("handling %s from %s %r failed", message.kind, side, identity)
                session = self.sessions.get(message.request or "")
                if session is not None:
                    self._fail(session, "internal", f"broker error handling {message.kind}")
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand every ready task an idle worker (no round barrier). Never raises: a bug here
        is logged, and the loop goes on serving."""
        try:
            self._assign_idle_workers()
        except Exception:
            log.exception("dispatch failed")

    async def _reject(self, side: str, identity: bytes, reason: str) -> None:
        log.warning("rejected a malformed message from %s %r: %s", side, identity, reason)
        if side == "client":
            self._client_error(identity, "bad_message", reason, None)
        else:
            if self.registry.get(identity) is not None:
                self._worker_lost(identity, f"sent a malformed message: {reason}")
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fast path for dead workers: on a TCP disconnect, probe every worker at once."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for identity in list(self.registry.workers):
                    self._to_worker(identity, Message("HEARTBEAT", epoch=self.epoch))
                self._dispatch()

    async def _tick(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(min(0.1, self.heartbeat_s / 2))
            try:
                last_beat = self._tick_once(last_beat)
            except Exception:  # a bug in housekeeping must not stop heartbeats for good
                log.exception("tick failed")

    def _tick_once(self, last_beat: float) -> float:
        now = time.monotonic()
        for worker in self.registry.expired():
            self._worker_lost(worker.identity, "missed heartbeats")
        if now - last_beat >= self.heartbeat_s:
            last_beat = now
            for identity in list(self.registry.workers):
                self._to_worker(identity, Message("HEARTBEAT", epoch=self.epoch))
        for session in list(self.sessions.values()):
            self._check_capacity(session, now)
        self._dispatch()
        return last_beat

    def _check_capacity(self, session: RequestSession, now: float) -> None:
        if self.registry.serving(session.model):
            session.no_worker_since = None
            return
        if session.no_worker_since is None:
            session.no_worker_since = now
        elif now - session.no_worker_since > self.worker_timeout_s:
            self._fail(
                session,
                "no_worker",
                f"no worker serves model {session.model!r} (waited {self.worker_timeout_s:g}s)",
            )

    # -- sending --------------------------------------------------------------------------------

    def _to_worker(self, identity: bytes, message: Message) -> bool:
        message.epoch = self.epoch
        try:
            send_now(self.workers, message, identity)
            return True
        except (PeerUnreachable, PeerCongested) as exc:
            if self.registry.get(identity) is not None:
                self._worker_lost(identity, f"unreachable ({type(exc).__name__})")
            return False

    def _to_client(self, identity: bytes, message: Message) -> None:
        """Queue for the client's own sender, so a slow client never stalls the loop."""
        message.epoch = self.epoch
        queue = self.outboxes.get(identity)
        if queue is None:
            queue = self.outboxes[identity] = asyncio.Queue()
            self._spawn(self._client_sender(identity, queue))
        queue.put_nowait(message)

    async def _client_sender(self, identity: bytes, queue: asyncio.Queue[Message]) -> None:
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), timeout=60.0)
            except asyncio.TimeoutError:
                if queue.empty():
                    self.outboxes.pop(identity, None)
                    return
                continue
            try:
                await asyncio.wait_for(send(self.clients, message, identity, block=True), 30.0)
            except (PeerUnreachable, asyncio.TimeoutError):
                log.warning("client %r is gone; cancelling its requests", identity)
                self.outboxes.pop(identity, None)
                for session in [s for s in self.sessions.values() if s.client == identity]:
                    self._finish(session, None)
                return

    # -- worker handlers ------------------------------------------------------------------------

    async def HELLO(self, identity: bytes, message: Message) -> None:
        body = message.body
        if body.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            self._to_worker(
                identity, Message("DISCONNECT", {"reason": "protocol version mismatch"})
            )
            return
        info = WorkerInfo(
            identity,
            body["worker"],
            body["model"],
            body["device"],
            body["dtype"],
            max(1, body["max_batch"]),
        )
        previous = self.registry.get(identity)
        if previous is not None and (previous.job is not None or previous.prepared):
            # It reconnected while we thought it busy: whatever it held is gone.
            self._worker_lost(identity, "registered again")
        self.registry.hello(info)
        log.info("worker %s joined: model %s on %s", info.name, info.model, info.device)
        self._to_worker(
            identity, Message("WELCOME", {"heartbeat_ms": int(self.heartbeat_s * 1000)})
        )

    def _known(self, identity: bytes, message: Message) -> WorkerInfo | None:
        worker = self.registry.get(identity)
        if worker is None or message.epoch != self.epoch:
            return None
        worker.last_seen = time.monotonic()
        return worker

    async def worker_HEARTBEAT(self, identity: bytes, message: Message) -> None:
        if self._known(identity, message) is None:
            self._to_worker(
                identity, Message("DISCONNECT", {"reason": "unknown worker: send HELLO"})
            )

    async def worker_DISCONNECT(self, identity: bytes, message: Message) -> None:
        if self.registry.get(identity) is not None:
            self._worker_lost(identity, message.body.get("reason", "disconnected"))

    def _job_done(self, identity: bytes, message: Message) -> WorkerInfo | None:
        """Clear the worker's job if this message answers it (current epoch only)."""
        worker = self._known(identity, message)
        if worker is None:
            return None
        job = worker.job
        if job is not None and job.request == message.request and job.task == message.task:
            worker.job = None
        return worker

    async def PREPARED(self, identity: bytes, message: Message) -> None:
        worker = self._job_done(identity, message)
        session = self.sessions.get(message.request or "")
        if worker is None:
            return
        if session is None:
            self._to_worker(identity, Message("RELEASE", request=message.request))
            return
        session.preparing.discard(identity)
        session.prepared.add(identity)
        worker.prepared.add(session.id)
        if session.plan is None:
            try:
                tensors = {
                    name.removeprefix("solver."): t
                    for name, t in message.tensors.items()
                    if name.startswith("solver.")
                }
                solver = solver_from_spec(message.body["solver"], tensors)
                session.start(message.tensors["x0"], solver)
            except (ChordsError, KeyError) as exc:
                self._fail(session, "bad_prepare", f"worker {worker.name}: {exc}")

    async def RESULT(self, identity: bytes, message: Message) -> None:
        worker = self._job_done(identity, message)
        session = self.sessions.get(message.request or "")
        if worker is None or session is None:
            return
        try:
            results = task_entries(message, 2, "output")
            accepted = [
                (entry, hits)
                for entry, output in results
                if (hits := session.complete(entry[0], entry[1], output)) is not None
            ]
        except ChordsError as exc:  # malformed, or an output of the wrong shape: a broken worker
            log.error("worker %s sent a bad result: %s", worker.name, exc)
            self._worker_lost(identity, "sent a bad result")
            self._to_worker(identity, Message("DISCONNECT", {"reason": str(exc)}))
            return
        if not accepted:
            return  # stale: an older attempt, or tasks already re-run elsewhere
        worker.completed += len(accepted)
        session.forwards += 1
        session.compute_s += float(message.body.get("compute_s", 0.0))
        for _, hits in accepted:
            if session.wants_media:
                session.await_media(hits)  # HITs go out once decoded, still in order
            else:
                for hit in hits:
                    self._send_hit(session, hit, None)
        if session.done:
            self._finish(session, Message("DONE", {"stats": session.stats()}, request=session.id))
        elif time.monotonic() - session.last_progress > 0.1:
            session.last_progress = time.monotonic()
            self._to_client(
                session.client, Message("PROGRESS", session.progress(), request=session.id)
            )

    def _send_hit(self, session: RequestSession, hit: Hit, media: torch.Tensor | None) -> None:
        session.hits_sent += 1
        body = {
            "core": hit.core,
            "round": hit.round,
            "steps": session.spec.steps,
            "elapsed_s": session.elapsed(),
        }
        tensors = {} if session.spec.output == "media" else {"latent": hit.latent}
        if media is not None:
            tensors["media"] = media
        self._to_client(session.client, Message("HIT", body, tensors, request=session.id))

    async def DECODED(self, identity: bytes, message: Message) -> None:
        worker = self._job_done(identity, message)
        session = self.sessions.get(message.request or "")
        media = message.tensors.get("media")
        if worker is None or session is None or message.task is None:
            return
        if media is None:
            session.decode_failed(message.task)
            return
        for pending in session.media_arrived(message.task, media):
            self._send_hit(session, pending.hit, pending.media)
        if session.done:
            self._finish(session, Message("DONE", {"stats": session.stats()}, request=session.id))

    async def FAILED(self, identity: bytes, message: Message) -> None:
        worker = self._job_done(identity, message)
        session = self.sessions.get(message.request or "")
        if worker is None or session is None:
            return
        code, text = message.body["code"], message.body["message"]
        if code == "invalid_request":
            self._fail(session, "invalid_request", text)
            return
        if code == "not_prepared":
            worker.prepared.discard(session.id)
            session.prepared.discard(identity)
        else:
            failures = session.failures.get(message.task, 0) + 1
            session.failures[message.task] = failures
            log.warning("worker %s failed %s: %s", worker.name, message.request, text)
            if failures > self.max_task_retries:
                self._fail(session, "worker_error", text)
                return
        if message.task is None:
            session.preparing.discard(identity)
        elif "tasks" not in message.body:  # a DECODE failed: another worker will try
            session.decode_failed(message.task)
        for entry in message.body.get("tasks", []):
            if isinstance(entry, list) and entry and isinstance(entry[0], int):
                session.requeue(entry[0])

    # -- client handlers ------------------------------------------------------------------------

    def _client_error(self, identity: bytes, code: str, text: str, request: str | None) -> None:
        self._to_client(
            identity, Message("ERROR", {"code": code, "message": text}, request=request)
        )

    async def SUBMIT(self, identity: bytes, message: Message) -> None:
        request_id = message.request
        if request_id is None:
            self._client_error(identity, "bad_message", "SUBMIT needs a request id", None)
            return
        if self.draining:
            self._client_error(identity, "draining", "the broker is shutting down", request_id)
            return
        existing = self.sessions.get(request_id)
        if existing is not None:
            if existing.client == identity:  # a client's resubmission: already running
                self._to_client(identity, self._accepted(existing))
            else:
                self._client_error(identity, "duplicate_request", "request id in use", request_id)
            return
        try:
            spec = RequestSpec.from_dict(message.body["request"])
        except (InvalidRequest, TypeError) as exc:
            self._client_error(identity, "invalid_request", str(exc), request_id)
            return
        session = RequestSession(request_id, identity, spec)
        self.sessions[request_id] = session
        log.info("request %s: %s %s, %d steps", request_id, spec.model, spec.method, spec.steps)
        self._to_client(identity, self._accepted(session))

    def _accepted(self, session: RequestSession) -> Message:
        spec = session.spec
        return Message(
            "ACCEPTED",
            {
                "steps": spec.steps,
                "method": spec.method,
                "hit_rounds": [list(pair) for pair in spec.expected_hit_rounds()],
                "init_sequence": spec.resolved_init_sequence(),
                "workers": len(self.registry.serving(spec.model)),
            },
            request=session.id,
        )

    async def CANCEL(self, identity: bytes, message: Message) -> None:
        session = self.sessions.get(message.request or "")
        if session is not None and session.client == identity:
            stats = {**session.stats(), "cancelled": True}
            self._finish(session, Message("DONE", {"stats": stats}, request=session.id))

    async def STATUS(self, identity: bytes, message: Message) -> None:
        self._to_client(
            identity,
            Message(
                "STATUS",
                {
                    "workers": [w.summary() for w in self.registry.workers.values()],
                    "sessions": [s.summary() for s in self.sessions.values()],
                    "epoch": self.epoch,
                },
            ),
        )

    async def client_HEARTBEAT(self, identity: bytes, message: Message) -> None:
        mine = [s.id for s in self.sessions.values() if s.client == identity]
        self._to_client(identity, Message("HEARTBEAT", {"in_flight": mine}))

    # -- state changes --------------------------------------------------------------------------

    def _worker_lost(self, identity: bytes, reason: str) -> None:
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s lost: %s", worker.name, reason)
        for session in self.sessions.values():
            session.worker_lost(identity)

    def _fail(self, session: RequestSession, code: str, text: str) -> None:
        log.warning("request %s failed (%s): %s", session.id, code, text)
        self._finish(session, Message("ERROR", {"code": code, "message": text}, request=session.id))

    def _finish(self, session: RequestSession, final: Message | None) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        for identity in session.prepared | session.preparing:
            worker = self.registry.get(identity)
            if worker is not None:
                worker.prepared.discard(session.id)
                self._to_worker(identity, Message("RELEASE", request=session.id))
        if final is not None:
            self._to_client(session.client, final)

    def _assign_idle_workers(self) -> None:
        sessions = list(self.sessions.values())
        for choice in self.dispatcher.assign(self.registry.idle(), sessions):
            worker, session = choice.worker, choice.session
            if choice.kind == "PREPARE":
                worker.job = Job("PREPARE", session.id)
                message = Message(
                    "PREPARE", {"request": session.spec.to_dict()}, request=session.id
                )
            elif choice.kind == "DECODE":
                pending = session.next_decode(worker.identity)
                if pending is None:
                    continue
                worker.job = Job("DECODE", session.id, pending.decode_id)
                message = Message(
                    "DECODE",
                    {},
                    {"latent": pending.hit.latent},
                    request=session.id,
                    task=pending.decode_id,
                )
            else:
                count = min(session.spec.batch, worker.max_batch, len(session.queue))
                taken = [session.next_task(worker.identity) for _ in range(count)]
                worker.job = Job("EVAL", session.id, taken[0][0].id)
                message = Message(
                    "EVAL",
                    {"tasks": [[t.id, attempt, t.step, t.core] for t, attempt in taken]},
                    {f"latent.{i}": t.latent for i, (t, _) in enumerate(taken)},
                    request=session.id,
                    task=taken[0][0].id,
                    attempt=taken[0][1],
                )
            self._to_worker(worker.identity, message)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


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
@click.option("--log-level", default="INFO", show_default=True)
@click.version_option(__version__, prog_name="chords-broker")
def main(
    client_bind: str,
    worker_bind: str,
    heartbeat_ms: int,
    liveness: int,
    worker_timeout: float,
    drain_timeout: float,
    log_level: str,
) -> None:
    """Run the chords-mq broker: owns every request's plan and streams hits to clients."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s chords-broker %(levelname)s %(message)s",
    )
    broker = Broker(client_bind, worker_bind, heartbeat_ms, liveness, worker_timeout, drain_timeout)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(broker.drain()))
        await broker.run()

    try:
        asyncio.run(serve())
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot bind: {exc}") from None
    with contextlib.suppress(Exception):
        sys.stdout.flush()
