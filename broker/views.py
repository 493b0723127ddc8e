"""Read-only views of the broker core's state, for tests and operators: what STATUS shows, not
the fields behind it, so the core's shape can change without breaking what reads it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chords_mq.broker.registry import WorkerRegistry
from chords_mq.broker.session import RequestSession


@dataclass(frozen=True)
class WorkerView:
    """What the broker knows of a worker, read-only (what an admin's STATUS shows)."""

    alias: str
    name: str
    model: str
    state: str  # ready, busy, quarantined
    completed: int
    bad_results: int
    missed_deadlines: int
    prepared: int  # requests it holds
    data: str | None  # the data endpoint it advertised in HELLO


@dataclass(frozen=True)
class RequestView:
    """What the broker knows of a running request, read-only."""

    id: str  # the broker's own
    client_id: str
    state: str  # broker.states.RequestState's value
    evaluations: int
    retries: int
    queued: int
    in_flight: int
    workers: int  # prepared for it
    excluded: int  # workers it will not use again (bad PREPARED or RESULT)
    waiting_for_worker: bool


def workers_view(registry: WorkerRegistry, now: float) -> dict[bytes, WorkerView]:
    return {
        identity: WorkerView(
            alias=w.alias,
            name=w.name,
            model=w.model,
            state=w.state(now),
            completed=w.completed,
            bad_results=w.bad_results,
            missed_deadlines=w.missed,
            prepared=len(w.prepared),
            data=w.data,
        )
        for identity, w in registry.workers.items()
    }


def requests_view(sessions: Iterable[RequestSession]) -> dict[str, RequestView]:
    return {
        s.client_id: RequestView(
            id=s.id,
            client_id=s.client_id,
            state=s.state.value,
            evaluations=s.evaluations,
            retries=s.retries,
            queued=s.queued,
            in_flight=len(s.in_flight),
            workers=len(s.prepared),
            excluded=len(s.excluded),
            waiting_for_worker=s.no_worker_since is not None,
        )
        for s in sessions
    }
