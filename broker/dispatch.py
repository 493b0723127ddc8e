"""Which work goes to which idle worker: fair across requests, prepared workers first.

Pure decision-making over the registry and the sessions; ``BrokerCore`` sends what it decides.
``assign`` returns complete jobs: each names its kind, its worker and exactly the tasks (or the
decode) it popped from its session, so nothing downstream re-derives a count. Each idle worker
takes the next session in round-robin order that has a hit to decode or a task to run and for
which it is already prepared; failing that, it is prepared for a session that needs one more
worker (at most as many workers as the request has cores).
"""

from __future__ import annotations

from broker.registry import Job, WorkerInfo
from broker.session import RequestSession
from chords_mq.wire import DEFAULT_LIMITS

# The size of an answer we cannot predict (an initial latent, decoded media): at most one frame.
UNKNOWN_ANSWER_BYTES = DEFAULT_LIMITS.max_frame_bytes


class FairDispatcher:
    def __init__(self) -> None:
        self._turn = 0

    def assign(
        self, idle: list[WorkerInfo], sessions: list[RequestSession], now: float
    ) -> list[Job]:
        """Jobs for the currently idle workers, their tasks already taken from the sessions."""
        jobs: list[Job] = []
        count = len(sessions)
        if count == 0:
            return jobs
        for worker in idle:
            turn = self._turn % count
            order = sessions[turn:] + sessions[:turn] if turn else sessions
            job = self._decode(worker, order, now) or self._eval(worker, order, now)
            job = job or self._prepare(worker, order, now)
            if job is not None:
                worker.job = job
                jobs.append(job)
                chosen = next(s for s in order if s.id == job.request)
                self._turn = (sessions.index(chosen) + 1) % count
        return jobs

    @staticmethod
    def _decode(worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        """Decoding a released hit comes first: users wait for it."""
        for session in order:
            if session.model == worker.model and worker.identity in session.prepared:
                pending = session.next_decode(worker.identity)
                if pending is not None:
                    return Job(
                        "DECODE",
                        session.id,
                        worker.identity,
                        now,
                        decode=pending,
                        expected_bytes=UNKNOWN_ANSWER_BYTES,
                    )
        return None

    @staticmethod
    def _eval(worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        for session in order:
            if session.model != worker.model or worker.identity not in session.prepared:
                continue
            if session.dispatchable() == 0:
                continue
            # One EVAL takes up to spec.batch tasks (1 unless the request opted in).
            taken = session.take(worker.identity, min(session.spec.batch, worker.max_batch))
            results = sum(len(task.targets) for task, _ in taken) * session.latent_bytes
            return Job("EVAL", session.id, worker.identity, now, taken, expected_bytes=results)
        return None

    @staticmethod
    def _prepare(worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        for session in order:
            if session.model == worker.model and session.wants_worker(worker.identity):
                session.preparing.add(worker.identity)
                initial = session.plan is None and session.x0_from is None
                if initial:
                    session.x0_from = worker.identity
                size = UNKNOWN_ANSWER_BYTES if initial else 0
                return Job(
                    "PREPARE",
                    session.id,
                    worker.identity,
                    now,
                    initial=initial,
                    expected_bytes=size,
                )
        return None
