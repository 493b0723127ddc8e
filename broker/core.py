"""BrokerCore: every decision the broker makes, behind its nine inputs, with no I/O.

The inputs are a decoded message from a worker or a client, a malformed one, a clock tick, and
the events the I/O edge observes (a worker unreachable, a TCP disconnect, a client gone,
SIGTERM, the allow-list's worker keys read again). Each returns the messages to send
(``Send``); ``broker/server.py`` moves them. The clock is injected, so
``tests/test_broker_core.py`` drives every branch with a fake clock and no processes. State is
plain data owned by whoever calls the core (the server's event loop); no locks, no awaits, and
nothing kept between inputs but the parts' own state:

- ``registry`` (``broker.registry``): the workers, their jobs and speeds;
- ``sessions`` (``broker.sessions``): the running requests, namespaced by owner;
- ``bindings`` (``broker.bindings``): which worker holds which request;
- ``admission`` (``broker.admission``): limits and the cores policy;
- ``trust`` (``broker.trust``): strikes and quarantines;
- ``probes`` (``broker.probes``): a third principal's check of corrupt_input claims;
- ``deadlines`` (``broker.deadlines``): when an EVAL is late;
- ``failures`` (``broker.failures``): the failure policy, one table;
- ``lifecycle`` (``broker.lifecycle``): hits, progress and the end of a request;
- ``dispatcher`` (``broker.dispatch``): which task goes to which idle worker.

The handlers of each message kind are in ``broker.handlers``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable

from chords_mq.algorithms.base import Ref, as_tensor
from chords_mq.broker.admission import Admission
from chords_mq.broker.bindings import Bindings
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.deadlines import Deadlines
from chords_mq.broker.dispatch import FairDispatcher
from chords_mq.broker.failures import Failure, FailurePolicy
from chords_mq.broker.handlers import ClientHandlers, WorkerHandlers
from chords_mq.broker.lifecycle import RequestLifecycle
from chords_mq.broker.links import Links, host_of
from chords_mq.broker.metrics import CoreMetrics
from chords_mq.broker.outbox import Outbox, Send, Side
from chords_mq.broker.parts import HitStream, stream_for
from chords_mq.broker.peers import Peer, PeerLog, Role, claimed_principal, endpoint_host
from chords_mq.broker.probes import Probes
from chords_mq.broker.registry import Job, WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.broker.sessions import SessionTable
from chords_mq.broker.trust import Trust
from chords_mq.broker.verify import Records, Verification
from chords_mq.broker.views import RequestView, WorkerView, requests_view, workers_view
from chords_mq.errors import ChordsError
from chords_mq.wire import (
    CLIENT_SENDS,
    DTYPE_NAMES,
    MAX_POOL_KEYS,
    WORKER_SENDS,
    DecodeMessage,
    DisconnectMessage,
    DropMessage,
    ErrorMessage,
    EvalMessage,
    HeartbeatMessage,
    HelloMessage,
    Kind,
    Message,
    PoolMessage,
    PrepareMessage,
    TaskEntry,
)
from chords_mq.wire.named import (
    MAX_DROP_REFS,
    MAX_HOLDERS,
    X0_REF,
    Holder,
    Push,
    named_input,
)

__all__ = ["BrokerConfig", "BrokerCore", "Send", "TooManyPoolKeys"]

log = logging.getLogger("chords.broker")


class TooManyPoolKeys(ChordsError, ValueError):
    """More worker keys than one WELCOME or POOL carries (``MAX_POOL_KEYS``)."""


class BrokerCore:
    """The broker's decisions. Each public method is an input and returns what to send."""

    def __init__(
        self,
        config: BrokerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        epoch: int | None = None,
    ) -> None:
        self.config = config = config or BrokerConfig()
        self.clock = clock
        self.epoch = epoch if epoch is not None else int.from_bytes(os.urandom(6), "big") + 1
        self.registry = WorkerRegistry(
            config.liveness * config.heartbeat_s,
            config.transfer_floor_bytes_s,
            remembered=4 * config.max_workers,  # as Trust's tables
        )
        self.sessions = SessionTable(self.epoch)
        self.metrics = CoreMetrics()  # what /metrics shows (broker.metrics renders it)
        self.peer_log = PeerLog(clock, config.log_burst, config.log_interval_s)
        self.bindings = Bindings(self.registry)
        self.trust = Trust(config, self.registry, clock)
        # corrupt_input claims of two principals checked by a third's fetch before a strike
        self.probes = Probes(config, self.registry, clock)
        # verification by redundancy: each principal's clean record, and the checks' logic
        self.verification = Verification(config, self.registry, Records(config))
        self.deadlines = Deadlines(config, self.registry, self.sessions)
        self.admission = Admission(config, clock, self.sessions, self.registry, self.peer_log)
        self.lifecycle = RequestLifecycle(
            config, clock, self.sessions, self.registry, self.bindings, self.metrics
        )
        self.failures = FailurePolicy(
            config,
            clock,
            self.registry,
            self.sessions,
            self.bindings,
            self.trust,
            self.lifecycle,
            self.metrics,
        )
        # "eft": placement by earliest finish time (the speed model); "fifo": any idle worker.
        speeds = self.registry if config.placement == "eft" else None
        # The bandwidth between hosts, learnt from the workers' fetches (RESULT.fetched).
        self.links = Links()
        links = self.links if config.link_placement else None
        self.dispatcher = FairDispatcher(speeds, self.bindings, links)
        self.dispatcher.chain = config.chain
        self.dispatcher.push = config.push
        self.dispatcher.push_local = config.push_local
        self.draining = False
        self.drain_deadline = 0.0
        self.stopped = False  # drained: the server may exit
        self.last_beat = -1e9
        # In a CURVE pool: the public keys of the pool's workers (z85, sorted), which WELCOME
        # and POOL hand to every worker for its data server; None without CURVE.
        self.pool_keys: tuple[str, ...] | None = None
        self._workers = WorkerHandlers(self)
        self._clients = ClientHandlers(self)

    # -- the inputs ------------------------------------------------------------------------------

    def worker_message(
        self,
        identity: bytes,
        message: Message,
        principal: str | None = None,
        address: str | None = None,
    ) -> list[Send]:
        """A message from a worker connection. ``principal`` is the key it authenticated with.
        None when insecure: the worker is who its HELLO claims, by name and host (``address``,
        the host it connects from if the transport says, else its data endpoint's)."""
        worker = self.registry.get(identity)
        if principal is None and isinstance(message, HelloMessage):
            host = address or endpoint_host(message.data)
            principal = claimed_principal(message.worker, host)
        elif principal is None and worker is not None:
            principal = worker.principal
        peer = Peer.of(identity, principal, "worker")
        if worker is None and _client_kind(message):
            return self._run(peer, lambda out: self._wrong_port(out, "worker", peer, message))
        handler = self._workers.by_kind.get(message.kind)
        if handler is None:
            reason = f"a worker may not send {message.kind.value}"
            return self.bad_message("worker", identity, reason)
        if (
            worker is not None
            and message.kind is not Kind.HELLO
            and worker.principal != peer.principal
        ):
            return self.bad_message("worker", identity, "sent under another worker's routing id")
        return self._run(peer, lambda out: handler(out, peer, message), message)

    def client_message(
        self,
        identity: bytes,
        message: Message,
        principal: str | None = None,
        role: Role = "client",
    ) -> list[Send]:
        """A message from a client connection; ``role`` is "client" or "admin" (which also sees
        everything in STATUS)."""
        peer = Peer.of(identity, principal, role)
        handler = self._clients.by_kind.get(message.kind)
        if handler is None and message.kind in WORKER_SENDS:
            return self._run(peer, lambda out: self._wrong_port(out, "client", peer, message))
        if handler is None:
            reason = f"a client may not send {message.kind.value}"
            return self.bad_message("client", identity, reason)
        return self._run(peer, lambda out: handler(out, peer, message), message)

    def bad_message(self, side: Side, identity: bytes, reason: str) -> list[Send]:
        """A message from ``identity`` that could not be decoded, or may not come from it."""

        def reject(out: Outbox) -> None:
            self.peer_log.warning(
                (side, identity),
                "rejected a malformed message from %s %r: %s",
                side,
                identity[:64],
                reason[:200],
            )
            if side == "client":
                out.client_error(identity, "bad_message", reason, None)
                return
            self.failures.apply(out, Failure.MALFORMED, identity=identity, detail=reason)

        return self._run(None, reject)

    def tick(self, now: float) -> list[Send]:
        """Housekeeping: expire silent workers, late jobs, heartbeats, requests that wait for
        a worker, the drain."""

        def housekeeping(out: Outbox) -> None:
            for worker in self.registry.expired(now):
                detail = "missed heartbeats"
                self.failures.apply(
                    out, Failure.WORKER_LOST, identity=worker.identity, detail=detail
                )
            for worker in self.deadlines.overdue(now):
                self._late(out, worker, now)
            for verdict in self.probes.expired(now):  # unanswered: no verdict
                self._workers.judged(out, verdict)
            if now - self.last_beat >= self.config.heartbeat_s:
                self.last_beat = now
                for identity in list(self.registry.workers):
                    out.to_worker(identity, HeartbeatMessage())
            for session in list(self.sessions.values()):
                self.lifecycle.check_capacity(out, session, now)
            if self.draining and (not self.sessions or now >= self.drain_deadline):
                self._stop(out)

        return self._run(None, housekeeping)

    def worker_unreachable(self, identity: bytes) -> list[Send]:
        """A send to this worker found it gone (EHOSTUNREACH) or congested."""
        return self._run(
            None,
            lambda out: self.failures.apply(
                out, Failure.WORKER_LOST, identity=identity, detail="unreachable"
            ),
        )

    def connection_dropped(self) -> list[Send]:
        """The worker socket saw a TCP disconnect: probe every worker at once, so the lost one
        is found in milliseconds rather than after missed heartbeats."""

        def probe(out: Outbox) -> None:
            for identity in list(self.registry.workers):
                out.to_worker(identity, HeartbeatMessage())

        return self._run(None, probe)

    def client_gone(self, identity: bytes) -> list[Send]:
        """A client cannot be reached: end its requests quietly and release their workers."""

        def forget(out: Outbox) -> None:
            gone = [s for s in self.sessions.values() if s.client == identity]
            if gone:
                log.warning("client %r is gone; cancelling %d request(s)", identity, len(gone))
            for session in gone:
                self.lifecycle.cancel(out, session, tell_client=False)

        return self._run(None, forget)

    def begin_drain(self) -> list[Send]:
        """SIGTERM: refuse new requests, let running ones finish until the drain timeout."""

        def drain(out: Outbox) -> None:
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
                self._stop(out)

        return self._run(None, drain)

    def set_pool_keys(self, keys: Iterable[bytes] | None) -> list[Send]:
        """The allow-list's worker keys, at start and after each reload (None: no CURVE).
        Every registered worker gets the new set in a POOL if it changed; a worker that
        registers later gets it in its WELCOME. ``TooManyPoolKeys`` past ``MAX_POOL_KEYS``
        (the keys handed out stay as they were)."""
        found = None if keys is None else tuple(sorted({key.decode() for key in keys}))
        if found is not None and len(found) > MAX_POOL_KEYS:
            raise TooManyPoolKeys(
                f"{len(found)} worker keys: a WELCOME carries at most {MAX_POOL_KEYS}"
            )

        def hand_out(out: Outbox) -> None:
            if found == self.pool_keys:
                return
            self.pool_keys = found
            if found is None:
                return
            for identity in list(self.registry.workers):
                out.to_worker(identity, PoolMessage(pool_keys=found))

        return self._run(None, hand_out)

    def next_deadline(self) -> float | None:
        """The earliest time a running job becomes late: the I/O shell calls ``tick`` then,
        so a hung worker is found at its deadline, not at the next housekeeping tick."""
        return self.deadlines.next()

    # -- read-only views -------------------------------------------------------------------------

    def workers_view(self) -> dict[bytes, WorkerView]:
        """The workers, read-only, by routing id (what an admin's STATUS shows)."""
        return workers_view(self.registry, self.clock())

    def requests_view(self) -> dict[str, RequestView]:
        """The running requests, read-only, by their client's id."""
        return requests_view(self.sessions.values())

    def quarantined(self) -> list[WorkerInfo]:
        return self.trust.quarantined()

    # -- the run of one input ------------------------------------------------------------------

    def _run(
        self, peer: Peer | None, action: Callable[[Outbox], None], message: Message | None = None
    ) -> list[Send]:
        """Run one input, then dispatch; return what to send. A bug in a handler fails only the
        request it concerns, never the broker."""
        out = Outbox(self.epoch)
        try:
            action(out)
        except Exception:
            kind = message.kind.value if message is not None else "an event"
            log.exception("handling %s failed", kind)
            session = self._concerned(peer, message)
            if session is not None:
                self.lifecycle.fail(out, session, "internal", f"broker error handling {kind}")
        try:
            self._data_plane(out)
        except Exception:
            log.exception("the data plane's bookkeeping failed")
        try:
            self._dispatch(out)
        except Exception:
            log.exception("dispatch failed")
        return out.sends

    def _concerned(self, peer: Peer | None, message: Message | None) -> RequestSession | None:
        """The request a message is about: a client's own id, or a worker's (the broker's id)."""
        if peer is None or message is None or message.request is None:
            return None
        owned = self.sessions.owned(peer.principal, message.request)
        return owned if owned is not None else self.sessions.get(message.request)

    def _wrong_port(self, out: Outbox, port: Side, peer: Peer, message: Message) -> None:
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
            ("wrong_port", peer.identity), "a %s at the %s port: %s", message.kind.value, port, text
        )
        request = message.request if port == "worker" else None
        error = ErrorMessage(code="wrong_port", message=text, request=request)
        if port == "worker":
            out.to_worker(peer.identity, error)
        else:
            out.to_client(peer.identity, error)

    def _late(self, out: Outbox, worker: WorkerInfo, now: float) -> None:
        """An EVAL past its deadline: copied to another worker, or, with no other, left to run
        (the failure policy's LATE_EVAL rows); a PREPARE or DECODE: ``_late_job``."""
        job = worker.job
        assert job is not None
        if job.kind is not Kind.EVAL:
            self._late_job(out, worker, now)
            return
        assert job.expected_s is not None
        took, expected = (now - job.sent_at) * 1000, job.expected_s * 1000
        session = self.sessions.get(job.request)
        if session is not None and not self.deadlines.could_copy(session, worker, now):
            # Copying would only run the task again on this worker, after a RELEASE and a new
            # PREPARE. Its lateness is measured against nobody's: not held against it.
            log.info(
                "worker %s is late: %.0f ms on an EVAL it should finish in %.0f ms; no other "
                "worker can take a copy, so it runs on",
                worker.name,
                took,
                expected,
            )
            self.failures.apply(out, Failure.LATE_EVAL_ALONE, worker=worker)
            return
        self.peer_log.warning(
            ("late", worker.principal),
            "worker %s is late: %.0f ms on an EVAL it should finish in %.0f ms; its tasks are "
            "copied to another worker and it gets no work until it answers (%d missed in a row)",
            worker.name,
            took,
            expected,
            worker.missed + 1,
        )
        self.failures.apply(out, Failure.LATE_EVAL, worker=worker, session=session, job=job)

    def _late_job(self, out: Outbox, worker: WorkerInfo, now: float) -> None:
        """A PREPARE or DECODE past its deadline: another worker is prepared, or decodes the
        hit, while this one gets no work until it answers (the LATE_JOB rows)."""
        job = worker.job
        assert job is not None
        took = (now - job.sent_at) * 1000
        session = self.sessions.get(job.request)
        if session is None or not self.deadlines.could_copy(session, worker, now):
            log.info(
                "worker %s is late: %.0f ms on a %s; no other worker can take it, so it runs on",
                worker.name,
                took,
                job.kind.value,
            )
            self.failures.apply(out, Failure.LATE_JOB_ALONE, worker=worker)
            return
        self.peer_log.warning(
            ("late", worker.principal),
            "worker %s is late: %.0f ms on a %s; it runs on another worker and this one gets "
            "no work until it answers (%d missed in a row)",
            worker.name,
            took,
            job.kind.value,
            worker.missed + 1,
        )
        self.failures.apply(out, Failure.LATE_JOB, worker=worker, session=session, job=job)

    def count_latents(self, session: RequestSession, nbytes: int) -> None:
        """Latent bytes that went through the broker, to or from a worker."""
        session.broker_latent_bytes += nbytes
        self.metrics.latent_bytes += nbytes

    def _data_plane(self, out: Outbox) -> None:
        """After each input, for the requests on the data plane: a recovery past its bound
        fails its request (the failure table's row), and what their workers may let go goes
        out as DROPs (at most ``MAX_DROP_REFS`` refs each)."""
        for session in list(self.sessions.values()):
            if not session.named:  # off it: its checks' replicas may have nobody left
                tainted = session.verifying.tainted
                if tainted is not None:
                    self.failures.apply(out, Failure.UNVERIFIABLE, session=session, detail=tainted)
                elif session.verifying.checks:
                    self._verifiable(out, session)
                continue
            failed = session.recovery_failed
            if failed is not None:
                session.recovery_failed = None
                self.failures.apply(out, failed.failure, session=session, detail=str(failed))
                continue
            if session.verifying.checks and not self._verifiable(out, session):
                continue
            if not session.drops:
                continue
            for holder, refs in session.take_drops().items():
                if self.registry.get(holder) is None:
                    continue
                ordered = sorted(refs, key=lambda ref: (ref.task, ref.target))
                for start in range(0, len(ordered), MAX_DROP_REFS):
                    chunk = tuple(ordered[start : start + MAX_DROP_REFS])
                    out.to_worker(holder, DropMessage(refs=chunk, request=session.id))

    def _verifiable(self, out: Outbox, session: RequestSession) -> bool:
        """Checks whose replica no worker left may run end (``Verification.unverifiable``):
        their hits go out; disagreeing answers fail the request (False)."""
        for outcome in self.verification.stalled(session, self.clock()):
            hits = self._workers.verified(out, session, outcome, outcome.task or 0)
            if session.id not in self.sessions:
                return False
            self.lifecycle.released(out, session, hits)
        hits, unsettled = self.verification.unverifiable(session, self.clock())
        if unsettled:
            detail = f"the results of task {unsettled[0].task.id} disagree, and no worker is left"
            self.failures.apply(out, Failure.UNVERIFIABLE, session=session, detail=detail)
            return False
        if hits:
            self.lifecycle.released(out, session, hits)
            self.lifecycle.after_progress(out, session)
        return session.id in self.sessions

    def _holders(self, session: RequestSession, ref: Ref, worker: bytes) -> tuple[Holder, ...]:
        """The data endpoints (and CURVE keys) of the workers holding ``ref`` (x0: every
        prepared worker), ``worker`` itself first: it uses what it holds in place."""
        identities = session.prepared if ref == X0_REF else session.directory.holders(ref)
        ordered = sorted(identities, key=lambda identity: (identity != worker, identity))
        if len(ordered) > 1 and ref != X0_REF:
            ordered = self._nearest(ordered, worker, session.latent_bytes)
        holders = []
        x0_digest = session.x0_digest or None  # ("" where a worker withheld it)
        for identity in ordered:
            info = self.registry.get(identity)
            if info is None or info.data is None:
                continue
            key = info.principal[4:] if info.principal.startswith("key:") else None
            # what it reported of ``ref``: the fetching worker checks what it receives (None
            # with --verify off, where results carry none: the fetcher checks nothing; x0's
            # digest, one per request from PREPARED, is named always)
            digest = x0_digest if ref == X0_REF else session.directory.digest(ref, identity)
            holders.append(Holder(info.data, key, digest))
            if len(holders) == MAX_HOLDERS:
                break
        return tuple(holders)

    def _pushes(self, job: Job) -> tuple[Push, ...]:
        """The EVAL's ``push``: each result the dispatcher has its worker push
        (``Job.push``), to the data endpoints (and CURVE keys) of the workers that read it."""
        pushes = []
        for ref, identities in job.push.items():
            to = []
            for identity in identities:
                info = self.registry.get(identity)
                if info is not None and info.data is not None:
                    key = info.principal[4:] if info.principal.startswith("key:") else None
                    to.append(Holder(info.data, key))
            if to:
                pushes.append(Push(ref.task, ref.target, tuple(to)))
        return tuple(pushes)

    def _nearest(self, holders: list[bytes], worker: bytes, nbytes: int) -> list[bytes]:
        """``holders`` by what fetching from each to ``worker`` costs (stable: ties keep
        their order)."""
        info = self.registry.get(worker)
        if info is None:
            return holders
        here = host_of(info.data, info.identity)

        def cost(identity: bytes) -> float:
            if identity == worker:
                return -1.0
            other = self.registry.get(identity)
            if other is None:
                return float("inf")
            return self.links.seconds(host_of(other.data, identity), here, nbytes)

        return sorted(holders, key=cost)

    def _stop(self, out: Outbox) -> None:
        for session in list(self.sessions.values()):
            self.failures.apply(
                out, Failure.DRAIN_TIMEOUT, session=session, detail="the broker is shutting down"
            )
        for identity in list(self.registry.workers):
            bye = DisconnectMessage(reason="broker shutting down", shutdown=True)
            out.to_worker(identity, bye)
        self.stopped = True

    def _stream(self, session: RequestSession, job: Job) -> HitStream | None:
        """The pieces a DECODE by name asks its hit's latent in (``broker.parts``): a big
        latent, a client that takes pieces and a worker that sends them; else None (whole)."""
        worker = self.registry.get(job.worker)
        if not self.config.hit_parts:
            return None
        if not session.hit_parts or worker is None or not worker.parts:
            return None
        return stream_for(session.latent_shape, session.result_dtype, session.verify)

    def _dispatch(self, out: Outbox) -> None:
        """Hand every idle worker something to do (no round barrier)."""
        if self.stopped or not self.sessions:
            return
        now = self.clock()
        idle = self.registry.idle(now)
        if not idle:
            return
        for job in self.dispatcher.assign(idle, list(self.sessions.values()), now):
            session = self.sessions[job.request]
            holders_of = functools.partial(self._holders, session, worker=job.worker)
            if job.kind is Kind.PREPARE:
                # x0 past this would be refused: its worker declares it and keeps it
                limit = self.config.max_request_bytes // session.spec.working_set_latents()
                message: Message = PrepareMessage(
                    spec=session.spec.to_dict(),
                    initial=job.x0,
                    request=session.id,
                    max_latent_bytes=limit,
                )
            elif job.kind is Kind.DECODE and session.named:
                assert job.decode is not None
                want_latent = session.spec.output != "media"
                job.stream = self._stream(session, job) if want_latent else None
                message = DecodeMessage(
                    value=named_input(job.decode.hit.latent, holders_of),
                    media=session.wants_media,
                    want_latent=want_latent,
                    parts=None if job.stream is None else job.stream.parts,
                    request=session.id,
                    task=job.decode.decode_id,
                )
            elif job.kind is Kind.DECODE:
                assert job.decode is not None
                latent = as_tensor(job.decode.hit.latent)
                self.count_latents(session, latent.numel() * latent.element_size())
                message = DecodeMessage(
                    latent=latent, request=session.id, task=job.decode.decode_id
                )
            elif session.named:  # by name: each input where it is, no tensor
                first_task, first_attempt = job.tasks[0]
                dtype = session.result_dtype
                message = EvalMessage(
                    entries=tuple(
                        TaskEntry(t.id, attempt, t.step, t.core, t.targets)
                        for t, attempt in job.tasks
                    ),
                    inputs=tuple(named_input(t.latent, holders_of) for t, _ in job.tasks),
                    dtype=None if dtype is None else DTYPE_NAMES.get(dtype),
                    # --verify off: nothing is compared, so results carry no digest (not
                    # computed: on the step's critical path) and fetches check nothing
                    digests=None if session.verify else False,
                    chain=True if job.chain else None,
                    push=self._pushes(job) or None,
                    pushed=job.pushed or None,
                    request=session.id,
                    task=first_task.id,
                    attempt=first_attempt,
                    epoch=self.epoch,
                )
            else:
                first_task, first_attempt = job.tasks[0]
                latents = tuple(as_tensor(t.latent) for t, _ in job.tasks)
                self.count_latents(session, sum(t.numel() * t.element_size() for t in latents))
                message = EvalMessage(
                    entries=tuple(
                        TaskEntry(t.id, attempt, t.step, t.core, t.targets)
                        for t, attempt in job.tasks
                    ),
                    latents=latents,
                    request=session.id,
                    task=first_task.id,
                    attempt=first_attempt,
                    epoch=self.epoch,  # stamped already: no copy in the outbox (the hot path)
                )
            out.to_worker(job.worker, message)


def _client_kind(message: Message) -> bool:
    """Is this a client's message? A client's HEARTBEAT lists its requests (``in_flight``); a
    worker's carries nothing."""
    return message.kind in CLIENT_SENDS or (
        isinstance(message, HeartbeatMessage) and message.in_flight is not None
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
