"""A fetcher checks what it fetched (issue 26): an EVAL by name names, with each holder of an
input, the digest that holder reported of it, and the worker that fetches compares the bytes it
received with it. A holder that serves other bytes than it reported (``--fault serve:zeros``)
is answered FAILED corrupt_input: the holder is struck, not the fetcher, its copy counts as lost
and the input is recomputed by lineage. Broker core on a fake clock (``drive``, as the data-plane
tests), and the wire's holder field."""

from __future__ import annotations

import pytest
import torch

from chords_mq.broker.core import BrokerCore, Send
from chords_mq.wire import DoneMessage, EvalMessage, Kind, WireError, tensor_digest
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


def test_a_holder_digest_is_optional_on_the_wire_and_checked():
    digest = "0123456789abcdef" * 2
    for holder in (Holder("tcp://a:1"), Holder("tcp://a:1", None, digest)):
        wire = ["ref", [[3, 4, [holder.to_wire()]]], False]
        parsed = NamedInput.from_wire("EVAL", wire)
        assert parsed.refs[0].holders == (holder,)
    for bad in ("0123", digest.upper(), 7):
        with pytest.raises(WireError, match="digest"):
            NamedInput.from_wire("EVAL", ["ref", [[3, 4, [["tcp://a:1", None, bad]]]], False])
