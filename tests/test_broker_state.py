"""The broker's plain-data state, without sockets: sessions, attempts, fair dispatch."""

from __future__ import annotations

import torch

from broker.dispatch import FairDispatcher
from broker.registry import WorkerInfo, WorkerRegistry
from broker.session import RequestSession
from chords_mq.request import RequestSpec
from chords_mq.solvers import unit_euler


def started_session(request_id: str, cores: int = 2, steps: int = 10) -> RequestSession:
    session = RequestSession(
        request_id, b"client", RequestSpec(model="m", cores=cores, steps=steps)
    )
    session.start(torch.zeros(3, dtype=torch.float64), unit_euler)
    return session


def worker(name: str) -> WorkerInfo:
    return WorkerInfo(name.encode(), name, "m", "cpu", "float32", 1)


def test_a_result_from_an_old_attempt_is_dropped():
    session = started_session("r")
    task, attempt = session.next_task(b"w1")
    assert attempt == 0
    session.worker_lost(b"w1")  # the task goes back to the queue as attempt 1
    assert session.queue[0] is task and session.retries == 1
    retry, attempt = session.next_task(b"w2")
    assert retry is task and attempt == 1
    out = torch.ones(3, dtype=torch.float64)
    assert session.complete(task.id, 0, out) is None, "the lost worker's late answer is stale"
    assert session.complete(task.id, 1, out) == []
    assert session.complete(task.id, 1, out) is None, "a task counts once"
    assert session.evaluations == 1


def test_each_idle_worker_takes_the_next_session_in_turn():
    a, b = started_session("a"), started_session("b")
    workers = [worker("w1"), worker("w2")]
    for session in (a, b):
        session.prepared |= {w.identity for w in workers}
    choices = FairDispatcher().assign(workers, [a, b])
    assert [(c.worker.name, c.session.id, c.kind) for c in choices] == [
        ("w1", "a", "EVAL"),
        ("w2", "b", "EVAL"),
    ]


def test_a_request_prepares_at_most_one_worker_per_core():
    session = RequestSession("r", b"client", RequestSpec(model="m", cores=2, steps=10))
    workers = [worker(f"w{i}") for i in range(4)]
    choices = FairDispatcher().assign(workers, [session])
    assert [c.kind for c in choices] == ["PREPARE", "PREPARE"]
    assert session.preparing == {b"w0", b"w1"}


def test_workers_of_another_model_are_not_used():
    session = started_session("r")
    other = WorkerInfo(b"x", "x", "other-model", "cpu", "float32", 1)
    assert FairDispatcher().assign([other], [session]) == []


def test_registry_expires_silent_workers():
    registry = WorkerRegistry(timeout_s=0.5)
    w = worker("w")
    registry.hello(w)
    assert registry.expired() == []
    w.last_seen -= 1.0
    assert registry.expired() == [w]
