"""Broker core, fake clock: what a PREPARED declares of a request's latent (shape, dtype, the
results' dtype) is checked before any tensor of it: a latent over the budget is refused from
the declaration, and every result must have the declared dtype, the first one included."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chords_mq.solvers import solve_targets, solver_spec, unit_euler
from chords_mq.wire import tensor_digest
from tests.test_broker_core import (
    Broker,
    eval_entries,
    hits,
    raw,
    solver_tensors,
    velocity,
)

BUDGET = 1 << 20  # --max-request-bytes in these tests
LATENTS = 10  # a 2-core, 6-step CHORDS request's working set, in latents (see below)


def declaring(
    broker: Broker,
    identity: bytes,
    x0: torch.Tensor | None = None,
    send_x0: bool = True,
    **declared: Any,
) -> None:
    """The worker answers its last PREPARE declaring ``x0``'s shape and dtype (and float32
    results), overridden by ``declared``; with x0 if asked for it and ``send_x0``."""
    prepare = broker.last(identity, "PREPARE")
    x0 = torch.linspace(-1, 1, 4) if x0 is None else x0
    fields, tensors = solver_spec(unit_euler)
    frames = solver_tensors(tensors)
    if prepare.initial and send_x0:
        frames["x0"] = x0
    body = {
        "solver": fields,
        "x0_digest": tensor_digest(x0),
        "shape": list(x0.shape),
        "dtype": str(x0.dtype).removeprefix("torch."),
        "result_dtype": "float32",
        **declared,
    }
    broker.from_worker(identity, raw("PREPARED", body, frames, request=prepare.request))


def pair(**config: Any) -> tuple[Broker, bytes, bytes]:
    """Two workers preparing a 2-core request: the one asked for x0, and the other."""
    broker = Broker(**config)
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2, steps=6)
    asked = a if broker.last(a, "PREPARE").initial else b
    return broker, asked, b if asked == a else a


def test_the_prepare_tells_the_worker_the_largest_latent_the_budget_admits():
    broker, asked, other = pair(max_request_bytes=BUDGET)
    assert broker.sessions["r1"].spec.working_set_latents() == LATENTS
    for identity in (asked, other):
        assert broker.last(identity, "PREPARE").max_latent_bytes == BUDGET // LATENTS


def test_a_declared_latent_over_the_budget_is_refused_before_x0_arrives():
    broker, asked, other = pair(max_request_bytes=BUDGET)
    big = torch.zeros(64 << 10)  # 256 KiB: 10 of them are 2.5 MiB
    declaring(broker, other, big)  # not asked for x0: its declaration is enough
    assert broker.error("r1") == "too_large"
    assert "r1" not in broker.sessions
    assert not broker.to(asked, "EVAL") and not broker.to(other, "EVAL")


def test_a_worker_that_withholds_x0_over_the_budget_is_refused_from_its_declaration():
    broker, asked, _ = pair(max_request_bytes=BUDGET)
    declaring(broker, asked, torch.zeros(64 << 10), send_x0=False)
    assert broker.error("r1") == "too_large"


def test_an_x0_sent_over_the_budget_anyway_is_refused_unread():
    """The declaration is checked first: x0 itself (NaN here, a bad PREPARED if it were
    read) is never looked at."""
    broker, asked, _ = pair(max_request_bytes=BUDGET)
    declaring(broker, asked, torch.full((64 << 10,), float("nan")))
    assert broker.error("r1") == "too_large"


def test_a_declared_latent_within_the_budget_runs():
    broker, asked, other = pair(max_request_bytes=BUDGET)
    declaring(broker, other, torch.zeros(1 << 10))
    declaring(broker, asked, torch.zeros(1 << 10))
    assert broker.sessions["r1"].result_dtype == torch.float32
    broker.serve([asked, other])
    assert broker.client_kinds("r1")[-1] == "DONE"


def test_an_x0_that_is_not_the_declared_latent_is_a_bad_prepared():
    broker, asked, _ = pair()
    declaring(broker, asked, torch.linspace(-1, 1, 4), shape=[2, 2])
    session = broker.sessions["r1"]
    assert asked in session.excluded and session.plan is None


def test_a_malformed_declaration_is_a_bad_prepared():
    broker, _, other = pair()
    declaring(broker, other, shape=[4, -1])
    assert other in broker.sessions["r1"].excluded
    broker, _, other = pair()
    declaring(broker, other, result_dtype="uint8")
    assert other in broker.sessions["r1"].excluded


def test_two_workers_that_declare_different_result_dtypes_stop_the_request():
    broker, asked, other = pair()
    declaring(broker, other, result_dtype="float16")
    declaring(broker, asked)
    assert broker.error("r1") == "x0_mismatch"


def cast_result(broker: Broker, worker: bytes, dtype: torch.dtype) -> int:
    """``worker`` answers its last EVAL honestly, every result cast to ``dtype``."""
    message = broker.last(worker, "EVAL")
    ((entry, latent),) = eval_entries(message)
    good = solve_targets(
        unit_euler, latent, velocity(latent, entry.step), entry.step, entry.targets
    )
    tasks = [[entry.task, entry.attempt, list(entry.targets)]]
    tensors = {f"result.0.{k}": good[t].to(dtype) for k, t in enumerate(entry.targets)}
    reply = raw("RESULT", {"tasks": tasks}, tensors, request=message.request)
    reply.task, reply.attempt = message.task, message.attempt
    broker.from_worker(worker, reply)
    return entry.task


def test_a_first_result_of_another_dtype_than_declared_is_bad_and_held_against_its_worker():
    """The cast worker answers first: its float16 results do not set the request's dtype;
    the honest worker's float32 result for the same task confirms the fault (a strike)."""
    honest = Broker()
    a, b = honest.worker("a"), honest.worker("b")
    honest.submit("r1", cores=2, steps=6)
    honest.serve([a, b])
    broker, asked, other = pair()
    declaring(broker, other)
    declaring(broker, asked)
    task = cast_result(broker, asked, torch.float16)
    session = broker.sessions["r1"]
    assert session.evaluations == 0 and asked in session.excluded
    assert session.result_dtype == torch.float32
    assert session.suspects == {task: {broker.core.registry.workers[asked].principal}}
    broker.serve([asked, other])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert broker.core.registry.workers[asked].bad_results == 1  # confirmed: a strike
    for got, want in zip(hits(broker, "r1"), hits(honest, "r1"), strict=True):
        assert torch.equal(got.tensors["latent"], want.tensors["latent"])
        assert got.tensors["latent"].dtype == torch.float32


def test_without_a_declaration_the_first_result_sets_the_dtype_and_nobody_is_blamed():
    broker, asked, other = pair()
    broker.prepared(other)
    broker.prepared(asked)
    cast_result(broker, asked, torch.float64)
    session = broker.sessions["r1"]
    assert session.result_dtype == torch.float64 and not session.suspects


def test_a_worker_declares_its_latent_and_keeps_an_x0_over_the_limit():

    from chords_mq.request import RequestSpec
    from chords_mq.wire import PrepareMessage, decode, encode
    from chords_mq.workers.models.synthetic import SyntheticAdapter
    from chords_mq.workers.worker import Worker

    worker = Worker("tcp://127.0.0.1:9", SyntheticAdapter(), "synthetic", "cpu")
    try:
        spec = RequestSpec("synthetic", steps=4, params={"shape": [8, 8], "dtype": "bfloat16"})
        for limit, sent in ((128, True), (127, False), (None, True)):
            prepare = PrepareMessage(spec=spec.to_dict(), max_latent_bytes=limit, request="r")
            prepared = worker._prepare(prepare, (1, "r"))
            assert (prepared.shape, prepared.dtype) == ([8, 8], "bfloat16")
            assert prepared.result_dtype == "bfloat16"
            assert (prepared.x0 is not None) == sent  # 128 bytes of x0
            assert (prepared.x0_digest != "") == sent  # kept back undigested
            assert decode(encode(prepared)).x0_digest == prepared.x0_digest
    finally:
        worker.close()
        worker.store.release("r")


def test_an_initial_prepare_gets_the_time_to_send_the_declared_latent():
    broker, asked, other = pair()
    declaring(broker, other, shape=[25_000_000])  # 100 MB of float32: 1 s at 100 MB/s
    worker = broker.core.registry.workers[asked]
    floor = broker.core.config.job_deadline_floor_s  # PREPAREs learnt at 0 s so far
    assert broker.core.deadlines.deadline(worker) == pytest.approx(worker.job.sent_at + floor + 1)
