"""Broker core, fake clock: a deadline on every job kind. A PREPARE or DECODE that does not
answer in time runs on another worker and its worker misses a deadline, as a late EVAL's; its
deadline comes from what PREPAREs and DECODEs took, between a floor and a ceiling."""

from __future__ import annotations

import pytest
import torch

from chords_mq.broker.registry import WorkerInfo
from chords_mq.wire import Kind
from tests.test_broker_core import Broker, decode_setup, decoder, hits, raw


def preparing_pair(**config: object) -> tuple[Broker, bytes, bytes]:
    """Two workers, a 2-core request: the one asked for x0 and the other, both preparing."""
    broker = Broker(**config)
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2, steps=6)
    jobs = {w: broker.core.registry.workers[w].job for w in (a, b)}
    assert all(job is not None and job.kind == "PREPARE" for job in jobs.values())
    asked = a if jobs[a].initial else b
    return broker, asked, b if asked == a else a


def info(broker: Broker, identity: bytes) -> WorkerInfo:
    return broker.core.registry.workers[identity]


def wait(broker: Broker, seconds: float, workers: tuple[bytes, ...]) -> None:
    """``seconds`` of fake time go by, the workers heartbeating all along (alive, busy)."""
    for _ in range(round(seconds / 0.25)):
        for identity in workers:
            broker.from_worker(identity, raw("HEARTBEAT"))
        broker.tick(0.25)


def test_a_prepare_has_the_ceiling_as_deadline_before_anything_is_learnt():
    broker, asked, other = preparing_pair()
    sent = info(broker, asked).job.sent_at
    assert broker.core.next_deadline() == pytest.approx(sent + 60.0)
    wait(broker, 59.0, (asked, other))
    assert not info(broker, asked).job.late
    wait(broker, 1.25, (asked, other))
    assert info(broker, asked).job.late


def test_a_silent_prepare_is_late_at_the_floor_and_another_worker_is_asked_for_x0():
    broker, silent, honest = preparing_pair()
    broker.clock.now += 0.01
    broker.prepared(honest)  # not asked for x0: PREPAREs now take 10 ms here
    job = info(broker, silent).job
    floor = broker.core.config.job_deadline_floor_s
    assert broker.core.next_deadline() == pytest.approx(job.sent_at + floor)  # 2.5 x 10 ms < 0.5
    broker.tick(floor + 0.01)
    broker.from_worker(silent, raw("HEARTBEAT"))
    assert job.late and info(broker, silent).missed == 1
    assert info(broker, silent).state(broker.clock.now) == "quarantined"
    again = broker.last(honest, "PREPARE")
    assert again.initial  # the honest worker is asked for the initial latent now
    assert broker.core.metrics.failures["late"] == 1
    broker.serve([honest])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert info(broker, silent).job is job  # it still gets no work until it answers


def test_a_late_prepare_that_answers_after_all_is_used_and_teaches_its_time():
    broker, slow, honest = preparing_pair()
    broker.clock.now += 0.01
    broker.prepared(honest)
    wait(broker, 1.0, (slow, honest))
    assert info(broker, slow).job.late
    broker.clock.now += 0.2
    broker.prepared(slow)  # asked for x0 still: it answers, late, with it
    assert info(broker, slow).job is None or not info(broker, slow).job.late  # back at work
    # its own PREPAREs take it 1.21 s: its next deadline is 3 s, not the others' floor
    assert broker.core.deadlines.expected(info(broker, slow), Kind.PREPARE) == pytest.approx(1.21)
    session = broker.sessions["r1"]
    assert slow in session.prepared and session.plan is not None


def test_a_late_prepare_with_no_other_worker_runs_on_and_is_not_held_against_it():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", cores=2, steps=6)
    wait(broker, 61.0, (a,))
    assert info(broker, a).job.late and info(broker, a).missed == 0
    broker.prepared(a)
    broker.serve([a])
    assert broker.client_kinds("r1")[-1] == "DONE"


def test_a_late_decode_goes_to_another_worker_and_the_hit_goes_out_once():
    broker, a, b = decode_setup()
    first = decoder(broker, a, b)
    other = b if first == a else a
    task = broker.last(first, "DECODE").task
    media = torch.ones(2, dtype=torch.uint8)
    for _ in range(50):  # the other runs everything else meanwhile
        job = info(broker, other).job
        if job is None:
            break
        if job.kind == "EVAL":
            broker.result(other)
        else:
            decode = broker.last(other, "DECODE")
            body = raw("DECODED", {}, {"media": media}, request="r1", task=decode.task)
            broker.from_worker(other, body)
    assert info(broker, other).job is None
    deadlines = broker.core.deadlines
    assert deadlines.expected(info(broker, first), Kind.DECODE) == pytest.approx(0.0)  # b's
    deadlines.learnt.clear()
    wait(broker, 61.0, (a, b))  # no DECODE learnt now: the ceiling
    assert info(broker, first).job.late and info(broker, first).missed == 1
    assert info(broker, other).job.kind == "DECODE"
    assert broker.last(other, "DECODE").task == task
    broker.from_worker(other, raw("DECODED", {}, {"media": media}, request="r1", task=task))
    broker.from_worker(first, raw("DECODED", {}, {"media": media}, request="r1", task=task))
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert [h.body()["core"] for h in hits(broker, "r1")] == [0, 2, 1]  # each once


def test_learnt_times_are_per_worker_then_per_model_within_floor_and_ceiling():
    broker, a, b = preparing_pair()
    deadlines = broker.core.deadlines
    wa, wb = info(broker, a), info(broker, b)
    deadlines.observe(wa, wa.job.kind, 1.0)
    assert deadlines.expected(wa, wa.job.kind) == pytest.approx(1.0)
    assert deadlines.expected(wb, wb.job.kind) == pytest.approx(1.0)  # its model's
    deadlines.observe(wb, wb.job.kind, 0.1)
    assert deadlines.expected(wb, wb.job.kind) == pytest.approx(0.1)  # its own first
    assert deadlines.deadline(wa) == pytest.approx(wa.job.sent_at + 2.5)
    assert deadlines.deadline(wb) == pytest.approx(wb.job.sent_at + 0.5)  # the floor
    deadlines.observe(wa, wa.job.kind, 1000.0)
    assert deadlines.deadline(wa) == pytest.approx(wa.job.sent_at + 60.0)  # the ceiling


def test_a_decode_deadline_allows_for_the_request_latent_at_the_transfer_floor():
    broker, a, b = decode_setup()
    first = decoder(broker, a, b)
    worker = info(broker, first)
    session = broker.sessions["r1"]
    session.latent_bytes = 100_000_000  # 1 s at the 100 MB/s floor
    assert broker.core.deadlines.deadline(worker) == pytest.approx(worker.job.sent_at + 61.0)
