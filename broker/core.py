"""BrokerCore: every decision the broker makes, as plain methods with no I/O.

Each input is a decoded message from a worker or a client, a clock tick, or an event the I/O
edge observed (a peer unreachable, a client gone, a TCP disconnect, SIGTERM). Each returns the
messages to send, as ``Send`` values; ``broker/server.py`` moves them. The clock is injected, so
``tests/test_broker_core.py`` drives every branch of the failure policy with a fake clock and
no processes. State is plain data owned by whoever calls the core (the server's event loop);
there are no locks and no awaits. One handler per message kind, named after it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from broker.dispatch import FairDispatcher
from broker.registry import Job, WorkerInfo, WorkerRegistry
from broker.session import RequestSession
from chords_mq.algorithms.base import Hit
from chords_mq.errors import ChordsError, PlanProtocolError
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_from_spec
from chords_mq.wire import (
    PROTOCOL_VERSION,
    Message,
    TaskEntry,
    WireError,
    eval_message,
    failed_tasks,
    result_entries,
    solver_frames,
)

log = logging.getLogger("chords.broker")

Side = Literal["worker", "client"]


class Send(NamedTuple):
    """One message the I/O edge must send: to a worker or a client, by routing id."""

    to: Side
    identity: bytes
    message: Message


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_s: float = 0.25
    liveness: int = 3  # missed heartbeats before a silent worker is declared dead
    worker_timeout_s: float = 30.0  # how long a request waits for a capable worker
    drain_timeout_s: float = 30.0
    max_task_retries: int = 3  # failures of one job (kind, id) before its request fails
    max_request_bytes: int = 8 << 30  # a request's latent working set must fit in this
    transfer_floor_bytes_s: float = 100e6  # slowest transfer rate liveness allows for
    progress_interval_s: float = 0.1


class BrokerCore:
    """All broker state and every handler. Public methods return the messages to send."""

    def __init__(
        self,
        config: BrokerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: int | None = None,
    ) -> None:
        self.config = config or BrokerConfig()
        self.clock = clock
        self.epoch = epoch if epoch is not None else int.from_bytes(os.urandom(6), "big") + 1
        self.registry = WorkerRegistry(
            self.config.liveness * self.config.heartbeat_s, self.config.transfer_floor_bytes_s
        )
        self.sessions: dict[str, RequestSession] = {}
        self.dispatcher = FairDispatcher()
        self.draining = False
        self.drain_deadline = 0.0
        self.stopped = False  # drained: the server may exit
        self.last_beat = -1e9
        self._out: list[Send] = []
        self.worker_handlers: dict[str, Callable[[bytes, Message], None]] = {
            "HELLO": self.HELLO,
            "HEARTBEAT": self.worker_HEARTBEAT,
            "PREPARED": self.PREPARED,
            "RESULT": self.RESULT,
            "DECODED": self.DECODED,
            "FAILED": self.FAILED,
            "DISCONNECT": self.worker_DISCONNECT,
        }
        self.client_handlers: dict[str, Callable[[bytes, Message], None]] = {
            "SUBMIT": self.SUBMIT,
            "CANCEL": self.CANCEL,
            "STATUS": self.STATUS,
            "HEARTBEAT": self.client_HEARTBEAT,
        }

    # -- inputs ----------------------------------------------------------------------------------

    def worker_message(self, identity: bytes, message: Message) -> list[Send]:
        handler = self.worker_handlers.get(message.kind)
        if handler is None:
            return self.bad_message("worker", identity, f"a worker may not send {message.kind}")
        return self._run(lambda: handler(identity, message), message)

    def client_message(self, identity: bytes, message: Message) -> list[Send]:
        handler = self.client_handlers.get(message.kind)
        if handler is None:
            return self.bad_message("client", identity, f"a client may not send {message.kind}")
        return self._run(lambda: handler(identity, message), message)

    def bad_message(self, side: Side, identity: bytes, reason: str) -> list[Send]:
        """A message from ``identity`` that could not be decoded, or may not come from it."""

        def reject() -> None:
            log.warning("rejected a malformed message from %s %r: %s", side, identity, reason)
            if side == "client":
                self._client_error(identity, "bad_message", reason, None)
                return
            if self.registry.get(identity) is not None:
                self._worker_lost(identity, f"sent a malformed message: {reason}")
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))

        return self._run(reject)

    def tick(self, now: float) -> list[Send]:
        """Housekeeping: expire silent workers, heartbeat, no-worker timeouts, draining."""

        def housekeeping() -> None:
            for worker in self.registry.expired(now):
                self._worker_lost(worker.identity, "missed heartbeats")
            if now - self.last_beat >= self.config.heartbeat_s:
                self.last_beat = now
                for identity in list(self.registry.workers):
                    self._to_worker(identity, Message("HEARTBEAT"))
            for session in list(self.sessions.values()):
                self._check_capacity(session, now)
            if self.draining and (not self.sessions or now >= self.drain_deadline):
                self._stop()

        return self._run(housekeeping)

    def worker_unreachable(self, identity: bytes) -> list[Send]:
        """A send to this worker found it gone (EHOSTUNREACH) or congested."""
        return self._run(lambda: self._worker_lost(identity, "unreachable"))

    def connection_dropped(self) -> list[Send]:
        """The worker socket saw a TCP disconnect: probe every worker at once, so the lost one
        is found in milliseconds rather than after missed heartbeats."""

        def probe() -> None:
            for identity in list(self.registry.workers):
                self._to_worker(identity, Message("HEARTBEAT"))

        return self._run(probe)

    def client_gone(self, identity: bytes) -> list[Send]:
        """A client cannot be reached: end its requests quietly and release their workers."""

        def forget() -> None:
            gone = [s for s in self.sessions.values() if s.client == identity]
            if gone:
                log.warning("client %r is gone; cancelling %d request(s)", identity, len(gone))
            for session in gone:
                self._finish(session, None)

        return self._run(forget)

    def begin_drain(self) -> list[Send]:
        """SIGTERM: refuse new requests, let running ones finish until the drain timeout."""

        def drain() -> None:
            if self.draining:
                return
            self.draining = True
            self.drain_deadline = self.clock() + self.config.drain_timeout_s
            log.info(
                "draining %d request(s), up to %.0fs",
                len(self.sessions),
                self.config.drain_timeout_s,
            )
            if not self.sessions:
                self._stop()

        return self._run(drain)

    def _run(self, action: Callable[[], None], message: Message | None = None) -> list[Send]:
        """Run one input, then dispatch; return what to send. A bug in a handler fails only the
        request it concerns, never the broker."""
        try:
            action()
        except Exception:
            kind = message.kind if message is not None else "an event"
            log.exception("handling %s failed", kind)
            session = self.sessions.get(message.request or "") if message is not None else None
            if session is not None:
                self._fail(session, "internal", f"broker error handling {kind}")
        try:
            self._dispatch()
        except Exception:
            log.exception("dispatch failed")
        out, self._out = self._out, []
        return out

    # -- sending ---------------------------------------------------------------------------------

    def _to_worker(self, identity: bytes, message: Message) -> None:
        message.epoch = self.epoch
        self._out.append(Send("worker", identity, message))

    def _to_client(self, identity: bytes, message: Message) -> None:
        message.epoch = self.epoch
        self._out.append(Send("client", identity, message))

    def _client_error(self, identity: bytes, code: str, text: str, request: str | None) -> None:
        body = {"code": code, "message": text}
        self._to_client(identity, Message("ERROR", body, request=request))

    def _stop(self) -> None:
        for session in list(self.sessions.values()):
            self._fail(session, "shutdown", "the broker is shutting down")
        for identity in list(self.registry.workers):
            self._to_worker(identity, Message("DISCONNECT", {"reason": "broker shutting down"}))
        self.stopped = True

    # -- worker handlers -------------------------------------------------------------------------

    def HELLO(self, identity: bytes, message: Message) -> None:
        body = message.body
        if body.get("protocol", 1) != PROTOCOL_VERSION:
            reason = f"protocol version {body.get('protocol', 1)} != {PROTOCOL_VERSION}"
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))
            return
        previous = self.registry.get(identity)
        if previous is not None and (previous.job is not None or previous.prepared):
            # It reconnected while we thought it busy: whatever it held is gone.
            self._worker_lost(identity, "registered again")
        info = WorkerInfo(
            identity,
            body["worker"],
            body["model"],
            body["device"],
            body["dtype"],
            max(1, body["max_batch"]),
            last_seen=self.clock(),
        )
        self.registry.hello(info)
        log.info("worker %s joined: model %s on %s", info.name, info.model, info.device)
        heartbeat_ms = int(self.config.heartbeat_s * 1000)
        self._to_worker(identity, Message("WELCOME", {"heartbeat_ms": heartbeat_ms}))

    def _known(self, identity: bytes, message: Message) -> WorkerInfo | None:
        """The registered worker this message is from, if it is of the current epoch."""
        worker = self.registry.get(identity)
        if worker is None or message.epoch != self.epoch:
            return None
        worker.last_seen = self.clock()
        return worker

    def worker_HEARTBEAT(self, identity: bytes, message: Message) -> None:
        if self._known(identity, message) is None:
            reason = "unknown worker: send HELLO"
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))

    def worker_DISCONNECT(self, identity: bytes, message: Message) -> None:
        if self.registry.get(identity) is not None:
            self._worker_lost(identity, message.body.get("reason", "disconnected"))

    def _answer(
        self, identity: bytes, message: Message, kind: str
    ) -> tuple[WorkerInfo, Job] | None:
        """The worker and the job ``message`` answers, the job now cleared; None if it answers
        nothing current (an old epoch, an old attempt, an old job): it is dropped."""
        worker = self._known(identity, message)
        job = worker.job if worker is not None else None
        if (
            worker is None
            or job is None
            or (kind != "FAILED" and job.kind != kind)
            or job.request != message.request
            or job.task != message.task
            or job.attempt != message.attempt
        ):
            return None
        worker.job = None
        return worker, job

    def _broken(self, worker: WorkerInfo, why: str) -> None:
        """A worker that sent an answer we cannot use: drop it (its tasks run elsewhere)."""
        log.error("worker %s sent a bad answer: %s", worker.name, why)
        self._worker_lost(worker.identity, "sent a bad answer")
        self._to_worker(worker.identity, Message("DISCONNECT", {"reason": why}))

    def PREPARED(self, identity: bytes, message: Message) -> None:
        answered = self._answer(identity, message, "PREPARE")
        if answered is None:
            return
        worker, job = answered
        session = self.sessions.get(job.request)
        if session is None:
            self._to_worker(identity, Message("RELEASE", request=job.request))
            return
        session.preparing.discard(identity)
        session.prepared.add(identity)  # so that whatever follows releases it too
        worker.prepared.add(session.id)
        if session.plan is not None or not job.initial:
            return
        try:
            x0 = message.tensors.get("x0")
            if x0 is None or not x0.is_floating_point():
                raise InvalidRequest("PREPARED carries no floating-point initial latent x0")
            solver = solver_from_spec(message.body["solver"], solver_frames(message))
        except ChordsError as exc:
            self._bad_prepare(session, worker, job, str(exc))
            return
        latents = session.spec.working_set_latents()
        working_set = x0.untyped_storage().nbytes() * latents
        if working_set > self.config.max_request_bytes:
            self._fail(
                session,
                "too_large",
                f"the request would hold about {working_set / 2**20:.0f} MiB of latents "
                f"({latents} x {x0.nbytes / 2**20:.1f} MiB); this broker admits "
                f"{self.config.max_request_bytes / 2**20:.0f} MiB (--max-request-bytes)",
            )
            return
        try:
            session.start(x0, solver)
        except ChordsError as exc:
            self._bad_prepare(session, worker, job, str(exc))

    def _bad_prepare(self, session: RequestSession, worker: WorkerInfo, job: Job, why: str) -> None:
        """A worker's PREPARED is unusable: never use that worker for this request again, and
        prepare another, up to ``max_task_retries`` times."""
        log.warning("worker %s sent request %s a bad PREPARED: %s", worker.name, session.id, why)
        session.excluded.add(worker.identity)
        session.prepared.discard(worker.identity)
        worker.prepared.discard(session.id)
        session.x0_from = None
        self._to_worker(worker.identity, Message("RELEASE", request=session.id))
        if self._count_failure(session, job):
            self._fail(session, "bad_prepare", f"worker {worker.name}: {why}")

    def RESULT(self, identity: bytes, message: Message) -> None:
        answered = self._answer(identity, message, "EVAL")
        if answered is None:
            return
        worker, job = answered
        session = self.sessions.get(job.request)
        if session is None:
            return
        try:
            entries = result_entries(message)
            if [(e.task, e.attempt) for e in entries] != [(t.id, a) for t, a in job.tasks]:
                raise WireError("RESULT answers other tasks than its EVAL carried")
            current = []
            for entry in entries:
                task = session.current(entry.task, entry.attempt)
                if task is not None:
                    session.check(task, entry.results)
                    current.append((task, entry.results))
        except (WireError, PlanProtocolError) as exc:  # a broken or faulty worker
            self._broken(worker, str(exc))
            return
        if not current:
            return  # stale: re-run elsewhere already
        worker.completed += len(current)
        session.forwards += 1
        session.compute_s += float(message.body.get("compute_s", 0.0))
        for task, results in current:
            hits = session.complete(task, results)
            if session.wants_media:
                session.await_media(hits)  # HITs go out once decoded, still in order
            else:
                for hit in hits:
                    self._send_hit(session, hit, None)
        self._after_progress(session)

    def DECODED(self, identity: bytes, message: Message) -> None:
        answered = self._answer(identity, message, "DECODE")
        if answered is None:
            return
        _, job = answered
        session = self.sessions.get(job.request)
        if session is None or job.decode is None:
            return
        media = message.tensors.get("media")
        if media is None:
            session.decode_failed(job.decode.decode_id)
            if self._count_failure(session, job):
                self._fail(session, "decode_failed", "workers returned no media for a hit")
            return
        for pending in session.media_arrived(job.decode.decode_id, media):
            self._send_hit(session, pending.hit, pending.media)
        self._after_progress(session)

    def FAILED(self, identity: bytes, message: Message) -> None:
        answered = self._answer(identity, message, "FAILED")
        if answered is None:
            return
        worker, job = answered
        try:
            named = failed_tasks(message)
        except WireError as exc:
            self._broken(worker, str(exc))
            return
        session = self.sessions.get(job.request)
        if session is None:
            return
        code, text = message.body["code"], message.body["message"]
        if code == "invalid_request":
            self._fail(session, "invalid_request", text)
            return
        if job.kind == "EVAL" and named and named != [(t.id, a) for t, a in job.tasks]:
            log.warning("worker %s: FAILED names other tasks than its EVAL", worker.name)
        if code == "not_prepared":  # its cache evicted the request: prepare it again
            worker.prepared.discard(session.id)
            session.prepared.discard(identity)
        else:
            log.warning("worker %s failed %s %s: %s", worker.name, job.kind, job.request, text)
            if self._count_failure(session, job):
                self._fail(session, "worker_error", text)
                return
        self._return_job(session, job)

    def _count_failure(self, session: RequestSession, job: Job) -> bool:
        """Count one failure of ``job`` (per kind and id); True once it exceeds the retries."""
        failures = session.failures.get(job.key, 0) + 1
        session.failures[job.key] = failures
        return failures > self.config.max_task_retries

    def _return_job(self, session: RequestSession, job: Job) -> None:
        """Put a job that did not complete back, to run again on any worker."""
        if job.kind == "PREPARE":
            session.preparing.discard(job.worker)
            if job.initial:
                session.x0_from = None
        elif job.kind == "DECODE" and job.decode is not None:
            session.decode_failed(job.decode.decode_id)
        for task, _ in job.tasks:
            session.requeue(task.id)

    # -- client handlers -------------------------------------------------------------------------

    def SUBMIT(self, identity: bytes, message: Message) -> None:
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
        budget = self.config.max_request_bytes
        session = RequestSession(request_id, identity, spec, self.clock, budget)
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

    def CANCEL(self, identity: bytes, message: Message) -> None:
        session = self.sessions.get(message.request or "")
        if session is not None and session.client == identity:
            stats = {**session.stats(), "cancelled": True}
            self._finish(session, Message("DONE", {"stats": stats}, request=session.id))

    def STATUS(self, identity: bytes, message: Message) -> None:
        body = {
            "workers": [w.summary() for w in self.registry.workers.values()],
            "sessions": [s.summary() for s in self.sessions.values()],
            "epoch": self.epoch,
        }
        self._to_client(identity, Message("STATUS", body))

    def client_HEARTBEAT(self, identity: bytes, message: Message) -> None:
        mine = [s.id for s in self.sessions.values() if s.client == identity]
        self._to_client(identity, Message("HEARTBEAT", {"in_flight": mine}))

    # -- state changes ---------------------------------------------------------------------------

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

    def _after_progress(self, session: RequestSession) -> None:
        if session.done:
            self._finish(session, Message("DONE", {"stats": session.stats()}, request=session.id))
            return
        now = self.clock()
        if session.latent_bytes >= 8 << 20 or session.evaluations % 16 == 0:
            session.held_bytes()  # samples the peak (stats' peak_bytes): always for big latents
        if now - session.last_progress >= self.config.progress_interval_s:
            session.last_progress = now
            session.held_bytes()
            self._to_client(
                session.client, Message("PROGRESS", session.progress(), request=session.id)
            )

    def _check_capacity(self, session: RequestSession, now: float) -> None:
        serving = self.registry.serving(session.model)
        capable = [w for w in serving if w.identity not in session.excluded]
        if capable:
            session.no_worker_since = None
            return
        if session.no_worker_since is None:
            session.no_worker_since = now
        elif now - session.no_worker_since > self.config.worker_timeout_s:
            self._fail(
                session,
                "no_worker",
                f"no worker serves model {session.model!r} "
                f"(waited {self.config.worker_timeout_s:g}s)",
            )

    def _worker_lost(self, identity: bytes, reason: str) -> None:
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s lost: %s", worker.name, reason)
        for session in self.sessions.values():
            session.worker_lost(identity)

    def _fail(self, session: RequestSession, code: str, text: str) -> None:
        log.warning("request %s failed (%s): %s", session.id, code, text)
        body = {"code": code, "message": text}
        self._finish(session, Message("ERROR", body, request=session.id))

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

    def _dispatch(self) -> None:
        """Hand every idle worker something to do (no round barrier)."""
        if self.stopped or not self.sessions:
            return
        idle = self.registry.idle()
        if not idle:
            return
        now = self.clock()
        sessions = list(self.sessions.values())
        for job in self.dispatcher.assign(idle, sessions, now):
            session = self.sessions[job.request]
            identity = job.worker
            if job.kind == "PREPARE":
                body = {"request": session.spec.to_dict(), "initial": job.initial}
                self._to_worker(identity, Message("PREPARE", body, request=session.id))
            elif job.kind == "DECODE":
                assert job.decode is not None
                self._to_worker(
                    identity,
                    Message(
                        "DECODE",
                        {},
                        {"latent": job.decode.hit.latent},
                        request=session.id,
                        task=job.decode.decode_id,
                    ),
                )
            else:
                entries = [
                    (TaskEntry(t.id, attempt, t.step, t.core, t.targets), t.latent)
                    for t, attempt in job.tasks
                ]
                self._to_worker(identity, eval_message(session.id, entries))
