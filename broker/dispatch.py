"""Which ready task goes to which idle worker: fair across requests, prepared workers first.

Pure decision-making over the registry and the sessions; the broker carries the decisions out.
Each idle worker takes the next session in round-robin order that has a queued task and for
which it is already prepared; failing that, it is prepared for a session that needs one more
worker (at most as many workers as the request has cores).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.registry import WorkerInfo
from broker.session import RequestSession


@dataclass(frozen=True)
class Assignment:
    worker: WorkerInfo
    session: RequestSession
    kind: str  # "EVAL", "DECODE" or "PREPARE"


class FairDispatcher:
    def __init__(self) -> None:
        self._turn = 0

    def assign(self, idle: list[WorkerInfo], sessions: list[RequestSession]) -> list[Assignment]:
        """Decisions for the currently idle workers. EVAL assignments pop their task later."""
        out: list[Assignment] = []
        queued = {s.id: len(s.queue) for s in sessions}
        decodes = {s.id: s.decode_backlog() for s in sessions}
        for worker in idle:
            count = len(sessions)
            if count == 0:
                break
            order = [sessions[(self._turn + i) % count] for i in range(count)]
            choice = None
            for session in order:  # decoding a released hit comes first: users wait for it
                if (
                    session.model == worker.model
                    and worker.identity in session.prepared
                    and decodes[session.id] > 0
                ):
                    choice = Assignment(worker, session, "DECODE")
                    decodes[session.id] -= 1
                    break
            for session in order if choice is None else []:
                if (
                    session.model == worker.model
                    and session.plan is not None
                    and queued[session.id] > 0
                    and worker.identity in session.prepared
                ):
                    choice = Assignment(worker, session, "EVAL")
                    # one EVAL takes up to spec.batch tasks (1 unless the request opted in)
                    queued[session.id] -= min(
                        session.spec.batch, worker.max_batch, queued[session.id]
                    )
                    break
            if choice is None:
                for session in order:
                    if session.model == worker.model and session.wants_worker(worker.identity):
                        choice = Assignment(worker, session, "PREPARE")
                        session.preparing.add(worker.identity)
                        break
            if choice is not None:
                out.append(choice)
                self._turn = (sessions.index(choice.session) + 1) % count
        return out
