"""A hit's latent sent on in pieces (``broker.parts``; issue 25: one hop of a big hit, not two).

Broker core on a fake clock (``drive``, as the data-plane tests) with a 4 MiB latent: a DECODE
asks for the latent in PARTs only of a worker whose HELLO lists "parts" and for a client whose
SUBMIT said ``hit_parts``; each piece is checked (its place, its size, finite, and verifying the
digest its holders reported) and sent on to the client as it arrives; the HIT comes after its
pieces, with no latent. The client's own assembly (``chords_mq.client._Pending``) makes the hits,
which equal the honest pool's with every latent whole, bit for bit. A bad piece is a bad result:
the hit is decoded elsewhere and its first piece tells the client to start over. The wire's
PART, and the client's assembly on its own."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import HonestPool
from chords_mq.client import MAX_STREAMS, RequestFailed, RequestStream, _Pending
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    MAX_PARTS,
    DecodedMessage,
    DecodeMessage,
    DoneMessage,
    ErrorMessage,
    HitMessage,
    Kind,
    Message,
    PartMessage,
    WireError,
    decode,
    encode,
    part_bounds,
    parts_for,
    split_bytes,
)
from tests.test_broker_dataplane import CHORDS, MODEL, Run, drive

BIG = torch.linspace(-1, 1, 1 << 20)  # x0 of 4 MiB (float32): asked in 4 pieces of 1 MiB
PARTS = ["probe", "parts"]  # a HELLO's capabilities: answers probes, sends pieces
SEQUENTIAL = RequestSpec(model=MODEL, steps=6, method="sequential", seed=0)
SMALL_CHORDS = dataclasses.replace(CHORDS, steps=8)


def pieces(job: Message, answer: Message | None) -> Message | list[Message] | None:
    """A worker's answer to a DECODE that asked for pieces, as ``chords-worker`` sends it: each
    piece of the latent as a PART (``part_bounds``), then the DECODED without it."""
    if not isinstance(job, DecodeMessage) or not job.parts:
        return answer
    assert isinstance(answer, DecodedMessage) and answer.latent is not None, answer
    cut = split_bytes(answer.latent, job.parts)
    out: list[Message] = [
        PartMessage(index=i, parts=len(cut), data=data.clone()).ids(job)
        for i, data in enumerate(cut)
    ]
    return [*out, dataclasses.replace(answer, latent=None, parts=len(cut))]


def in_parts(run: Run, identity: bytes, job: Message) -> Message | list[Message] | None:
    return pieces(job, run.pool.answer(job, HonestPool.endpoint(identity.decode())))


def assembled(run: Run) -> list[tuple[int, int, torch.Tensor]]:
    """The hits as the client library makes them of what the broker sent it, in order."""
    pending = _Pending(CHORDS)
    hits = []
    for message in run.client:
        if isinstance(message, PartMessage):
            pending.piece(message)
        elif isinstance(message, HitMessage):
            if message.parts is not None:
                made = pending.assembled(message)
                assert isinstance(made, HitMessage), made
                message = made
            assert message.latent is not None
            hits.append((message.core, message.round, message.latent))
    return hits


def same(run: Run, reference: Run) -> None:
    assert isinstance(run.final, DoneMessage), run.final
    got, want = assembled(run), assembled(reference)
    assert [(c, r) for c, r, _ in got] == [(c, r) for c, r, _ in want]
    for (_, _, x), (_, _, y) in zip(got, want, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def big(spec: RequestSpec = SMALL_CHORDS, **kwargs: object) -> Run:
    return drive(spec, pool=HonestPool(BIG), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def whole() -> Run:
    """The same request with every latent whole (no worker sends pieces), off the data plane."""
    return big(data_plane=False)


def test_parts_for_and_part_bounds():
    assert [parts_for(n << 20) for n in (0, 1, 2, 3, 16, 64, 1024)] == [1, 1, 2, 3, 16, 16, 16]
    for nbytes, size, asked in [(4 << 20, 4, 4), (40, 4, 4), (36, 4, 4), (6, 2, 16), (8, 8, 3)]:
        bounds = part_bounds(nbytes, size, asked)
        assert bounds[0][0] == 0 and bounds[-1][1] == nbytes and len(bounds) <= asked
        assert all(a < b and a % size == 0 for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))
    assert part_bounds(36, 4, 4) == [(0, 12), (12, 24), (24, 36)]
    for bad in [(0, 4, 2), (10, 4, 2), (16, 4, 0), (16, 4, MAX_PARTS + 1)]:
        with pytest.raises(WireError):
            part_bounds(*bad)


def test_a_big_hit_goes_to_the_client_in_pieces_with_the_same_bits(whole):
    run = big(answer=in_parts, capabilities=PARTS, hit_parts=True)
    same(run, whole)
    decodes = [m for m in run.sent(Kind.DECODE) if isinstance(m, DecodeMessage)]
    assert decodes and all(m.parts == 4 for m in decodes)
    hits = [m for m in run.client if isinstance(m, HitMessage)]
    assert hits and all(m.latent is None and m.parts == 4 for m in hits)
    assert all(m.shape == [1 << 20] and m.dtype == "float32" for m in hits)
    # each hit's four pieces, in order, before its HIT
    order = [(m.core, m.index) for m in run.client if isinstance(m, PartMessage)]
    assert order == [(h.core, i) for h in hits for i in range(4)]
    assert isinstance(run.final, DoneMessage) and run.final.stats["hit_parts"] == 4 * len(hits)


def test_a_sequential_hit_in_pieces_equals_it_whole():
    whole = big(SEQUENTIAL, data_plane=False)
    run = big(SEQUENTIAL, answer=in_parts, capabilities=PARTS, hit_parts=True)
    same(run, whole)
    assert [m.parts for m in run.client if isinstance(m, HitMessage)] == [4]


@pytest.mark.parametrize(
    ("said", "hit_parts", "pool"),
    [
        (PARTS, None, BIG),  # the client did not say it takes pieces
        (["probe"], True, BIG),  # the workers do not send them
        (PARTS, True, None),  # a latent of 16 bytes
    ],
)
def test_a_latent_goes_whole_unless_both_ends_take_pieces_and_it_is_big(said, hit_parts, pool):
    pool = HonestPool() if pool is None else HonestPool(pool)
    run = drive(SMALL_CHORDS, pool=pool, answer=in_parts, capabilities=said, hit_parts=hit_parts)
    assert isinstance(run.final, DoneMessage), run.final
    assert not [m for m in run.sent(Kind.DECODE) if isinstance(m, DecodeMessage) and m.parts]
    assert not [m for m in run.client if isinstance(m, PartMessage)]
    assert all(m.latent is not None for m in run.client if isinstance(m, HitMessage))
    assert run.final.stats["hit_parts"] == 0


def nan_piece(reply: list[Message]) -> list[Message]:
    part = reply[1]
    assert isinstance(part, PartMessage)
    data = part.data.clone()
    data.view(torch.float32)[7] = float("nan")
    return [reply[0], dataclasses.replace(part, data=data), *reply[2:]]


def skipped_piece(reply: list[Message]) -> list[Message]:
    return [reply[0], *reply[2:]]


def short_decoded(reply: list[Message]) -> list[Message]:
    """Every piece, then a DECODED that says one more."""
    last = reply[-1]
    assert isinstance(last, DecodedMessage) and last.parts is not None
    return [*reply[:-1], dataclasses.replace(last, parts=last.parts + 1)]


def other_bytes(reply: list[Message]) -> list[Message]:
    """Finite pieces, but not the latent's: piece 2 halved."""
    part = reply[2]
    assert isinstance(part, PartMessage)
    data = part.data.clone()
    data.view(torch.float32).mul_(0.5)
    return [*reply[:2], dataclasses.replace(part, data=data), *reply[3:]]


def decoders(run: Run) -> list[bytes]:
    return [s.identity for s in run.to_workers if s.message.kind is Kind.DECODE]


@pytest.mark.parametrize(
    ("spoil", "verify", "reason"),
    [
        (nan_piece, "off", "parts"),
        (skipped_piece, "off", "parts"),
        (short_decoded, "off", "parts"),
        (other_bytes, "sample", "digest"),
    ],
)
def test_a_bad_piece_is_a_bad_result_and_the_hit_is_decoded_elsewhere(whole, spoil, verify, reason):
    """The decoder's stream fails a check: a bad result (the worker leaves the request), the
    hit decoded by another worker, whose first piece starts the client's copy over: the bits
    are the honest pool's."""
    first: list[bytes] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | list[Message] | None:
        reply = in_parts(run, identity, job)
        if isinstance(job, DecodeMessage) and not first:  # the first decode only
            first.append(identity)
            assert isinstance(reply, list)
            return spoil(reply)
        return reply

    run = big(answer=answer, capabilities=PARTS, hit_parts=True, verify=verify)
    same(run, whole)
    core = run.core
    assert core is not None and core.metrics.failures[reason] == 1, core.metrics.failures
    assert len(decoders(run)) == len(run.hits) + 1  # that hit decoded twice
    # the client got each piece in its place, or a first piece starting over: none past a gap
    last: dict[int | None, int] = {}
    for message in run.client:
        if isinstance(message, PartMessage):
            assert message.index in (0, last.get(message.core, -1) + 1), (message.core, last)
            last[message.core] = message.index
    # the worker is out of the request (the failure table's BAD_RESULT row: excluded)
    sent = [(s.identity, s.message.kind) for s in run.to_workers]
    spoilt = sent.index((first[0], Kind.DECODE))
    work = (Kind.EVAL, Kind.DECODE, Kind.PREPARE)
    assert not [kind for who, kind in sent[spoilt + 1 :] if who == first[0] and kind in work]


def test_a_part_that_answers_no_current_decode_is_dropped(whole):
    """A PART from a worker whose job is not that decode (a late one, a stranger's) reaches
    no client and blames nobody."""
    stray: list[Send] = []

    def event(run: Run, core: BrokerCore) -> list[Send]:
        idle = next(w for w in core.registry.workers.values() if w.job is None)
        piece = PartMessage(
            index=0, parts=4, data=torch.zeros(1 << 20, dtype=torch.uint8), request="x", task=1
        )
        stray.extend(core.worker_message(idle.identity, piece.stamped(core.epoch)))
        return []

    run = big(answer=in_parts, capabilities=PARTS, hit_parts=True, events={3: event})
    same(run, whole)
    assert stray == []
    assert run.core is not None and not run.core.metrics.failures


def test_the_pieces_of_a_decode_the_hit_no_longer_waits_for_reach_no_client(whole):
    """The hit is redone under another id while its first decoder streams (its results were
    found wrong, ``MediaQueue.redo``): that decoder's pieces are dropped, not sent on, and the
    hit the client assembles is the new decode's; nobody is blamed."""
    old: list[int] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | list[Message] | None:
        if isinstance(job, DecodeMessage) and not old:
            assert run.core is not None and job.task is not None
            (session,) = run.core.sessions.values()
            session.media.redo(lambda hit: True)  # as ``broker.verify`` does
            old.append(job.task)
        return in_parts(run, identity, job)

    run = big(answer=answer, capabilities=PARTS, hit_parts=True)
    same(run, whole)
    sent = [m.task for m in run.client if isinstance(m, PartMessage)]
    assert old and old[0] not in sent and sent
    assert all(m.task is not None for m in run.client if isinstance(m, PartMessage))
    assert run.core is not None and not run.core.metrics.failures


def test_the_wire_refuses_malformed_pieces():
    ok = PartMessage(index=1, parts=2, data=torch.ones(8, dtype=torch.uint8), core=3)
    again = decode(encode(ok))
    assert isinstance(again, PartMessage) and torch.equal(again.data, ok.data)
    assert (again.index, again.parts, again.core) == (1, 2, 3)
    bad = [
        dataclasses.replace(ok, data=torch.ones(2, dtype=torch.float32)),
        dataclasses.replace(ok, data=torch.ones(2, 4, dtype=torch.uint8)),
        dataclasses.replace(ok, data=torch.ones(0, dtype=torch.uint8)),
        dataclasses.replace(ok, index=2),
        dataclasses.replace(ok, parts=MAX_PARTS + 1),
        dataclasses.replace(ok, core=-1),
    ]
    for message in bad:
        with pytest.raises(WireError):
            decode(encode(message))
    with pytest.raises(WireError):  # pieces of a latent nobody wants back
        decode(encode(DecodeMessage(latent=torch.ones(2), parts=2)))
    with pytest.raises(WireError):  # a DECODED that has its latent and says it came in pieces
        decode(encode(DecodedMessage(latent=torch.ones(2), parts=2)))
    hit = HitMessage(core=1, round=2, steps=3, elapsed_s=0.1, parts=2)
    with pytest.raises(WireError):  # pieces make a latent only with its dtype and shape
        decode(encode(hit))
    made = decode(encode(dataclasses.replace(hit, shape=[2, 2], dtype="float32")))
    assert isinstance(made, HitMessage) and made.shape == [2, 2] and made.latent is None


def test_the_client_starts_over_at_a_first_piece_and_refuses_a_hit_its_pieces_do_not_make():
    latent = torch.arange(8, dtype=torch.float32)
    raw = latent.view(torch.uint8)

    def piece(index: int, data: torch.Tensor, core: int = 1, decode: int = 9) -> PartMessage:
        return PartMessage(index=index, parts=2, data=data, core=core, request="r", task=decode)

    hit = HitMessage(
        core=1, round=5, steps=5, elapsed_s=0.1, parts=2, shape=[2, 4], dtype="float32", task=9
    )
    pending = _Pending(CHORDS)
    pending.piece(piece(0, torch.zeros(16, dtype=torch.uint8)))  # a first decoder's, abandoned
    pending.piece(piece(0, raw[:16]))  # the next decoder's: start over
    pending.piece(piece(1, raw[16:]))
    made = pending.assembled(hit)
    assert isinstance(made, HitMessage) and made.parts is None and made.task is None
    assert made.latent is not None and torch.equal(made.latent, latent.view(2, 4))
    # a decode redone under another id: its pieces replace the first decode's
    pending.piece(piece(0, torch.zeros(16, dtype=torch.uint8), decode=7))
    pending.piece(piece(1, raw[:16], decode=9))  # decode 9, from piece 1: not a start
    pending.piece(piece(0, raw[:16], decode=9))
    pending.piece(piece(1, raw[16:], decode=9))
    again = pending.assembled(hit)
    assert isinstance(again, HitMessage) and again.latent is not None
    assert torch.equal(again.latent, latent.view(2, 4))
    # a HIT of another decode than the pieces kept: refused
    pending.piece(piece(0, raw[:16], decode=7))
    pending.piece(piece(1, raw[16:], decode=7))
    assert isinstance(pending.assembled(hit), ErrorMessage)
    # a gap: piece 1 never came
    pending.piece(piece(0, raw[:16]))
    refused = pending.assembled(hit)
    assert isinstance(refused, ErrorMessage) and refused.code == "bad_hit"
    assert "1 of 2 pieces" in refused.message
    # the right count of pieces, the wrong bytes for the shape
    pending.piece(piece(0, raw[:16]))
    pending.piece(piece(1, raw[16:24]))
    assert isinstance(pending.assembled(hit), ErrorMessage)
    # pieces of more latents at once than a request has cores are not kept
    for core in range(MAX_STREAMS + 5):
        pending.piece(piece(0, raw[:16], core=core))
    assert len(pending.pieces) == MAX_STREAMS


def test_a_hit_its_pieces_do_not_make_fails_the_request_and_it_is_cancelled():
    """The client's own finding (``bad_hit``): the request fails with it, and the stream is
    not over for the broker, so leaving it sends a CANCEL (a broker's ERROR needs none)."""
    stream = RequestStream(None, "r", CHORDS, timeout=None)  # type: ignore[arg-type]
    with pytest.raises(RequestFailed) as failed:
        stream._take(ErrorMessage(code="bad_hit", message="2 of 4 pieces", request="r"))
    assert failed.value.code == "bad_hit" and stream._over is False
    with pytest.raises(RequestFailed):
        stream._take(ErrorMessage(code="no_worker", message="none", request="r"))
    assert stream._over is True
