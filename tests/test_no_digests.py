"""With ``--verify off`` the pool is trusted: every EVAL by name says ``digests`` False, its
worker keeps its results without computing their digests (7.7 ms per 16 MiB result, on every
step's critical path: ``benchmarks/digest_cost.py``), holders are named without a digest and a
fetcher checks nothing (x0's digest, one per request, is named still). A corrupt_input about a
copy that had no digest claims nothing a probe could confirm or refute: a lost input, no claim,
no probe, no strike. With verification on, EVALs ask for digests (``digests`` absent). Broker
core on a fake clock (``drive``), and the worker's side with a real ``Worker``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.broker.core import BrokerCore
from chords_mq.broker.testing import failed_for
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    CompareMessage,
    DoneMessage,
    EvalMessage,
    Kind,
    Message,
    PrepareMessage,
    ResultMessage,
    TaskEntry,
    decode,
    encode,
    tensor_digest,
)
from chords_mq.wire.named import X0_REF, NamedInput, NamedRef
from tests.test_broker_dataplane import CHORDS, HonestPool, Run, drive, same_hits
from tests.test_fetch_check import framing


@pytest.fixture(scope="module")
def honest() -> Run:
    return drive(CHORDS, data_plane=False)


def evals(run: Run) -> list[EvalMessage]:
    return [m for m in run.sent(Kind.EVAL) if isinstance(m, EvalMessage) and m.inputs is not None]


def recording(results: list[ResultMessage]):  # type: ignore[no-untyped-def]
    """Honest workers' answers, each RESULT kept in ``results``."""

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if isinstance(reply, ResultMessage):
            results.append(reply)
        return reply

    return answer


def struck(core: BrokerCore) -> set[str]:
    return {principal for principal, count in core.trust.strikes.items() if count}


def test_with_verify_off_evals_ask_for_no_digests_and_results_without_one_are_accepted(honest):
    """Every EVAL by name says digests False; its worker's results come without a digest and
    the broker accepts them (held where they were made); every holder of a result is named
    without a digest, x0's with the request's; the hits are the honest pool's, bitwise."""
    results: list[ResultMessage] = []
    run = drive(CHORDS, answer=recording(results))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    sent = evals(run)
    assert sent and all(m.digests is False for m in sent)
    held = [meta for r in results for e in r.entries for meta in (e.held or {}).values()]
    assert held and all(meta.digest is None for meta in held)
    named = [
        (named.ref, holder)
        for m in sent
        for value in m.inputs or ()
        for named in value.refs
        for holder in named.holders
    ]
    assert any(ref != X0_REF for ref, _ in named) and any(ref == X0_REF for ref, _ in named)
    x0 = tensor_digest(run.pool.x0)
    for ref, holder in named:
        assert holder.digest == (x0 if ref == X0_REF else None), (ref, holder)


@pytest.mark.parametrize("verify", ["sample", "all"])
def test_with_verification_evals_ask_for_digests(verify: str):
    results: list[ResultMessage] = []
    run = drive(CHORDS, answer=recording(results), verify=verify, verify_seed=0)
    assert isinstance(run.final, DoneMessage), run.final
    sent = evals(run)
    assert sent and all(m.digests is None for m in sent)
    held = [meta for r in results for e in r.entries for meta in (e.held or {}).values()]
    assert held and all(meta.digest is not None for meta in held)


def test_a_corrupt_input_about_a_copy_without_a_digest_is_a_lost_input(honest):
    """w1 and w3 claim corrupt data of w0's copies, which were named without a digest: their
    fetchers could check nothing, so nothing is confirmed or refuted. Each claim costs the copy
    (recomputed, as a lost input's) and nothing else: no claim recorded, no suspect, no probe,
    no strike; the hits are the honest pool's, bitwise."""
    run = drive(CHORDS, answer=framing("w0", "w1", "w3"))
    core = run.core
    assert core is not None and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert core.metrics.failures["lost_input"] >= 2
    assert not core.metrics.failures.get("corrupt_input"), core.metrics.failures
    assert not any(core.trust.claims.values()), core.trust.claims
    assert not core.probes.counts and not core.probes.pending
    assert not [s for s in run.to_workers if isinstance(s.message, CompareMessage)]
    assert not struck(core) and run.final.stats["replays"] > 0


def test_a_corrupt_input_about_x0_is_a_claim_even_with_verify_off():
    """x0 is named with its digest whatever --verify says, so a fetcher did check it: the
    first worker to read x0 claiming that another prepared worker served other bytes of it
    makes a corrupt_input claim (recorded against that holder), not a lost input."""
    lied: list[bytes] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        reads_x0 = isinstance(job, EvalMessage) and any(
            named.ref == X0_REF for value in job.inputs or () for named in value.refs
        )
        if reads_x0 and not lied:
            lied.append(b"w2" if identity == b"w1" else b"w1")
            return dataclasses.replace(
                failed_for(job, "corrupt_input", "x0: other bytes than its digest"),
                lost_ref=[X0_REF.task, X0_REF.target],
                lost_holder=HonestPool.endpoint(lied[0].decode()),
            )
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = drive(CHORDS, answer=answer)
    core = run.core
    assert lied and core is not None and isinstance(run.final, DoneMessage), run.final
    assert core.metrics.failures["corrupt_input"] == 1, core.metrics.failures
    assert not core.metrics.failures.get("lost_input")
    holder = core.registry.get(lied[0])
    assert holder is not None and core.trust.claims.get(holder.principal)


def test_a_worker_keeps_results_without_digests_when_the_eval_says_so():
    """The worker's side: an EVAL by name with digests False answers HeldResults without a
    digest (and keeps the same tensors); absent, each with the digest of what it keeps."""
    from chords_mq.workers.models.synthetic import SyntheticAdapter
    from chords_mq.workers.worker import Worker

    worker = Worker("tcp://127.0.0.1:9", SyntheticAdapter(), "synthetic", "cpu")
    try:
        spec = RequestSpec("synthetic", steps=4, params={"shape": [8, 8]})
        worker._job(PrepareMessage(spec=spec.to_dict(), request="r", epoch=3))
        x0 = NamedInput("ref", (NamedRef(X0_REF, ()),))
        kept = {}
        for task, digests in ((0, False), (1, None)):
            entry = TaskEntry(task, 0, 0, 0, (1,))
            message = EvalMessage(
                entries=(entry,),
                inputs=(x0,),
                dtype="float32",
                digests=digests,
                request="r",
                task=task,
                attempt=0,
                epoch=3,
            )
            message = decode(encode(message))  # as it travels
            assert isinstance(message, EvalMessage) and message.digests is digests
            reply = worker._job(message)
            assert isinstance(reply, ResultMessage), reply
            (result,) = reply.entries
            assert result.held is not None
            kept[task] = worker.store.get("r", Ref(task, 1))
            want = None if digests is False else tensor_digest(kept[task])
            assert result.held[1].digest == want and result.held[1].finite
        assert torch.equal(kept[0], kept[1])
    finally:
        worker.close()
        worker.store.release("r")
