"""A fetcher checks what it fetched (issue 26): an EVAL by name names, with each holder of an
input, the digest that holder reported of it, and the worker that fetches compares the bytes it
received with it. A holder that serves other bytes than it reported (``--fault serve:zeros``)
is answered FAILED corrupt_input: its copy counts as lost and the input is recomputed by
lineage; the holder is struck (never the fetcher) once fetchers of two principals said so, since
one fetcher's word could be a lie. Broker core on a fake clock (``drive``, as the data-plane
tests), and the wire's holder field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import failed_for
from chords_mq.broker.trust import CLAIM_WINDOW_S
from chords_mq.wire import DoneMessage, EvalMessage, Kind, Message, WireError, tensor_digest
from chords_mq.wire.named import X0_REF, Holder, NamedInput
from tests.test_broker_dataplane import CHORDS, HonestPool, Run, drive, same_hits

W3 = HonestPool.endpoint("w3")


@pytest.fixture(scope="module")
def honest() -> Run:
    return drive(CHORDS, data_plane=False)


def serving_zeros(run: Run, core: BrokerCore) -> list[Send]:
    """From the start, w3 serves zeros of each result it keeps (``--fault serve:zeros``)."""
    run.pool.serving[W3] = torch.zeros_like
    for name in ("w2", "w3"):  # a long clean record each
        info = core.registry.get(name.encode())
        assert info is not None
        core.verification.records.clean[info.principal] = 600
    return []


def test_every_holder_an_eval_names_comes_with_the_digest_it_reported():
    run = drive(CHORDS)
    named = [
        (ref, holder)
        for message in run.sent(Kind.EVAL)
        if isinstance(message, EvalMessage) and message.inputs is not None
        for value in message.inputs
        for ref in value.refs
        for holder in ref.holders
    ]
    assert any(ref.ref != X0_REF for ref, _ in named)
    for ref, holder in named:
        assert holder.digest is not None, (ref.ref, holder)
        if ref.ref == X0_REF:
            assert holder.digest == tensor_digest(run.pool.x0)


def test_a_holder_serving_other_bytes_is_struck_and_its_results_recomputed(honest):
    """w3 keeps and reports honest results but serves zeros: every fetch from it fails the
    digest check, the fetcher answers FAILED corrupt_input, w3 is struck (quarantined at 2)
    and never the fetchers; the output is the honest pool's, bitwise."""
    run = drive(CHORDS, events={0: serving_zeros})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    core = run.core
    assert core is not None and core.metrics.failures["corrupt_input"] >= 1
    assert core.metrics.failures.get("lost_input") is None
    struck = {principal for principal, count in core.trust.strikes.items() if count}
    assert struck and all("w3" in principal for principal in struck), struck
    clean = core.verification.records.clean  # the liar's record starts again, no other's
    assert not [p for p in clean if "w3" in p] and [p for p in clean if "w2" in p], clean
    assert run.final.stats["replays"] > 0


def lying(liar: str):  # type: ignore[no-untyped-def]
    """``liar`` answers each EVAL that fetches a result another worker holds with FAILED
    corrupt_input about that (honest) holder."""
    own = HonestPool.endpoint(liar)

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == liar.encode() and isinstance(job, EvalMessage) and job.inputs:
            for value in job.inputs:
                for named in value.refs:
                    others = [h.endpoint for h in named.holders if h.endpoint != own]
                    if named.ref != X0_REF and others:
                        lie = f"input {named.ref}: {others[0]} served other bytes than its digest"
                        return dataclasses.replace(
                            failed_for(job, "corrupt_input", lie),
                            lost_ref=[named.ref.task, named.ref.target],
                            lost_holder=others[0],
                        )
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


def test_one_lying_fetcher_gets_no_honest_holder_struck(honest):
    """w2 claims corrupt data of every holder it fetches from: each claim costs it its task and
    makes the holder's copy count as lost, but one principal's word is no strike: no honest
    worker is struck or quarantined, and the output is the honest pool's, bitwise."""
    run = drive(CHORDS, answer=lying("w2"))
    core = run.core
    assert core is not None and core.metrics.failures["corrupt_input"] >= 2
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert not [p for p, count in core.trust.strikes.items() if count], core.trust.strikes
    assert not core.trust.quarantined()


def test_a_corrupt_claim_is_confirmed_only_by_another_principal_in_time():
    run = drive(CHORDS, workers=1)  # a core with a fake clock
    core = run.core
    assert core is not None
    trust, clock = core.trust, core.clock
    assert not trust.corrupt_claim("holder", "liar")
    assert not trust.corrupt_claim("holder", "liar")  # the same principal again: no proof
    assert trust.corrupt_claim("holder", "other")  # a second principal: confirmed
    assert not trust.corrupt_claim("holder2", "liar")
    clock.now += CLAIM_WINDOW_S + 1  # type: ignore[attr-defined]
    assert not trust.corrupt_claim("holder2", "other")  # the first claim was forgotten
    for n in range(10 * core.config.max_workers):  # bounded
        trust.corrupt_claim(f"h{n}", "liar")
    assert len(trust.claims) <= 4 * core.config.max_workers


def test_a_holder_digest_is_optional_on_the_wire_and_checked():
    digest = "0123456789abcdef" * 2
    for holder in (Holder("tcp://a:1"), Holder("tcp://a:1", None, digest)):
        wire = ["ref", [[3, 4, [holder.to_wire()]]], False]
        parsed = NamedInput.from_wire("EVAL", wire)
        assert parsed.refs[0].holders == (holder,)
    for bad in ("0123", digest.upper(), 7):
        with pytest.raises(WireError, match="digest"):
            NamedInput.from_wire("EVAL", ["ref", [[3, 4, [["tcp://a:1", None, bad]]]], False])
