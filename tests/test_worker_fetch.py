"""How a worker fetches an EVAL's remote inputs (issue 25): every ref once, the refs of one
holder in one FETCH, the FETCHes to different holders together (``DataClient.fetch_many``
polls their sockets at once), the next holder of a ref when one fails or serves bytes without
its digest, and a bounded cache of fetched copies that DROP and RELEASE empty. Real
``DataServer``s on loopback, as tests/test_dataplane.py; the worker is not connected to any
broker (its fetch path needs none)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import zmq

from chords_mq.algorithms.base import Ref
from chords_mq.wire import DropMessage, ReleaseMessage, tensor_digest
from chords_mq.wire.named import X0_REF, Holder, NamedInput, NamedRef
from chords_mq.workers.dataplane import (
    Ask,
    DataClient,
    DataServer,
    FetchRefused,
    LatentSpec,
    PeerTimeout,
)
from chords_mq.workers.store import LatentStore
from chords_mq.workers.worker import CorruptInput, LostInput, Worker

SHAPE = (2, 4, 8)
REQ = "req-1"
A, B, C = Ref(1, 2), Ref(2, 3), Ref(3, 4)


def latent(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


VALUES = {A: latent(1), B: latent(2), C: latent(3)}


def serving(refs: list[Ref]) -> DataServer:
    store = LatentStore()
    for ref in refs:
        store.put(REQ, ref, VALUES[ref])
    return DataServer(store)


@pytest.fixture
def servers() -> Iterator[list[DataServer]]:
    """s0 holds A and B, s1 holds C, s2 holds all three."""
    started = [serving([A, B]), serving([C]), serving([A, B, C])]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker("tcp://127.0.0.1:9", None, "m", "cpu")  # type: ignore[arg-type]
    worker.store.put(REQ, X0_REF, latent(0))
    yield worker
    if worker._client is not None:
        worker._client.close()
    os.close(worker._wake_r)
    os.close(worker._wake_w)
    worker.ctx.term()


def holder(server: DataServer | str, ref: Ref, digest: bool = True) -> Holder:
    endpoint = server if isinstance(server, str) else server.advertised
    return Holder(endpoint, None, tensor_digest(VALUES[ref]) if digest else None)


def fetches(worker: Worker, servers: list[DataServer]) -> list[int]:
    """FETCHes answered per server, as the worker's client counted them (the servers' own
    counters are bumped after the reply is sent: a race)."""
    assert worker._client is not None
    stats = worker._client.transfer_stats()
    return [stats[s.advertised].fetches if s.advertised in stats else 0 for s in servers]


def named(ref: Ref, *holders: Holder) -> NamedRef:
    return NamedRef(ref, holders)


def rectify(*refs: NamedRef) -> NamedInput:
    return NamedInput("rectify", refs)


@pytest.fixture
def silent() -> Iterator[str]:
    """A loopback endpoint nobody answers on: a ROUTER that reads and never replies."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:0")
        yield sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def test_fetch_many_asks_every_peer_at_once_and_types_each_outcome(servers, silent):
    asks = [
        Ask(servers[0].advertised, REQ, (A, B), LatentSpec.of(VALUES[A])),
        Ask(silent, REQ, (A,)),
        Ask(servers[1].advertised, REQ, (C,)),
        Ask(servers[1].advertised, REQ, (A,)),  # not held there: a refusal, the rest served
    ]
    with DataClient() as client:
        got = client.fetch_many(asks, timeout_s=0.5)
        assert [g.error for g in got[:1] + got[2:3]] == [None, None]
        assert torch.equal(got[0].tensors[A], VALUES[A])
        assert torch.equal(got[0].tensors[B], VALUES[B])
        assert torch.equal(got[2].tensors[C], VALUES[C])
        assert got[0].seconds > 0
        assert isinstance(got[1].error, PeerTimeout)
        assert isinstance(got[3].error, FetchRefused)
        stats = client.transfer_stats()
        assert stats[servers[0].advertised].fetches == 1
        assert stats[servers[0].advertised].bytes == 2 * VALUES[A].nbytes
        assert silent not in stats


def test_an_evals_remote_refs_are_fetched_once_one_fetch_per_holder(servers, worker):
    """Two tasks read A; A and B are on s0, C on s1: one FETCH to each, each reported."""
    values = [
        rectify(
            named(A, holder(servers[0], A)),
            named(B, holder(servers[0], B)),
            named(C, holder(servers[1], C)),
        ),
        NamedInput("ref", (named(A, holder(servers[0], A)),)),
        NamedInput("x0", (named(X0_REF, Holder("tcp://127.0.0.1:9")),)),  # held here
    ]
    got = worker._fetch_all(REQ, values, LatentSpec.of(VALUES[A]))
    assert set(got) == {A, B, C}
    for ref, tensor in got.items():
        assert torch.equal(tensor, VALUES[ref])
    assert fetches(worker, servers) == [1, 1, 0]
    reported = {f.endpoint: f.nbytes for f in worker._fetched}
    nbytes = VALUES[A].nbytes
    assert reported == {servers[0].advertised: 2 * nbytes, servers[1].advertised: nbytes}
    # and the value the worker computes from them is the plan's
    out = worker._resolve(REQ, values[1], None, got)
    assert torch.equal(out, VALUES[A])


def test_a_failing_or_corrupt_holder_gives_way_to_the_next(servers, worker, silent):
    servers[1].serve_fault = torch.zeros_like  # serves zeros of C: not its digest
    values = [
        rectify(
            named(A, holder(silent, A), holder(servers[2], A)),
            named(B, holder(servers[1], B), holder(servers[2], B)),  # s1: not held
            named(C, holder(servers[1], C), holder(servers[2], C)),  # s1: corrupt
        )
    ]
    got = worker._fetch_all(REQ, values, None)
    for ref in (A, B, C):
        assert torch.equal(got[ref], VALUES[ref])
    # one FETCH to s2 for all three (the next round), reported; the failed ones are not
    assert fetches(worker, servers)[2] == 1
    assert [f.endpoint for f in worker._fetched] == [servers[2].advertised]


def test_no_good_holder_is_a_lost_or_corrupt_input(servers, worker):
    with pytest.raises(LostInput) as lost:
        worker._fetch_all(REQ, [NamedInput("ref", (named(C, holder(servers[0], C)),))], None)
    assert lost.value.ref == C and lost.value.holder == servers[0].advertised
    assert not isinstance(lost.value, CorruptInput)
    servers[1].serve_fault = torch.zeros_like
    with pytest.raises(CorruptInput) as corrupt:
        worker._fetch_all(REQ, [NamedInput("ref", (named(C, holder(servers[1], C)),))], None)
    assert corrupt.value.holder == servers[1].advertised


def test_fetched_copies_are_reused_until_dropped_or_released_and_bounded(servers, worker):
    value = [
        rectify(
            named(A, holder(servers[0], A)),
            named(B, holder(servers[0], B)),
            named(C, holder(servers[1], C)),
        )
    ]
    worker._fetch_all(REQ, value, None)
    worker._fetched = []
    again = worker._fetch_all(REQ, value, None)  # a second task reading them: no fetch
    assert fetches(worker, servers) == [1, 1, 0] and not worker._fetched
    assert torch.equal(again[B], VALUES[B])
    # a copy is used only while a holder still reports its digest
    unchecked = holder(servers[2], A, digest=False)
    worker._fetch_all(REQ, [NamedInput("ref", (named(A, unchecked),))], None)
    assert fetches(worker, servers)[2] == 1 and (REQ, A) in worker.copies
    worker._handle(DropMessage(refs=(A,), request=REQ))
    assert (REQ, A) not in worker.copies and (REQ, C) in worker.copies
    worker._handle(ReleaseMessage(request=REQ))
    assert not worker.copies and worker._copies_held == 0
    worker.copies_bytes = VALUES[A].nbytes  # room for one copy: the oldest goes first
    worker._fetch_all(REQ, value, None)
    assert len(worker.copies) == 1
    assert worker._copies_held == VALUES[A].nbytes
