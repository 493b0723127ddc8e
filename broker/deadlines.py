"""When a running EVAL is late: past ``deadline_factor`` times its worker's expected time (at
least ``deadline_floor_s``), plus its transfers there and back at the slowest rate liveness
allows for. Only EVALs have deadlines here; what happens to a late one is the failure policy's
(``broker.failures``: a copy on another worker, or, with no other worker, it runs on).
"""

from __future__ import annotations

from collections.abc import Mapping

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.wire import Kind


class Deadlines:
    def __init__(
        self,
        config: BrokerConfig,
        registry: WorkerRegistry,
        sessions: Mapping[str, RequestSession],
    ) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions

    def deadline(self, worker: WorkerInfo) -> float | None:
        """When the worker's EVAL becomes late (None: no EVAL, already late, or no estimate)."""
        job = worker.job
        if job is None or job.kind is not Kind.EVAL or job.late:
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

    def next(self) -> float | None:
        """The earliest time a running EVAL becomes late."""
        deadlines = [d for w in self.registry.workers.values() if (d := self.deadline(w))]
        return min(deadlines, default=None)

    def overdue(self, now: float) -> list[WorkerInfo]:
        """The workers whose EVAL is late as of ``now``, each job now marked late (so it is
        found once)."""
        late = []
        for worker in list(self.registry.workers.values()):
            deadline = self.deadline(worker)
            if deadline is not None and now >= deadline:
                assert worker.job is not None
                worker.job.late = True
                late.append(worker)
        return late

    def could_copy(self, session: RequestSession, late: WorkerInfo, now: float) -> bool:
        """Is there a worker other than ``late`` that could run a copy of its tasks (of the
        request's model, not excluded from it, not quarantined, not late itself)?"""
        return any(
            w.identity != late.identity
            and w.identity not in session.excluded
            and not w.quarantined(now)
            for w in self.registry.serving(session.model, now)
        )
