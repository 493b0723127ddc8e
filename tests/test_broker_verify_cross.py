"""Verification across device classes (``broker.verify``, ``broker.tolerance``), in the broker
core with a fake clock: workers of two device classes (HELLO's ``device_class``), whose
results differ in their low bits as a CPU's and a GPU's do, are compared by value: the broker
asks one of them to fetch the other's result and report how far apart the two are (COMPARE ->
COMPARED), and holds that to the tolerance for the model and dtype. No latent crosses the
broker for it."""

from __future__ import annotations

import math

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import HonestPool, hello
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    ComparedMessage,
    CompareMessage,
    DoneMessage,
    Kind,
    Message,
)
from chords_mq.wire.base import WireError
from chords_mq.wire.codec import decode, encode
from chords_mq.wire.named import Holder, NamedInput, NamedRef
from tests.test_broker_dataplane import MODEL, Run, drive, kill, same_hits
from tests.test_broker_verify import counts, strikes

SEQUENTIAL = RequestSpec(model=MODEL, steps=6, method="sequential", seed=0)
GPU = "cuda:test"
OTHER = "rocm:test"  # a third class: every replica goes across classes


def scaled(factor: float):  # type: ignore[no-untyped-def]
    return lambda tensor: tensor * factor


def pool(*workers: tuple[str, str, bool]):  # type: ignore[no-untyped-def]
    """An event before the first answer: w0 (CPU, can compare) and these workers (name, device
    class, can compare) join."""

    def event(run: Run, core: BrokerCore) -> list[Send]:
        sends = []
        for name, device_class, compares in (("w0", "cpu:test", True), *workers):
            caps = ["eval", "decode", "compare"] if compares else ["eval", "decode"]
            message = hello(
                name,
                MODEL,
                data=HonestPool.endpoint(name),
                device_class=device_class,
                capabilities=caps,
            )
            sends += core.worker_message(name.encode(), message)
        return sends

    return event


def faults(**by_name):  # type: ignore[no-untyped-def]
    def event(run: Run, core: BrokerCore) -> list[Send]:
        for name, fault in by_name.items():
            run.pool.faulty[HonestPool.endpoint(name)] = fault
        return []

    return event


def cross(*workers: tuple[str, str, bool], answer=None, **fault) -> Run:  # type: ignore[no-untyped-def]
    events = {0: pool(*workers), 1: faults(**fault)}
    return drive(
        SEQUENTIAL, workers=0, events=events, answer=answer, verify="sample", verify_seed=0
    )


def honest() -> Run:
    return drive(SEQUENTIAL, workers=1)


def close_hits(a: Run, b: Run, rel: float) -> None:
    got = [h.latent for h in a.hits if h.latent is not None]
    want = [h.latent for h in b.hits if h.latent is not None]
    assert len(got) == len(want) > 0
    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=rel, atol=0), (x, y)


def test_results_of_two_classes_within_the_tolerance_agree():
    # the GPU worker's results differ from the CPU's by 1e-6 relative: within float32's 1e-4
    run = cross(("w1", GPU, True), w1=scaled(1 + 1e-6))
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, honest(), 1e-5)
    assert counts(run).get("compared_agree", 0) >= SEQUENTIAL.steps
    assert "compared_differ" not in counts(run) and "unverifiable" not in counts(run)
    assert strikes(run) == {}
    compares = [m for m in run.sent(Kind.COMPARE) if isinstance(m, CompareMessage)]
    assert compares and all(m.dtype == "float32" and len(m.mine) == 1 for m in compares)
    for message in compares:  # the other's result by name at its holder, with its digest
        (named,) = message.theirs[0].refs
        assert len(named.holders) == 1 and named.holders[0].digest is not None
    assert run.final.stats["broker_latent_bytes"] == len(run.hits) * 16  # only the hits


def test_bitwise_equal_results_of_two_classes_need_no_compare():
    run = cross(("w1", GPU, True))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest())
    assert not run.sent(Kind.COMPARE) and counts(run).get("agreed", 0) >= SEQUENTIAL.steps


def test_a_worker_of_another_class_past_the_tolerance_is_outvoted_by_a_third():
    # w1 (GPU) is 1.001 off: beyond 1e-4; w2, of a third class, sides with w0 within it
    run = cross(("w1", GPU, True), ("w2", OTHER, True), w1=scaled(1.001), w2=scaled(1 - 1e-6))
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, honest(), 1e-5)  # w1's results were recomputed
    assert counts(run).get("compared_differ", 0) >= 1
    assert strikes(run).get("w1", 0) >= 1 and "w0" not in strikes(run)
    assert "w2" not in strikes(run)


def test_the_tolerance_is_the_models_and_dtypes_own():
    # the same 1.001 with float32's tolerance raised to 1e-2 for this model: it agrees
    events = {0: pool(("w1", GPU, True)), 1: faults(w1=scaled(1.001))}
    run = drive(
        SEQUENTIAL,
        workers=0,
        events=events,
        verify="sample",
        verify_seed=0,
        verify_tolerance=f"{MODEL}:float32=1e-2",
    )
    assert isinstance(run.final, DoneMessage), run.final
    assert "compared_differ" not in counts(run) and strikes(run) == {}


def test_a_worker_of_another_class_that_cannot_compare_is_not_compared():
    run = cross(("w1", GPU, False))  # its HELLO lists no "compare": nobody may ask it
    assert isinstance(run.final, DoneMessage), run.final
    # w1's own results: w0 can compare, so they go across; w0's cannot be replicated
    assert not any(s.identity == b"w1" for s in run.to_workers if s.message.kind is Kind.COMPARE)
    assert counts(run).get("unverifiable", 0) > 0


def refusing(how: str, who: tuple[bytes, ...]):  # type: ignore[no-untyped-def]
    """Workers ``who`` answer no COMPARE (``silent``) or a failed one (``failing``)."""

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if isinstance(job, CompareMessage) and identity in who:
            return None if how == "silent" else ComparedMessage(error="fetch failed").ids(job)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


@pytest.mark.parametrize("how", ["silent", "failing"])
def test_a_compare_not_answered_or_failed_is_no_verdict_on_the_other_worker(how):
    """w1 never answers its COMPAREs (or answers them failed): that pair stays unjudged, a third
    worker's comparisons settle the task, and nobody is struck for it, neither w1's peer nor
    w1 (its results agree with w2's). Before: the pair counted as a disagreement and the
    minority of the three was struck."""
    run = cross(
        ("w1", GPU, True),
        ("w2", OTHER, True),
        answer=refusing(how, (b"w1",)),
        w1=scaled(1 + 1e-6),
    )
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, honest(), 1e-5)
    assert counts(run).get("uncompared", 0) >= 1 and counts(run).get("compared_agree", 0) >= 1
    assert "compared_differ" not in counts(run) and "outvoted" not in counts(run)
    assert strikes(run) == {}


def test_a_comparer_that_never_answers_misses_a_deadline_of_its_own():
    """w1's silence is a missed deadline for w1 (here quarantined at the first), never a strike
    for anyone; the request finishes on the others."""
    events = {0: pool(("w1", GPU, True), ("w2", OTHER, True)), 1: faults(w1=scaled(1 + 1e-6))}
    run = drive(
        SEQUENTIAL,
        workers=0,
        events=events,
        answer=refusing("silent", (b"w1",)),
        verify="sample",
        verify_seed=0,
        max_missed_deadlines=1,
    )
    assert isinstance(run.final, DoneMessage), run.final
    core = run.core
    assert core is not None and [p for p in core.trust.quarantine if "w1" in p]
    assert not [p for p in core.trust.quarantine if "w1" not in p] and strikes(run) == {}


@pytest.mark.parametrize("how", ["silent", "failing"])
def test_checks_no_compare_can_judge_end_unsettled_and_strike_nobody(how):
    """Every COMPARE unanswered (or failed): no pair is ever judged, so no answer is outvoted;
    the request fails unverifiable once no further worker is left, and no worker is struck."""
    run = cross(
        ("w1", GPU, True),
        ("w2", OTHER, True),
        answer=refusing(how, (b"w0", b"w1", b"w2")),
        w1=scaled(1.001),
    )
    assert not isinstance(run.final, DoneMessage), run.final
    assert "unverifiable" in str(run.final)
    assert counts(run).get("uncompared", 0) >= 2 and "compared_differ" not in counts(run)
    assert strikes(run) == {}
    # every worker stays in the request: no replica abstains, so nothing settles by majority
    assert "abstained" not in counts(run) and "agreed" not in counts(run), counts(run)


def test_an_original_no_compare_could_judge_is_not_settled_by_the_others_agreeing():
    """Every COMPARE that would fetch w0's result fails: w1 and w2 agree with each other, but
    nothing judged w0's original apart from them, so that is no majority against it (no
    strike, no settlement): with no fourth worker the request fails unverifiable."""

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if isinstance(job, CompareMessage):
            holders = [h.endpoint for n in job.theirs for r in n.refs for h in r.holders]
            if HonestPool.endpoint("w0") in holders:
                return ComparedMessage(error="fetch failed").ids(job)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = cross(
        ("w1", GPU, True),
        ("w2", OTHER, True),
        answer=answer,
        w1=scaled(1 + 1e-6),
        w2=scaled(1 - 1e-6),
    )
    assert not isinstance(run.final, DoneMessage), run.final
    assert "unverifiable" in str(run.final)
    assert counts(run).get("compared_agree", 0) >= 1 and strikes(run) == {}


def leaves(run: Run, identity: bytes, job: Message) -> Message | None:
    """w1 is lost with its first COMPARE out (it answers none)."""
    if isinstance(job, CompareMessage) and identity == b"w1":
        run.route(kill("w1")(run, run.core))  # type: ignore[arg-type]
        return None
    return run.pool.answer(job, HonestPool.endpoint(identity.decode()))


@pytest.mark.parametrize("factor", [1 + 1e-6, 1.001])  # w1 within the tolerance, or past it
def test_a_replica_whose_worker_left_unjudged_abstains_and_the_others_settle(factor):
    """w1 (GPU) runs task 0's replica and leaves with its COMPARE out: that pair stays
    unjudged (unanswered), and w2's third answer, bitwise w0's, cannot be compared with w1's
    (w1's results left with it: the pair ``_next`` finds nobody to compare). w1's answer can
    never be judged, so it abstains: w0 and w2 settle the check, the request finishes bitwise
    as the honest pool's, and nobody is struck, w1 neither (no pair was judged apart, whatever
    its value). Before: the check waited for a verdict on w1 that could never come and the
    request failed unverifiable ("3 workers disagree"); before 5a8fbb5 the pair that could not
    be compared was a disagreement and the departed w1 was outvoted and struck (its strike
    follows its identity to its next connection)."""
    run = cross(("w1", GPU, True), ("w2", OTHER, True), answer=leaves, w1=scaled(factor))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest())  # w0's and w2's results: bitwise
    core = run.core
    assert core is not None and core.registry.get(b"w1") is None
    # one COMPARE sent (to w1, unanswered), two pairs uncompared: the second is (w1, w2)
    assert counts(run).get("compares") == 1 and counts(run).get("uncompared") == 2
    assert counts(run).get("abstained") == 1  # w1's answer, set aside
    assert "outvoted" not in counts(run) and "unverifiable" not in counts(run)
    assert core.trust.strikes == {}
    # w1's answer counted for nobody: only w0's and w2's records grew
    assert sorted(core.verification.records.clean) == ["name:w0@w0", "name:w2@w2"]


def test_an_original_whose_worker_left_ends_its_check_and_runs_again():
    """The original's worker (w0) leaves with the COMPARE of its held result out: the check
    ends with it (``holder_gone``), its task runs again, and the original never abstains
    (the rule above is for replicas; the plan may hold an original's results). Nobody is
    struck, nothing abstains, the request finishes within the tolerance of the honest pool's
    (w1's and w2's results now)."""

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if isinstance(job, CompareMessage) and HonestPool.endpoint("w0") not in run.gone:
            run.route(kill("w0")(run, run.core))  # type: ignore[arg-type]
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = cross(("w1", GPU, True), ("w2", OTHER, True), answer=answer, w1=scaled(1 + 1e-6))
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, honest(), 1e-5)
    assert "abstained" not in counts(run) and "outvoted" not in counts(run)
    assert run.core is not None and run.core.trust.strikes == {}


def test_compare_and_compared_round_trip_on_the_wire_and_bad_ones_are_refused():
    named = NamedInput("ref", (NamedRef(Ref(3, 4), (Holder("tcp://h:1", None, "a" * 32),)),))
    compare = CompareMessage(
        mine=(Ref(7, 4),), theirs=(named,), dtype="float32", request="r", task=3
    )
    back = decode(encode(compare))
    assert isinstance(back, CompareMessage)
    assert back.mine == compare.mine and back.theirs == compare.theirs and back.task == 3
    compared = ComparedMessage(distances=((1e-6, math.inf),), request="r", task=3)
    back2 = decode(encode(compared))
    assert isinstance(back2, ComparedMessage) and back2.distances == ((1e-6, math.inf),)
    for bad in (
        ComparedMessage(distances=((math.nan, 0.0),)),
        ComparedMessage(distances=((-1.0, 0.0),)),
        ComparedMessage(distances=((0.0, 0.0),) * 17),
    ):
        with pytest.raises(WireError, match="COMPARED"):
            decode(encode(bad))
    with pytest.raises(WireError, match="COMPARE"):
        CompareMessage(mine=(Ref(7, 4),), theirs=(named,), dtype="int8")
    with pytest.raises(WireError, match="COMPARE"):  # one of theirs for each of mine
        decode(
            encode(CompareMessage(mine=(Ref(7, 4), Ref(7, 5)), theirs=(named,), dtype="float32"))
        )
