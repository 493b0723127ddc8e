"""Chains without round trips (issue 25, item 6), decided in the sans-I/O BrokerCore on a fake
clock with honest by-name workers (``tests/test_broker_dataplane.py``'s ``drive``: a chain's
steps are answered one after another, a fake second each).

On the data plane with ``--verify off`` one EVAL carries a core's next steps too
(``Plan.follow``), at most ``--chain`` in all; each answers with its own RESULT, after which
the rest stays the worker's job. Wherever a chain is cut (a lost worker, a FAILED, a bad or
stale answer, a late worker), the step whose input exists runs again and the later ones are
taken back; every output stays the unchained request's, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest

from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import HonestPool
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    MAX_TASKS,
    DoneMessage,
    EvalMessage,
    Kind,
    Message,
    ResultMessage,
    decode,
    encode,
    failed_for,
)
from tests.test_broker_dataplane import CHORDS, MODEL, Run, drive, kill, same_hits

SEQUENTIAL = RequestSpec(model=MODEL, steps=12, method="sequential", seed=0)
SEQUENTIAL_40 = dataclasses.replace(SEQUENTIAL, steps=40)


def evals(run: Run, name: str | None = None) -> list[EvalMessage]:
    return [
        s.message
        for s in run.to_workers
        if isinstance(s.message, EvalMessage) and (name is None or s.identity == name.encode())
    ]


@pytest.fixture(scope="module")
def unchained() -> Run:
    return drive(CHORDS, chain=1)


@pytest.fixture(scope="module")
def sequential_unchained() -> Run:
    return drive(SEQUENTIAL, workers=1, chain=1)


def test_a_sequential_request_goes_out_in_chains_and_gives_the_same_bits(sequential_unchained):
    run = drive(SEQUENTIAL, workers=1, chain=4)
    assert isinstance(run.final, DoneMessage)
    same_hits(run, sequential_unchained)
    sent = evals(run)
    # 12 steps in chains of 4: 3 EVALs, against 12 one step each
    assert [len(m.entries) for m in sent] == [4, 4, 4] and run.final.stats["chained"] == 9
    assert all(m.chain for m in sent) and len(evals(sequential_unchained)) == 12
    for message in sent:  # each step reads the one before's fine result, held there
        for before, entry, value in zip(message.entries, message.entries[1:], message.inputs[1:]):
            assert [n.ref for n in value.refs] == [dataclasses.replace(value.refs[0].ref)]
            assert value.refs[0].ref.task == before.task and entry.step == before.step + 1


def test_a_chain_is_never_longer_than_an_eval_holds_and_crosses_the_wire(sequential_unchained):
    """``BrokerConfig(chain=64)`` (built without the option's range, which stops at
    ``MAX_TASKS``): chains of at most ``MAX_TASKS`` steps, each EVAL encoded and parsed back as
    a worker parses it (before the cap, a 40-step request went out as one EVAL of 40 entries,
    which the worker dropped as malformed), and the bits are the unchained request's."""
    unchained = drive(SEQUENTIAL_40, workers=1, chain=1)
    run = drive(SEQUENTIAL_40, workers=1, chain=64)
    assert isinstance(run.final, DoneMessage)
    same_hits(run, unchained)
    sent = evals(run)
    assert [len(m.entries) for m in sent] == [MAX_TASKS, MAX_TASKS, 40 - 2 * MAX_TASKS]
    for message in sent:
        parsed = decode(encode(message))
        assert isinstance(parsed, EvalMessage) and parsed.entries == message.entries


def test_chords_chains_stop_before_a_rectification_and_give_the_same_bits(unchained):
    run = drive(CHORDS, chain=4)
    assert isinstance(run.final, DoneMessage)
    same_hits(run, unchained)
    sent = evals(run)
    assert any(len(m.entries) > 1 for m in sent) and max(len(m.entries) for m in sent) <= 4
    assert len(sent) < len(evals(unchained))
    for message in sent:
        if message.chain:  # no later step of a chain reads more than the step before
            assert all(v.op == "ref" for v in (message.inputs or ())[1:])


@pytest.mark.parametrize(
    "config",
    [{"chain": 1}, {"verify": "sample", "verify_seed": 0}, {"data_plane": False}],
    ids=["chain 1", "verifying", "off the data plane"],
)
def test_no_chain_when_turned_off_verifying_or_off_the_data_plane(config, unchained):
    run = drive(CHORDS, **config)
    assert isinstance(run.final, DoneMessage)
    assert not any(m.chain or len(m.entries) > 1 for m in evals(run))
    same_hits(run, unchained)


def test_the_rest_of_a_chain_stays_its_workers_job_with_its_own_deadline():
    """After each step's RESULT the worker's job is the rest, sent then, expected one EVAL's
    time per step (the speed model's: 1 fake second), so its deadline is the rest's and not
    the whole chain's."""
    seen: list[tuple[int, float | None]] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        assert run.core is not None
        held = run.core.registry.workers[identity].job
        if isinstance(job, EvalMessage) and held is not None:
            seen.append((len(held.tasks), held.expected_s))
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    drive(SEQUENTIAL, workers=1, chain=4, answer=answer)
    assert [n for n, _ in seen] == [4, 3, 2, 1] * 3
    later = [expected for _, expected in seen[4:]]  # (the first chain's: before any was learnt)
    assert all(e is not None for e in later)
    assert [round(e) for e in later] == [4, 3, 2, 1] * 2  # type: ignore[arg-type]


def kill_mid_chain(*names: str, record: list[int]):  # type: ignore[no-untyped-def]
    """Once the first of ``names`` runs a chain of 2 or more steps: lose them all."""
    lose = kill(*names)

    def event(run: Run, core: BrokerCore) -> list[Send]:
        worker = core.registry.workers.get(names[0].encode())
        job = None if worker is None else worker.job
        if record or job is None or not job.chain or len(job.tasks) < 2:
            return []
        record.append(len(job.tasks))
        return lose(run, core)

    return event


@pytest.mark.parametrize("names", [("w0",), ("w0", "w1")], ids=["one", "two at once"])
def test_workers_lost_mid_chain_their_later_steps_are_taken_back_and_the_bits_stay(
    names, unchained
):
    """A worker dies while it runs a chain: the step whose input exists is recomputed from
    lineage, the ones behind it are taken back and readied again; bitwise."""
    record: list[int] = []
    events = {n: kill_mid_chain(*names, record=record) for n in range(6, 80)}
    run = drive(CHORDS, chain=4, events=events)
    assert record and record[0] >= 2
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, unchained)
    assert run.core is not None and not run.core.sessions  # done: nothing left in flight


def failing_at(name: str, count: int, code: str = "worker_error"):  # type: ignore[no-untyped-def]
    """``name`` answers its ``count``-th step (counting from 1) FAILED ``code``."""
    seen = {"n": 0}

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == name.encode() and isinstance(job, EvalMessage):
            seen["n"] += 1
            if seen["n"] == count:
                return failed_for(job, code, "a step failed")
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


def test_a_failed_step_of_a_chain_runs_again_and_the_steps_behind_it_are_taken_back(
    sequential_unchained,
):
    """The 2nd step of the first chain fails: it runs again, the 2 steps behind it (sent,
    never ready) are taken back and readied again under new ids once it has a result; the
    worker's own answers for them are stale."""
    run = drive(SEQUENTIAL, workers=1, chain=4, answer=failing_at("w0", 2))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, sequential_unchained)
    sent = evals(run)
    first = [e.task for e in sent[0].entries]
    assert sent[1].entries[0].task == first[1] and sent[1].entries[0].attempt == 1
    later = {e.task for m in sent[1:] for e in m.entries}
    assert not later & set(first[2:])  # the taken-back steps never went out again
    assert run.final.stats["evaluations"] == 12


def non_finite_at(name: str, count: int):  # type: ignore[no-untyped-def]
    seen = {"n": 0}

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if identity == name.encode() and isinstance(reply, ResultMessage):
            seen["n"] += 1
            if seen["n"] == count:
                entries = tuple(
                    e._replace(
                        held={t: dataclasses.replace(h, finite=False) for t, h in e.held.items()}
                    )
                    for e in reply.entries
                )
                return dataclasses.replace(reply, entries=entries)
        return reply

    return answer


def test_a_bad_result_at_a_chains_head_cuts_the_chain(unchained):
    run = drive(CHORDS, chain=4, answer=non_finite_at("w1", 1))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, unchained)
    core = run.core
    assert core is not None and core.metrics.failures["non_finite"] == 1


def test_a_late_chain_is_cut_to_its_head_and_the_rest_is_taken_back(unchained):
    """w0's chain is past its deadline: the head is copied (the first of its two answers
    wins), the steps behind it are taken back (readied again under new ids once the head has
    a result; w0's own answers for them are stale); bitwise, each step evaluated once per
    completion."""
    cut: list[tuple[int, int, list[int]]] = []

    def overdue(run: Run, core: BrokerCore) -> list[Send]:
        """The moment w0's chain passes its deadline, once that comes before anyone else's."""
        w0 = core.registry.workers[b"w0"]
        job, first = w0.job, core.deadlines.deadline(w0)
        if cut or job is None or not job.chain or len(job.tasks) < 2 or first is None:
            return []
        others = [core.deadlines.deadline(w) for w in core.registry.workers.values() if w != w0]
        if any(other is not None and other <= first for other in others):
            return []
        behind = [t.id for t, _ in job.tasks[1:]]
        cut.append((len(job.tasks), job.tasks[0][0].id, behind))
        core.clock.now = first  # type: ignore[attr-defined]
        sends = core.tick(first)
        tasks = next(iter(core.sessions.values())).tasks
        # taken back: neither copied (no late attempt kept) nor queued, nor running
        assert not set(behind) & (set(tasks.late) | set(tasks.in_flight))
        assert not set(behind) & {t.id for t in tasks.queued()}
        return sends

    events = {n: overdue for n in range(8, 200, 2)}
    run = drive(CHORDS, chain=4, events=events)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, unchained)
    assert cut and cut[0][0] > 1  # a chain of more than one step was late
    assert run.core is not None and run.core.metrics.failures["late"] == 1
    _, head, behind = cut[0]
    sent = [
        (s.identity, entry)
        for s in run.to_workers
        if isinstance(s.message, EvalMessage)
        for entry in s.message.entries
    ]
    assert [e.attempt for w, e in sent if e.task == head] in ([0, 1], [0])  # copied, or won
    assert all(w == b"w0" for w, e in sent if e.task in behind)  # never sent again
    assert run.final.stats["evaluations"] == unchained.final.stats["evaluations"]


def lost_input_always(name: str):  # type: ignore[no-untyped-def]
    """``name`` answers every step that reads another worker's result FAILED lost_input."""

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        own = HonestPool.endpoint(name)
        if identity == name.encode() and isinstance(job, EvalMessage) and job.inputs:
            for value in job.inputs:
                for named in value.refs:
                    others = [h.endpoint for h in named.holders if h.endpoint != own]
                    if others and all(h.endpoint != own for h in named.holders):
                        failed = failed_for(job, "lost_input", f"{named.ref}: no answer")
                        return dataclasses.replace(
                            failed,
                            lost_ref=[named.ref.task, named.ref.target],
                            lost_holder=others[0],
                        )
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


def test_a_worker_that_cannot_get_inputs_past_the_bound_leaves_the_request(unchained):
    """w2 cannot reach any other worker's data endpoint: each FAILED lost_input costs its
    holder's copy (recomputed) up to --max-lost-inputs, then w2 leaves the request and the
    copies stay: the request ends bitwise instead of spending its replays on w2's word."""
    run = drive(CHORDS, chain=4, answer=lost_input_always("w2"), max_lost_inputs=2)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, unchained)
    core = run.core
    assert core is not None
    assert core.metrics.failures["lost_input"] == 2
    assert core.metrics.failures["inputs_unreachable"] == 1
    later = run.to_workers[
        max(i for i, s in enumerate(run.to_workers) if s.message.kind is Kind.RELEASE) :
    ]
    assert not [s for s in later if s.identity == b"w2" and s.message.kind is Kind.EVAL]


def test_no_chain_while_another_request_of_the_model_runs():
    """One worker, a second request submitted while the first runs: the second is prepared
    at the worker's next turn (not once the first has no step ready, which on one worker is
    never), the two take turns, and while both run every EVAL is one step (a chain would hold
    the worker for 4 while the other waits its turn); before it, the first request chained."""
    from chords_mq.wire import SubmitMessage

    def second(run: Run, core: BrokerCore) -> list[Send]:
        spec = dataclasses.replace(SEQUENTIAL, model=MODEL, seed=1)
        return core.client_message(b"client-2", SubmitMessage(spec=spec.to_dict(), request="r2"))

    run = drive(SEQUENTIAL, workers=1, chain=4, events={2: second})
    assert isinstance(run.final, DoneMessage), run.final
    sent = evals(run)
    assert len(sent[0].entries) == 4 and sent[0].request == "1.7"  # alone
    assert run.final.request == "r1"
    first = [i for i, m in enumerate(sent) if m.request != "1.7"]
    assert first and first[0] <= 2, [m.request for m in sent]  # served at once
    both = sent[first[0] : max(i for i, m in enumerate(sent) if m.request == "1.7") + 1]
    # they take turns, one step each, until the first ends (then the second chains alone)
    assert [m.request for m in both] == ["2.7", "1.7"] * (len(both) // 2), both
    assert len(both) >= 14 and all(len(m.entries) == 1 for m in both)
    assert len(sent[-1].entries) == 4 and sent[-1].request == "2.7"
