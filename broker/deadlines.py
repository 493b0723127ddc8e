"""When a running job is late. An EVAL: past ``deadline_factor`` times its worker's expected
time (at least ``deadline_floor_s``), plus its transfers there and back at the slowest rate
liveness allows for. A PREPARE or a DECODE: past ``deadline_factor`` times what that worker
(else its model's workers) took for one, kept between ``job_deadline_floor_s`` and
``job_deadline_ceiling_s`` (the ceiling itself before anything is learnt), plus the request's
latent at that rate. What happens to a late job is the failure policy's (``broker.failures``:
it runs elsewhere, or, with no other worker, it runs on). A worker that waits on a transfer
(FETCH) is bounded by its own wait and answers FAILED lost_input, or its EVAL or DECODE is late.
"""

from __future__ import annotations

from collections.abc import Mapping

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.wire import Kind

LEARNT_ALPHA = 0.3  # as the speed model's EMA
MAX_LEARNT = 4096  # (who, kind) pairs remembered; the oldest forgotten first


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
        # What a PREPARE and a DECODE took, as the broker saw them: an EMA per worker (by
        # principal: it follows the worker across reconnects) and per model.
        self.learnt: dict[tuple[str, Kind], float] = {}

    def observe(self, worker: WorkerInfo, kind: Kind, seconds: float) -> None:
        """A PREPARE or DECODE of ``worker`` answered after ``seconds``, late or not: a worker
        slower than the others learns its own time (so it is not late at every request), and
        the ceiling bounds what it teaches its model."""
        for key in ((worker.principal, kind), (f"model:{worker.model}", kind)):
            old = self.learnt.pop(key, None)
            self.learnt[key] = seconds if old is None else old + LEARNT_ALPHA * (seconds - old)
        while len(self.learnt) > MAX_LEARNT:
            self.learnt.pop(next(iter(self.learnt)))

    def expected(self, worker: WorkerInfo, kind: Kind) -> float | None:
        """What a PREPARE or DECODE should take ``worker``: its own, else its model's."""
        own = self.learnt.get((worker.principal, kind))
        return own if own is not None else self.learnt.get((f"model:{worker.model}", kind))

    def deadline(self, worker: WorkerInfo) -> float | None:
        """When the worker's job becomes late (None: no job, already late, or an EVAL with no
        estimate)."""
        job = worker.job
        if job is None or job.late:
            return None
        if job.kind is not Kind.EVAL:
            return self._job_deadline(worker, job.kind, job.sent_at, job.request)
        if job.expected_s is None:  # sent before anything was known: the estimate learnt since
            session = self.sessions.get(job.request)
            if session is not None:
                # (a chain's tasks run one after another: one EVAL's time each)
                key = (session.latent_bytes, 1 if job.chain else len(job.tasks))
                job.expected_s = self.registry.expected(worker, key)
                if job.expected_s is not None and job.chain:
                    job.expected_s *= len(job.tasks)
            if job.expected_s is None:
                return None
        # A large answer's transfer time varies with the load: allow it, as liveness does.
        limit = max(self.config.deadline_factor * job.expected_s, self.config.deadline_floor_s)
        moved = 2 * job.expected_bytes + job.fetch_bytes  # there and back, and its inputs in
        limit += moved / self.config.transfer_floor_bytes_s
        return job.sent_at + limit

    def _job_deadline(self, worker: WorkerInfo, kind: Kind, sent_at: float, request: str) -> float:
        """A PREPARE's or DECODE's deadline: the learnt time times the factor, between the
        floor and the ceiling (the ceiling while nothing is learnt), plus the request's latent
        at the transfer floor (x0 in a PREPARED, a hit's latent in a DECODED)."""
        config = self.config
        learnt = self.expected(worker, kind)
        limit = config.job_deadline_ceiling_s
        if learnt is not None:
            limit = min(max(config.deadline_factor * learnt, config.job_deadline_floor_s), limit)
        session = self.sessions.get(request)
        latent = 0
        if session is not None:  # before x0 arrives, the size PREPARED declared
            declared = session.declared
            latent = session.latent_bytes or (0 if declared is None else declared.nbytes)
        return sent_at + limit + latent / config.transfer_floor_bytes_s

    def next(self) -> float | None:
        """The earliest time a running job becomes late."""
        deadlines = [d for w in self.registry.workers.values() if (d := self.deadline(w))]
        return min(deadlines, default=None)

    def overdue(self, now: float) -> list[WorkerInfo]:
        """The workers whose job is late as of ``now``, each job now marked late (so it is
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
