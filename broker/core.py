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
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from chords_mq.algorithms.base import Hit
from chords_mq.broker.dispatch import FairDispatcher
from chords_mq.broker.metrics import CoreMetrics
from chords_mq.broker.registry import Job, WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession, all_finite
from chords_mq.errors import BadResult, ChordsError, PlanProtocolError
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_from_spec
from chords_mq.wire import (
    HEARTBEAT_IDS,
    PROTOCOL_VERSION,
    STATUS_PAGE,
    Message,
    TaskEntry,
    WireError,
    eval_message,
    failed_tasks,
    result_entries,
    solver_frames,
    tensor_digest,
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
    # Admission: past any of these a SUBMIT (or a HELLO) gets a typed ``busy`` refusal.
    max_sessions: int = 1024  # requests the broker runs or queues at once
    max_client_requests: int = 64  # of them, from one client (one key, or one connection)
    max_queued_tasks: int = 65536  # ready tasks waiting for a worker, over every request
    max_workers: int = 1024
    busy_retry_s: float = 1.0  # the retry hint a ``busy`` refusal carries
    # Faulty workers: a worker whose results failed the checks this many times (each time
    # confirmed by another worker's good result for the same task) gets no work for a while.
    quarantine_after: int = 2
    quarantine_s: float = 600.0
    # Deadlines: an EVAL still running after deadline_factor x its worker's expected time (and
    # at least the floor) is late: its tasks are copied to another worker (the first answer of
    # the two wins), and its worker gets no work until it answers. After max_missed_deadlines
    # in a row the worker is quarantined like a faulty one.
    # How many cores a CHORDS request gets: "adaptive" grants fewer than asked while other
    # requests share the model's workers (about workers / requests), "fixed" what it asks.
    cores_policy: str = "adaptive"
    placement: str = "eft"  # or "fifo", the placement before the speed model (for comparison)
    deadline_factor: float = 2.5
    deadline_floor_s: float = 0.05
    max_missed_deadlines: int = 5
    # Logging of bad traffic, per peer: a burst, then one line per interval with a count.
    log_burst: int = 5
    log_interval_s: float = 10.0
    # The endpoints the server bound, named in a ``wrong_port`` refusal ("" if unknown).
    client_endpoint: str = ""
    worker_endpoint: str = ""


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
        self.sessions: dict[str, RequestSession] = {}  # by the broker's own request id
        # Request ids are namespaced by their owner: (principal, the client's id) -> our id.
        self.owned: dict[tuple[str, str], str] = {}
        self.per_client: dict[str, int] = {}  # principal -> requests it has running
        self.quarantine: OrderedDict[str, float] = OrderedDict()  # principal -> until
        self.strikes: OrderedDict[str, int] = OrderedDict()  # principal -> confirmed bad results
        self.peer_log = PeerLog(clock, self.config.log_burst, self.config.log_interval_s)
        self._ids = 0
        self._aliases = 0
        self._peer = ""  # the principal of the message being handled
        self._role = "client"
        # "eft": placement by earliest finish time (the speed model); "fifo": any idle worker.
        self.dispatcher = FairDispatcher(self.registry if self.config.placement == "eft" else None)
        self.draining = False
        self.drain_deadline = 0.0
        self.stopped = False  # drained: the server may exit
        self.last_beat = -1e9
        self.metrics = CoreMetrics()  # what /metrics shows (broker.metrics renders it)
        self.started = self.clock()  # workers register again soon after a (re)start
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

    def worker_message(
        self, identity: bytes, message: Message, principal: str | None = None
    ) -> list[Send]:
        """A message from a worker connection. ``principal`` is the key it authenticated with
        (None when insecure: its connection is its identity)."""
        handler = self.worker_handlers.get(message.kind)
        worker = self.registry.get(identity)
        if worker is None and _client_kind(message):
            return self._run(lambda: self._wrong_port("worker", identity, message))
        if handler is None:
            return self.bad_message("worker", identity, f"a worker may not send {message.kind}")
        peer = principal or _connection(identity)
        if worker is not None and message.kind != "HELLO" and worker.principal != peer:
            return self.bad_message("worker", identity, "sent under another worker's routing id")
        self._peer = peer
        return self._run(lambda: handler(identity, message), message)

    def client_message(
        self,
        identity: bytes,
        message: Message,
        principal: str | None = None,
        role: str = "client",
    ) -> list[Send]:
        """A message from a client connection; ``role`` is "client" or "admin" (which also sees
        everything in STATUS)."""
        handler = self.client_handlers.get(message.kind)
        if handler is None and message.kind in WORKER_KINDS:
            return self._run(lambda: self._wrong_port("client", identity, message))
        if handler is None:
            return self.bad_message("client", identity, f"a client may not send {message.kind}")
        self._peer, self._role = principal or _connection(identity), role
        return self._run(lambda: handler(identity, message), message)

    def _wrong_port(self, port: Side, identity: bytes, message: Message) -> None:
        """A client's message on the worker port, or a worker's on the client port: a typed
        ``wrong_port`` ERROR naming the port to use, at once (not a silent drop that leaves the
        peer waiting for its timeout)."""
        if port == "worker":
            right = _endpoint_hint(self.config.client_endpoint, "client")
            text = f"this is the broker's worker port; clients connect to {right}"
        else:
            right = _endpoint_hint(self.config.worker_endpoint, "worker")
            text = f"this is the broker's client port; workers connect to {right}"
        self.peer_log.warning(
            ("wrong_port", identity), "a %s at the %s port: %s", message.kind, port, text
        )
        body = {"code": "wrong_port", "message": text}
        error = Message("ERROR", body, request=message.request if port == "worker" else None)
        if port == "worker":
            self._to_worker(identity, error)
        else:
            self._to_client(identity, error)

    def bad_message(self, side: Side, identity: bytes, reason: str) -> list[Send]:
        """A message from ``identity`` that could not be decoded, or may not come from it."""

        def reject() -> None:
            self.peer_log.warning(
                (side, identity),
                "rejected a malformed message from %s %r: %s",
                side,
                identity[:64],
                reason[:200],
            )
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
            for worker in list(self.registry.workers.values()):
                self._check_deadline(worker, now)
            if now - self.last_beat >= self.config.heartbeat_s:
                self.last_beat = now
                for identity in list(self.registry.workers):
                    self._to_worker(identity, Message("HEARTBEAT"))
            for session in list(self.sessions.values()):
                self._check_capacity(session, now)
            if self.draining and (not self.sessions or now >= self.drain_deadline):
                self._stop()

        return self._run(housekeeping)

    def _deadline(self, worker: WorkerInfo) -> float | None:
        """When the worker's EVAL becomes late (None: no EVAL, already late, or no estimate)."""
        job = worker.job
        if job is None or job.kind != "EVAL" or job.late:
            return None
        if job.expected_s is None:  # sent before anything was known: the estimate learnt since
            session = self.sessions.get(job.request)
            if session is not None:
                key = (session.latent_bytes, len(job.tasks))
                job.expected_s = self.registry.expected(worker, key)
            if job.expected_s is None:
                return None
        # A large answer's transfer time varies with the load: allow it, as liveness does.
        limit = max(self.config.deadline_factor * job.expected_s, self.config.deadline_floor_s)
        limit += 2 * job.expected_bytes / self.config.transfer_floor_bytes_s  # there and back
        return job.sent_at + limit

    def next_deadline(self) -> float | None:
        """The earliest time a running EVAL becomes late: the I/O shell calls ``tick`` then,
        so a hung worker is found at its deadline, not at the next housekeeping tick."""
        deadlines = [d for w in self.registry.workers.values() if (d := self._deadline(w))]
        return min(deadlines, default=None)

    def _check_deadline(self, worker: WorkerInfo, now: float) -> None:
        deadline = self._deadline(worker)
        if deadline is None or now < deadline:
            return
        job = worker.job
        assert job is not None and job.expected_s is not None  # as ``_deadline`` found them
        job.late = True
        self.metrics.failures["late"] += 1
        session = self.sessions.get(job.request)
        if session is not None and not self._could_copy(session, worker, now):
            # No other worker could run a copy: copying would only run the task again on this
            # one, after a RELEASE and a new PREPARE. It runs on, and its lateness is measured
            # against nobody's, so it is not held against it (no missed deadline).
            log.info(
                "worker %s is late: %.0f ms on an EVAL it should finish in %.0f ms; no other "
                "worker can take a copy, so it runs on",
                worker.name,
                (now - job.sent_at) * 1000,
                job.expected_s * 1000,
            )
            return
        worker.missed += 1
        self.peer_log.warning(
            ("late", worker.principal),
            "worker %s is late: %.0f ms on an EVAL it should finish in %.0f ms; its tasks are "
            "copied to another worker and it gets no work until it answers (%d missed in a row)",
            worker.name,
            (now - job.sent_at) * 1000,
            job.expected_s * 1000,
            worker.missed,
        )
        if session is not None:
            for task, _ in job.tasks:
                session.speculate(task.id)  # a copy; the first answer of the two wins
            # it no longer counts as one of the request's workers: another is prepared
            session.prepared.discard(worker.identity)
            worker.prepared.discard(session.id)
            self._to_worker(worker.identity, Message("RELEASE", request=session.id))
        if worker.missed >= self.config.max_missed_deadlines:
            until = now + self.config.quarantine_s
            self.quarantine[worker.principal] = until
            worker.quarantined_until = until
            log.error(
                "worker %s quarantined for %.0fs after %d missed deadlines in a row",
                worker.name,
                self.config.quarantine_s,
                worker.missed,
            )

    def _could_copy(self, session: RequestSession, late: WorkerInfo, now: float) -> bool:
        """Is there a worker other than ``late`` that could run a copy of its tasks (of the
        request's model, not excluded from it, not quarantined, not late itself)?"""
        return any(
            w.identity != late.identity
            and w.identity not in session.excluded
            and not w.quarantined(now)
            for w in self.registry.serving(session.model, now)
        )

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
            session = None
            if message is not None and message.request is not None:
                ours = self.owned.get((self._peer, message.request), message.request)
                session = self.sessions.get(ours)
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
            body = {"reason": "broker shutting down", "shutdown": True}
            self._to_worker(identity, Message("DISCONNECT", body))
        self.stopped = True

    # -- worker handlers -------------------------------------------------------------------------

    def HELLO(self, identity: bytes, message: Message) -> None:
        body = message.body
        if body.get("protocol", 1) != PROTOCOL_VERSION:
            reason = f"protocol version {body.get('protocol', 1)} != {PROTOCOL_VERSION}"
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))
            return
        too_long = [k for k in ("worker", "model", "device", "dtype") if len(body[k]) > 255]
        if too_long:
            reason = f"HELLO fields {too_long} are longer than 255 characters"
            self.peer_log.warning(("worker", identity), "refused a HELLO: %s", reason)
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))
            return
        previous = self.registry.get(identity)
        session_id = body.get("session", "")
        if (
            previous is not None
            and session_id
            and previous.session == session_id
            and previous.principal == self._peer
        ):  # the same socket said HELLO again (a burst queued during a partition): idempotent
            previous.last_seen = self.clock()
            heartbeat_ms = int(self.config.heartbeat_s * 1000)
            self._to_worker(identity, Message("WELCOME", {"heartbeat_ms": heartbeat_ms}))
            return
        if previous is None and len(self.registry.workers) >= self.config.max_workers:
            reason = f"busy: this broker takes at most {self.config.max_workers} workers"
            self.peer_log.warning(("busy", self._peer), "refused a worker: %s", reason)
            self._to_worker(identity, Message("DISCONNECT", {"reason": reason}))
            return
        if previous is not None and (
            previous.job is not None or previous.prepared or previous.principal != self._peer
        ):
            # It reconnected while we thought it busy: whatever it held is gone.
            self._worker_lost(identity, "registered again")
        if previous is not None and previous.principal == self._peer:
            alias = previous.alias  # a repeated HELLO (no WELCOME yet): the same worker
        else:
            self._aliases += 1
            alias = f"worker-{self._aliases}"
        info = WorkerInfo(
            identity,
            body["worker"],
            body["model"],
            body["device"],
            body["dtype"],
            max(1, body["max_batch"]),
            last_seen=self.clock(),
            principal=self._peer,
            alias=alias,
            quarantined_until=self.quarantine.get(self._peer, 0.0),
            bad_results=self.strikes.get(self._peer, 0),
            session=session_id,
        )
        self.registry.hello(info)
        log.info("worker %s joined: model %s on %s", info.name, info.model, info.device)
        if info.quarantined(self.clock()):
            log.warning("worker %s is quarantined (bad results): it gets no work", info.name)
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
        self.metrics.failures["broken"] += 1
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
        digest = message.body["x0_digest"]
        if session.x0_digest is not None:
            self._same_x0(session, worker.name, digest)
            return
        if not job.initial:
            session.digests[identity] = (worker.name, digest)  # compared once x0 arrives
            return
        try:
            x0 = message.tensors.get("x0")
            if x0 is None or not x0.is_floating_point():
                raise InvalidRequest("PREPARED carries no floating-point initial latent x0")
            if not all_finite(x0):
                raise InvalidRequest("the initial latent x0 has NaN or Inf")
            if tensor_digest(x0) != digest:
                raise InvalidRequest("x0_digest is not the digest of the x0 it sent")
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
            return
        session.x0_digest, session.x0_source = digest, worker.name
        early, session.digests = session.digests, {}
        for other in early:
            if other in session.prepared and session.id in self.sessions:
                self._same_x0(session, early[other][0], early[other][1])

    def _same_x0(self, session: RequestSession, name: str, digest: str) -> None:
        """Every worker prepared for a request must start it from the same initial latent, bit
        for bit; otherwise the request stops, naming both workers."""
        if digest != session.x0_digest:
            self._fail(
                session,
                "x0_mismatch",
                f"workers {session.x0_source} and {name} computed different initial latents for "
                "this request (their model, weights or device disagree); it cannot run on both",
            )

    def _bad_prepare(self, session: RequestSession, worker: WorkerInfo, job: Job, why: str) -> None:
        """A worker's PREPARED is unusable: never use that worker for this request again, and
        prepare another, up to ``max_task_retries`` times."""
        log.warning("worker %s sent request %s a bad PREPARED: %s", worker.name, session.id, why)
        self.metrics.failures["bad_prepare"] += 1
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
        if job.tasks:  # the speed model: what one EVAL of this size took, seen from here
            worker.observe((session.latent_bytes, len(job.tasks)), self.clock() - job.sent_at)
            self.metrics.task_seconds.observe(self.clock() - job.sent_at)
            if not job.late:
                worker.missed = 0
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
        except BadResult as exc:  # well-formed, but wrong data: a faulty GPU, or a bad actor
            self._bad_result(session, worker, job, exc)
            return
        except (WireError, PlanProtocolError) as exc:  # a broken worker
            self._broken(worker, str(exc))
            return
        if not current:
            return  # stale: re-run elsewhere already
        worker.completed += len(current)
        session.forwards += 1
        compute_s = message.body.get("compute_s", 0.0)
        session.compute_s += float(compute_s) if math.isfinite(compute_s) else 0.0
        for task, results in current:
            for suspect in session.suspects.pop(task.id, ()):
                self._strike(suspect, f"its result for task {task.id} of {session.id} was bad")
            hits = session.complete(task, results)
            if session.wants_media:
                session.await_media(hits)  # HITs go out once decoded, still in order
            else:
                for hit in hits:
                    self._send_hit(session, hit, None)
        self._after_progress(session)

    def _bad_result(
        self, session: RequestSession, worker: WorkerInfo, job: Job, exc: BadResult
    ) -> None:
        """A result that failed the checks: the plan never sees it, the task runs again on
        another worker, and this worker does no more work for this request. If another worker's
        result for the same task then passes, the fault is confirmed: a strike (``_strike``)."""
        self.peer_log.warning(
            ("bad", worker.principal),
            "worker %s: bad result (%s) for request %s: %s",
            worker.name,
            exc.reason,
            session.id,
            exc,
        )
        session.bad_results += 1
        session.last_bad = exc.reason
        self.metrics.failures[exc.reason] += 1
        if exc.reason != "dtype":  # which dtype is right is not known: nobody is struck
            for task, _ in job.tasks:
                session.suspects.setdefault(task.id, set()).add(worker.principal)
        session.excluded.add(worker.identity)
        session.prepared.discard(worker.identity)
        worker.prepared.discard(session.id)
        self._to_worker(worker.identity, Message("RELEASE", request=session.id))
        if self._count_failure(session, job):
            code = "non_finite" if exc.reason == "non_finite" else "bad_result"
            self._fail(session, code, f"{job.kind} {job.task}: {exc} (from every worker tried)")
            return
        self._return_job(session, job)
        self._check_capacity(session, self.clock())

    def _strike(self, principal: str, why: str) -> None:
        """One confirmed bad result; at ``quarantine_after`` the worker gets no work for
        ``quarantine_s``, across reconnects (the principal is its key, or its connection)."""
        strikes = self.strikes.pop(principal, 0) + 1
        self.strikes[principal] = strikes
        while len(self.strikes) > 4 * self.config.max_workers:
            self.strikes.popitem(last=False)
        now = self.clock()
        workers = [w for w in self.registry.workers.values() if w.principal == principal]
        for worker in workers:
            worker.bad_results = strikes
        if strikes < self.config.quarantine_after:
            return
        until = now + self.config.quarantine_s
        self.quarantine[principal] = until
        self.quarantine.move_to_end(principal)
        while len(self.quarantine) > 4 * self.config.max_workers:
            self.quarantine.popitem(last=False)
        for worker in workers:
            if worker.quarantined(now):
                continue
            worker.quarantined_until = until
            log.error(
                "worker %s quarantined for %.0fs after %d bad results (last: %s)",
                worker.name,
                self.config.quarantine_s,
                strikes,
                why,
            )
            self._release_all(worker)

    def _release_all(self, worker: WorkerInfo) -> None:
        """Take back everything ``worker`` holds: its job runs elsewhere, its contexts go."""
        for session in self.sessions.values():
            had = worker.identity in session.prepared or worker.identity in session.preparing
            session.worker_lost(worker.identity)
            if had:
                self._to_worker(worker.identity, Message("RELEASE", request=session.id))
        worker.prepared.clear()
        worker.job = None

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
        self.metrics.failures["worker_error"] += 1
        if code == "invalid_request":
            self._fail(session, "invalid_request", text)
            return
        if job.kind == "EVAL" and named and named != [(t.id, a) for t, a in job.tasks]:
            log.warning("worker %s: FAILED names other tasks than its EVAL", worker.name)
        if code == "not_prepared":  # its cache evicted the request: prepare it again
            worker.prepared.discard(session.id)
            session.prepared.discard(identity)
        else:
            self.peer_log.warning(
                ("failed", worker.principal),
                "worker %s failed %s %s: %s",
                worker.name,
                job.kind,
                job.request,
                text[:500],
            )
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
        for task, attempt in job.tasks:
            session.requeue(task.id, attempt)

    # -- client handlers -------------------------------------------------------------------------

    def _mine(self, message: Message) -> RequestSession | None:
        """The running request ``message`` names, if the sender owns it."""
        ours = self.owned.get((self._peer, message.request or ""))
        return None if ours is None else self.sessions.get(ours)

    def _busy(self, identity: bytes, request_id: str, why: str) -> None:
        self.peer_log.warning(("busy", self._peer), "refused a request: %s", why)
        body = {"code": "busy", "message": why, "retry_after_s": self.config.busy_retry_s}
        self._to_client(identity, Message("ERROR", body, request=request_id))

    def SUBMIT(self, identity: bytes, message: Message) -> None:
        request_id = message.request
        if request_id is None:
            self._client_error(identity, "bad_message", "SUBMIT needs a request id", None)
            return
        if self.draining:
            self._client_error(identity, "draining", "the broker is shutting down", request_id)
            return
        existing = self._mine(message)
        if existing is not None:  # the owner's resubmission (maybe from a new connection)
            existing.client = identity
            self._to_client(identity, self._accepted(existing))
            return
        try:
            spec = RequestSpec.from_dict(message.body["request"])
        except (InvalidRequest, TypeError) as exc:
            self._client_error(identity, "invalid_request", str(exc), request_id)
            return
        config = self.config
        if len(self.sessions) >= config.max_sessions:
            self._busy(identity, request_id, f"the broker runs {config.max_sessions} requests")
            return
        if self.per_client.get(self._peer, 0) >= config.max_client_requests:
            why = f"this client has {config.max_client_requests} requests running (the limit)"
            self._busy(identity, request_id, why)
            return
        queued = sum(s.queued for s in self.sessions.values())
        if queued + spec.resolved_cores() > config.max_queued_tasks:
            self._busy(identity, request_id, f"{queued} tasks are waiting for workers")
            return
        wait = message.body.get("wait_for_worker_s")
        if wait is not None and not (isinstance(wait, (int, float)) and 0 <= wait <= 86400):
            why = f"wait_for_worker_s must be 0..86400 seconds, got {wait!r}"
            self._client_error(identity, "invalid_request", why, request_id)
            return
        now = self.clock()
        if (
            wait is None
            and not self.registry.serving(spec.model, now)
            # past the window in which a restarted broker's workers register again (their
            # silence timeout, then a HELLO per heartbeat)
            and now - self.started >= 4 * config.liveness * config.heartbeat_s
        ):
            served = sorted({w.model for w in self.registry.workers.values()})
            listed = ", ".join(repr(m) for m in served) if served else "none"
            why = (
                f"no worker serves model {spec.model!r}; the models served here: {listed} "
                "(a request may ask to wait for one: wait_for_worker_s)"
            )
            self._client_error(identity, "no_worker", why, request_id)
            return
        asked = spec.resolved_cores()
        spec = self._grant(spec)
        self._ids += 1
        ours = f"{self._ids:x}.{self.epoch % 4096:x}"
        session = RequestSession(
            ours, identity, spec, self.clock, config.max_request_bytes, self._peer, request_id
        )
        session.asked_cores = asked
        if wait is not None:
            session.wait_for_worker_s = float(wait)
        self.sessions[ours] = session
        self.owned[(self._peer, request_id)] = ours
        self.per_client[self._peer] = self.per_client.get(self._peer, 0) + 1
        log.info(
            "request %s (%s): %s %s, %d steps, %d of %d cores",
            ours,
            request_id[:64],
            spec.model,
            spec.method,
            spec.steps,
            spec.resolved_cores(),
            asked,
        )
        self._to_client(identity, self._accepted(session))

    def _grant(self, spec: RequestSpec) -> RequestSpec:
        """The cores policy. ``adaptive``: a request gets about the model's workers divided by
        the requests that will share them (itself included), never below 1 (the sequential
        solve) nor above what it asked; a lone request gets its full K (even more cores than
        workers). With no worker yet it keeps what it asked (it waits for workers either way)."""
        if self.config.cores_policy != "adaptive":
            return spec
        workers = len(self.registry.serving(spec.model, self.clock()))
        if workers == 0:
            return spec
        sharing = 1 + sum(1 for s in self.sessions.values() if s.model == spec.model)
        if sharing == 1:
            return spec  # alone: its full K, even past the pool's size (as it asked)
        return spec.granted(max(1, workers // sharing))

    def _accepted(self, session: RequestSession) -> Message:
        spec = session.spec
        return Message(
            "ACCEPTED",
            {
                "steps": spec.steps,
                "method": spec.method,
                "hit_rounds": [list(pair) for pair in spec.expected_hit_rounds()],
                "init_sequence": spec.resolved_init_sequence(),
                "cores": spec.resolved_cores(),  # granted (the cores policy)
                "requested_cores": session.asked_cores,
                "workers": len(self.registry.serving(spec.model, self.clock())),
            },
            request=session.client_id,
        )

    def CANCEL(self, identity: bytes, message: Message) -> None:
        session = self._mine(message)
        if session is not None:
            stats = {**session.stats(), "cancelled": True}
            self._finish(session, Message("DONE", {"stats": stats}, request=session.client_id))

    def STATUS(self, identity: bytes, message: Message) -> None:
        """The workers (by alias, unless asked by an admin) and the asker's own requests (an
        admin's: everyone's), one page of ``STATUS_PAGE`` each from ``offset``."""
        admin = self._role == "admin"
        offset = max(0, message.body.get("offset", 0))
        now = self.clock()
        workers = list(self.registry.workers.values())
        sessions = [s for s in self.sessions.values() if admin or s.owner == self._peer]
        page = slice(offset, offset + STATUS_PAGE)
        shown = []
        for session in sessions[page]:
            summary = session.summary()
            summary["id"] = session.client_id
            if admin:
                summary["owner"] = session.owner
            shown.append(summary)
        body = {
            "workers": [w.summary(now, admin) for w in workers[page]],
            "sessions": shown,
            "epoch": self.epoch,
            "offset": offset,
            "workers_total": len(workers),
            "sessions_total": len(sessions),
            "role": self._role,
        }
        self._to_client(identity, Message("STATUS", body))

    def client_HEARTBEAT(self, identity: bytes, message: Message) -> None:
        """Answer with the request ids (of those the client lists) the broker does not run."""
        listed = message.body.get("in_flight", [])[:HEARTBEAT_IDS]
        missing = [
            rid for rid in listed if isinstance(rid, str) and (self._peer, rid) not in self.owned
        ]
        self._to_client(identity, Message("HEARTBEAT", {"missing": missing}))

    # -- state changes ---------------------------------------------------------------------------

    def _send_hit(self, session: RequestSession, hit: Hit, media: torch.Tensor | None) -> None:
        session.hits_sent += 1
        if hit.core != 0:  # the zero-th hit is the coarse chain's, not a core's
            session.core_hits += 1
            self.metrics.hit(session.core_hits, session.elapsed())
        body = {
            "core": hit.core,
            "round": hit.round,
            "steps": session.spec.steps,
            "elapsed_s": session.elapsed(),
        }
        tensors = {} if session.spec.output == "media" else {"latent": hit.latent}
        if media is not None:
            tensors["media"] = media
        self._to_client(session.client, Message("HIT", body, tensors, request=session.client_id))

    def _after_progress(self, session: RequestSession) -> None:
        if session.done:
            done = Message("DONE", {"stats": session.stats()}, request=session.client_id)
            self._finish(session, done)
            return
        now = self.clock()
        if session.latent_bytes >= 8 << 20 or session.evaluations % 16 == 0:
            session.held_bytes()  # samples the peak (stats' peak_bytes): always for big latents
        if now - session.last_progress >= self.config.progress_interval_s:
            session.held_bytes()
            self._progress(session)

    def _progress(self, session: RequestSession) -> None:
        """A PROGRESS to the request's client; while it waits for a worker, it says so
        (``waiting``: the model, since when, and how long before it fails)."""
        now = self.clock()
        session.last_progress = now
        body = session.progress()
        if session.no_worker_since is not None:
            fails_at = session.no_worker_since + self._patience(session)
            body["waiting"] = {
                "for": "worker",
                "model": session.model,
                "since_s": round(now - session.no_worker_since, 3),
                "fails_in_s": round(max(0.0, fails_at - now), 3),
            }
        self._to_client(session.client, Message("PROGRESS", body, request=session.client_id))

    def _patience(self, session: RequestSession) -> float:
        """How long ``session`` waits for a worker: its own ``wait_for_worker_s``, else
        ``--worker-timeout``."""
        if session.wait_for_worker_s is not None:
            return session.wait_for_worker_s
        return self.config.worker_timeout_s

    def _check_capacity(self, session: RequestSession, now: float) -> None:
        serving = self.registry.serving(session.model, now)
        capable = [w for w in serving if w.identity not in session.excluded]
        if capable:
            if session.no_worker_since is not None:  # one (re)joined: the wait is over
                session.no_worker_since = None
                self._progress(session)
            return
        if serving and session.last_bad:  # every worker there is gave it a bad result
            code = "non_finite" if session.last_bad == "non_finite" else "bad_result"
            self._fail(
                session,
                code,
                f"no healthy worker produced a usable result ({session.bad_results} bad results, "
                f"last: {session.last_bad}); the request itself may diverge",
            )
            return
        patience = self._patience(session)
        if session.no_worker_since is None:
            session.no_worker_since = now
            # Tell the client at once: its request waits, and fails after ``patience``.
            log.info(
                "request %s waits for a worker of model %r (up to %gs)",
                session.id,
                session.model,
                patience,
            )
            self._progress(session)
        elif now - session.no_worker_since > patience:
            self._fail(
                session,
                "no_worker",
                f"no worker serves model {session.model!r} (waited {patience:g}s)",
            )

    def _worker_lost(self, identity: bytes, reason: str) -> None:
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s lost: %s", worker.name, reason)
        self.metrics.failures["lost"] += 1
        for session in self.sessions.values():
            session.worker_lost(identity)

    def _fail(self, session: RequestSession, code: str, text: str) -> None:
        log.warning("request %s failed (%s): %s", session.id, code, text)
        body = {"code": code, "message": text}
        self._finish(session, Message("ERROR", body, request=session.client_id))

    def _finish(self, session: RequestSession, final: Message | None) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        if final is None or (final.kind == "DONE" and final.body["stats"].get("cancelled")):
            outcome = "cancelled"
        else:
            outcome = "done" if final.kind == "DONE" else str(final.body.get("code", "error"))
        self.metrics.requests[(session.spec.method, outcome)] += 1
        self.metrics.finished_evaluations += session.evaluations
        self.metrics.finished_retries += session.retries
        self.owned.pop((session.owner, session.client_id), None)
        left = self.per_client.pop(session.owner, 1) - 1
        if left > 0:
            self.per_client[session.owner] = left
        for identity in session.prepared | session.preparing:
            worker = self.registry.get(identity)
            if worker is not None:
                worker.prepared.discard(session.id)
                self._to_worker(identity, Message("RELEASE", request=session.id))
        if final is not None:
            self._to_client(session.client, final)

    def quarantined(self) -> list[WorkerInfo]:
        now = self.clock()
        return [w for w in self.registry.workers.values() if w.quarantined(now)]

    def _dispatch(self) -> None:
        """Hand every idle worker something to do (no round barrier)."""
        if self.stopped or not self.sessions:
            return
        idle = self.registry.idle(self.clock())
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


CLIENT_KINDS = frozenset({"SUBMIT", "CANCEL", "STATUS"})
WORKER_KINDS = frozenset({"HELLO", "PREPARED", "RESULT", "DECODED", "FAILED"})


def _client_kind(message: Message) -> bool:
    """Is this a client's message? A client's HEARTBEAT lists its requests (``in_flight``); a
    worker's carries nothing."""
    return message.kind in CLIENT_KINDS or (
        message.kind == "HEARTBEAT" and "in_flight" in message.body
    )


def _endpoint_hint(endpoint: str, side: str) -> str:
    """How a peer reaches the broker's ``side`` port: the endpoint, or its port where the
    broker bound every interface."""
    if not endpoint:
        return f"the broker's {side} port"
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if host in ("0.0.0.0", "*", "::", "[::]"):
        return f"port {port} of the broker's host"
    return endpoint


def _connection(identity: bytes) -> str:
    """The principal of a peer without a key: its connection (routing id)."""
    return "conn:" + identity.hex()
