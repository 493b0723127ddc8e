"""Verification by redundancy (``broker.verify``), in the broker core with a fake clock: workers
that keep their results by name and report their digests (``broker.testing.HonestPool``), some of
them faulty (wrong but finite results), no sockets.

What it decides: which results are replicated (every one of a new worker's, then a sample that
shrinks with its clean record, never none), that a held result reaches the plan only once a
replica agrees, that a mismatch is settled by a third worker whose majority gives the loser a
strike and leaves it out of the request, that a published result found wrong is recomputed by
lineage with everything made from it, and that the hits are always the honest pool's, bit for
bit.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import HonestPool, hello
from chords_mq.broker.verify import Records
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    DoneMessage,
    ErrorMessage,
    EvalMessage,
    Kind,
    Message,
    ResultEntry,
    ResultMessage,
)
from chords_mq.wire.base import WireError
from chords_mq.wire.named import HeldResult
from tests.test_broker_dataplane import CHORDS, MODEL, Run, drive, kill, same_hits

SEQUENTIAL = RequestSpec(model=MODEL, steps=12, method="sequential", seed=0)


def zeros(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(tensor)


def scaled(factor: float):  # type: ignore[no-untyped-def]
    return lambda tensor: tensor * factor


def faulty(**faults):  # type: ignore[no-untyped-def]
    """An event before the first answer: these workers (by name) are faulty from the start."""

    def event(run: Run, core: BrokerCore) -> list[Send]:
        for name, fault in faults.items():
            run.pool.faulty[HonestPool.endpoint(name)] = fault
        return []

    return event


def verified(spec: RequestSpec = CHORDS, workers: int = 4, **config: object) -> Run:
    settings: dict[str, object] = {"verify": "sample", "verify_seed": 0, **config}
    return drive(spec, workers=workers, **settings)  # type: ignore[arg-type]


def strikes(run: Run) -> dict[str, int]:
    """Strikes by worker name."""
    assert run.core is not None
    names = {w.principal: w.name for w in run.core.registry.workers.values()}
    return {names[p]: n for p, n in run.core.trust.strikes.items()}


def principal(run: Run, name: str) -> str:
    assert run.core is not None
    return run.core.registry.workers[name.encode()].principal


def counts(run: Run) -> dict[str, int]:
    assert run.core is not None
    return run.core.verification.counts


@pytest.fixture(scope="module")
def honest() -> Run:
    return drive(CHORDS)  # verification off


@pytest.fixture(scope="module")
def honest_sequential() -> Run:
    return drive(SEQUENTIAL, workers=2)


# -- the rate: a clean record, BOINC-style -------------------------------------------------------


def records(**config: object) -> Records:
    return Records(BrokerConfig(**config), random.Random(0))  # type: ignore[arg-type]


def test_a_new_worker_has_every_task_replicated_and_held():
    rec = records(verify_trusted_after=3)
    assert rec.rate("key:new") == 1.0 and rec.holds("key:new") and rec.sampled("key:new")


def test_the_rate_halves_with_the_clean_record_down_to_the_floor_never_zero():
    rec = records(verify_trusted_after=3, verify_half_life=2, verify_floor=0.05)
    rates = []
    for _ in range(30):
        rates.append(rec.rate("key:w"))
        rec.agreed("key:w")
    assert rates[:4] == [1.0, 1.0, 1.0, 1.0]
    assert rates[5] == pytest.approx(0.5) and rates[7] == pytest.approx(0.25)
    assert not rec.holds("key:w") and rates[-1] == 0.05 == min(rates)
    sampled = sum(rec.sampled("key:w") for _ in range(4000))
    assert 120 < sampled < 280  # about 5 %


def test_a_strike_starts_the_record_again():
    rec = records(verify_trusted_after=2)
    for _ in range(10):
        rec.agreed("key:w")
    assert not rec.holds("key:w")
    rec.outvoted("key:w")
    assert rec.holds("key:w") and rec.rate("key:w") == 1.0


def test_off_verifies_nothing_and_all_holds_everything():
    off, every = records(verify="off"), records(verify="all", verify_trusted_after=0)
    for _ in range(50):
        every.agreed("key:w")
    assert off.rate("key:w") == 0.0 and not off.sampled("key:w")
    assert every.rate("key:w") == 1.0 and every.holds("key:w")


# -- an honest pool -------------------------------------------------------------------------------


def test_an_honest_pool_verified_gives_the_same_hits_and_replicates_every_new_workers_task(honest):
    run = verified()
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    stats = run.final.stats
    assert stats["verify_evaluations"] == stats["evaluations"]  # new workers: every task
    assert counts(run)["agreed"] == stats["evaluations"]
    assert "mismatches" not in counts(run) and "outvoted" not in counts(run)
    assert run.core is not None and not run.core.trust.strikes


def test_a_replica_runs_the_same_inputs_as_its_original():
    run = verified()
    evals = [s for s in run.to_workers if isinstance(s.message, EvalMessage)]
    by_task: dict[int, list[tuple[bytes, object]]] = {}
    for send in evals:
        message = send.message
        assert isinstance(message, EvalMessage) and message.inputs is not None
        for entry, value in zip(message.entries, message.inputs):
            by_task.setdefault(entry.task, []).append((send.identity, value.latent()))
    replicas = {task: runs for task, runs in by_task.items() if task >= 1 << 61}
    assert replicas
    originals = {task: runs for task, runs in by_task.items() if task < 1 << 61}
    inputs = [value for runs in originals.values() for _, value in runs]
    for runs in replicas.values():
        assert runs[0][1] in inputs  # the same input as a run of its original


def test_the_clean_record_lowers_the_rate_within_a_request(honest):
    run = verified(verify_trusted_after=2, verify_half_life=1)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    stats = run.final.stats
    assert stats["verify_evaluations"] < stats["evaluations"] // 2


def test_a_lone_worker_cannot_be_verified_and_its_results_go_out_unverified(honest_sequential):
    run = verified(SEQUENTIAL, workers=1)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest_sequential)
    assert counts(run)["unverifiable"] == SEQUENTIAL.steps
    assert "replicas" not in counts(run)  # none queued that nobody could run


def test_workers_of_another_device_class_are_not_compared(honest_sequential):
    def other_class(run: Run, core: BrokerCore) -> list[Send]:
        endpoint = HonestPool.endpoint("w9")
        return core.worker_message(b"w9", hello("w9", MODEL, data=endpoint, device_class="cuda:x"))

    run = verified(SEQUENTIAL, workers=1, events={0: other_class})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest_sequential)
    assert run.final.stats["verify_evaluations"] == 0


def test_a_request_of_one_core_prepares_a_second_worker_for_its_replicas(honest_sequential):
    run = verified(SEQUENTIAL, workers=2)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest_sequential)
    assert run.final.stats["verify_evaluations"] == SEQUENTIAL.steps
    assert len({s.identity for s in run.to_workers if s.message.kind is Kind.PREPARE}) == 2


def test_a_result_without_a_digest_is_a_bad_result_when_verifying():
    def no_digest(run: Run, identity: bytes, job: Message) -> Message | None:
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if identity == b"w3" and isinstance(reply, ResultMessage):
            entries = tuple(
                ResultEntry(
                    e.task,
                    e.attempt,
                    {},
                    {t: dataclasses.replace(h, digest=None) for t, h in (e.held or {}).items()},
                )
                for e in reply.entries
            )
            return dataclasses.replace(reply, entries=entries)
        return reply

    run = verified(answer=no_digest)
    assert isinstance(run.final, DoneMessage), run.final
    assert run.core is not None and run.core.metrics.failures["malformed"] >= 1


def kill_when_replicated(whom: str, times: int = 1):  # type: ignore[no-untyped-def]
    """An answer that, when a replica goes out, first kills ``whom``: "original" (the worker
    whose held result it checks) or "replica" (the worker running it), ``times`` times."""
    killed: list[str] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        endpoint = HonestPool.endpoint(identity.decode())
        if len(killed) < times and isinstance(job, EvalMessage) and job.entries[0].task >= 1 << 61:
            assert run.core is not None
            session = next(iter(run.core.sessions.values()))
            check = session.verifying.checks.get(session.verifying.replicas.get(job.task or 0, -1))
            if check is not None:
                victim = identity if whom == "replica" else check.answers[0].identity
                killed.append(victim.decode())
                run.route(kill(victim.decode())(run, run.core))
                if victim == identity:
                    return None
        return run.pool.answer(job, endpoint)

    answer.killed = killed  # type: ignore[attr-defined]
    return answer


def test_a_worker_lost_while_its_results_are_held_has_its_task_run_again(honest):
    answer = kill_when_replicated("original", times=2)
    run = verified(answer=answer)
    assert len(answer.killed) == 2 and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)


def test_a_replica_nobody_is_left_to_run_lets_the_result_out_unverified(honest_sequential):
    """Two workers, one request of one core: the worker running a replica is lost; the other's
    results can no longer be compared with anyone's, and go to the plan unverified."""
    answer = kill_when_replicated("replica")
    run = verified(SEQUENTIAL, workers=2, answer=answer)
    assert answer.killed and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest_sequential)
    assert counts(run)["unverifiable"] >= 1


def test_a_worker_that_never_answers_its_prepare_holds_no_result_for_ever(honest_sequential):
    """The only other worker of the class takes its PREPARE and never answers (it is late for
    ever): the held results cannot wait for it, and go out unverified."""

    def silent(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == b"w1" and job.kind is Kind.PREPARE:
            return None
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = verified(SEQUENTIAL, workers=2, answer=silent)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest_sequential)
    assert counts(run)["unverifiable"] >= 1


# -- a faulty worker ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", [zeros, scaled(1.001), scaled(-1.0)], ids=["zeros", "scale:1.001", "negated"]
)
def test_a_fast_faulty_worker_is_outvoted_struck_and_left_out_and_the_hits_stay_honest(
    honest, fault
):
    run = verified(events={0: faulty(w3=fault)}, speeds={"w3": (0, 0.2)}, quarantine_after=10)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert run.final.stats["replays"] == 0  # held: no wrong value reached the plan
    assert counts(run)["mismatches"] >= 1 and counts(run)["outvoted"] >= 1
    core = run.core
    assert core is not None and set(strikes(run)) == {"w3"}
    # left out of the request at once: only the answers it had given by then are outvoted
    assert core.metrics.failures["outvoted"] == strikes(run)["w3"] <= 3
    assert core.verification.records.rate(principal(run, "w3")) == 1.0
    assert "late" not in core.metrics.failures  # what it ran when outvoted ran elsewhere


def test_metrics_count_the_checks_by_outcome():
    from prometheus_client.parser import text_string_to_metric_families

    from chords_mq.broker.metrics import render

    run = verified(events={0: faulty(w3=zeros)}, speeds={"w3": (0, 0.2)})
    assert run.core is not None
    samples = {
        sample.labels.get("outcome"): sample.value
        for family in text_string_to_metric_families(render(run.core).decode())
        for sample in family.samples
        if sample.name == "chords_verify_total"
    }
    assert samples == {k: float(v) for k, v in counts(run).items()}
    assert samples["outvoted"] >= 1 and samples["agreed"] > samples["mismatches"]


def test_at_quarantine_after_strikes_the_faulty_worker_is_quarantined(honest):
    run = verified(events={0: faulty(w3=zeros)}, speeds={"w3": (0, 0.2)}, quarantine_after=1)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert run.core is not None and [w.name for w in run.core.quarantined()] == ["w3"]


def test_a_faulty_replica_is_outvoted_too(honest):
    """w3 is trusted (its results are sampled, not held) but wrong only when it runs a
    replica: the original and a third worker agree, and w3 loses."""

    def wrong_replicas(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == b"w3" and isinstance(job, EvalMessage) and job.entries[0].task >= 1 << 61:
            run.pool.faulty[HonestPool.endpoint("w3")] = zeros
        else:
            run.pool.faulty.pop(HonestPool.endpoint("w3"), None)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = verified(answer=wrong_replicas)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert set(strikes(run)) == {"w3"}


def one_wrong(task: int, trusted: bool = True):  # type: ignore[no-untyped-def]
    """Workers trusted from the start (sampled, their results published at once), and one
    result wrong: ``task``'s, from whoever runs it first. ``answer.wrong``: who."""
    wrong: list[bytes] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        assert run.core is not None
        if trusted:
            for worker in run.core.registry.workers.values():
                run.core.verification.records.clean.setdefault(worker.principal, 50)
        endpoint = HonestPool.endpoint(identity.decode())
        if not wrong and isinstance(job, EvalMessage) and job.entries[0].task == task:
            wrong.append(identity)
            run.pool.faulty[endpoint] = scaled(1.001)
        else:
            run.pool.faulty.pop(endpoint, None)
        return run.pool.answer(job, endpoint)

    answer.wrong = wrong  # type: ignore[attr-defined]
    return answer


SAMPLED = {"verify_trusted_after": 1, "verify_half_life": 1000, "verify_floor": 0.999}


def test_a_sampled_wrong_result_is_recomputed_with_everything_made_from_it(honest):
    """A trusted worker's result (sampled: the plan has it at once) is wrong, and other workers
    compute from it before its replica disagrees. The third worker settles against it: it and
    every result made from it are let go and recomputed by lineage; the hits are honest."""
    answer = one_wrong(task=11)  # (read by another core: its worker computes from it)
    run = verified(answer=answer, **SAMPLED)
    assert answer.wrong and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert strikes(run) == {answer.wrong[0].decode(): 1}
    assert run.final.stats["replays"] >= 1  # recomputed by lineage


def test_answers_with_no_majority_and_no_one_left_fail_the_request_typed():
    run = verified(workers=3, events={0: faulty(w1=scaled(1.001), w2=scaled(0.999))})
    assert isinstance(run.final, ErrorMessage) and run.final.code == "unverifiable", run.final


# -- the wire -------------------------------------------------------------------------------------


def test_a_held_result_carries_its_digest_and_a_bad_digest_is_refused():
    held = HeldResult("float32", (4,), 16, True, "ab" * 16)
    assert HeldResult.from_wire("RESULT", held.to_wire()) == held
    assert len(HeldResult("float32", (4,), 16, True).to_wire()) == 4
    for bad in ("AB" * 16, "ab" * 15, 7):
        with pytest.raises(WireError, match="digest"):
            HeldResult.from_wire("RESULT", ["float32", [4], 16, True, bad])


def test_device_class_names_the_kind_of_device_and_the_torch_build():
    from chords_mq.workers.device_class import device_class

    name = device_class("cpu")
    assert name.startswith("cpu:") and torch.__version__ in name and name == device_class("cpu")
