"""Which workers hold which requests: the one owner of the relation "worker W is preparing, or
is prepared for, request R" (and "R must not use W again").

The relation is read at both ends, by the dispatcher and the sessions (``session.preparing``,
``session.prepared``, ``session.excluded``, ``worker.prepared``); it is written only here, so
the two ends never disagree. A worker that leaves a request is sent RELEASE (its cached context
goes) unless it cannot have one.
"""

from __future__ import annotations

from collections.abc import Iterable

from chords_mq.broker.outbox import Outbox
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.wire import ReleaseMessage


class Bindings:
    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry

    def preparing(self, worker: WorkerInfo, session: RequestSession) -> None:
        """A PREPARE goes to ``worker`` for ``session``."""
        session.preparing.add(worker.identity)

    def bind(self, worker: WorkerInfo, session: RequestSession) -> None:
        """``worker`` answered its PREPARE: it holds the request's context now (whatever
        follows releases it)."""
        session.preparing.discard(worker.identity)
        session.prepared.add(worker.identity)
        worker.prepared.add(session.id)

    def not_preparing(self, session: RequestSession, identity: bytes) -> None:
        """A PREPARE that did not complete: the worker holds nothing of the request."""
        session.preparing.discard(identity)

    def unbind(
        self,
        out: Outbox | None,
        worker: WorkerInfo,
        session: RequestSession,
        exclude: bool = False,
    ) -> None:
        """``worker`` no longer serves ``session`` (``exclude``: never again); RELEASE goes to
        it unless ``out`` is None (its context is already gone)."""
        session.prepared.discard(worker.identity)
        worker.prepared.discard(session.id)
        session.holder_gone(worker.identity)  # its results for the request go with it
        if exclude:
            session.excluded.add(worker.identity)
        if out is not None:
            out.to_worker(worker.identity, ReleaseMessage(request=session.id))

    def forget_worker(self, identity: bytes, sessions: Iterable[RequestSession]) -> None:
        """A worker is gone: no request counts it as preparing or prepared any more."""
        for session in sessions:
            session.prepared.discard(identity)
            session.preparing.discard(identity)

    def release_worker(
        self, out: Outbox, worker: WorkerInfo, sessions: Iterable[RequestSession]
    ) -> None:
        """Take back everything ``worker`` holds (it is quarantined): its job runs elsewhere,
        each request it was preparing or prepared for is released."""
        for session in sessions:
            had = worker.identity in session.prepared or worker.identity in session.preparing
            session.worker_lost(worker.identity)
            session.prepared.discard(worker.identity)
            session.preparing.discard(worker.identity)
            if had:
                out.to_worker(worker.identity, ReleaseMessage(request=session.id))
        worker.prepared.clear()
        worker.job = None

    def release_session(self, out: Outbox, session: RequestSession) -> None:
        """The request is over: every worker that holds it is released."""
        for identity in session.prepared | session.preparing:
            worker = self.registry.get(identity)
            if worker is not None:
                worker.prepared.discard(session.id)
                out.to_worker(identity, ReleaseMessage(request=session.id))
