"""Push (issue 25): on the data plane, with a request's cores bound to workers, the dispatcher
asks an EVAL's worker to push each result a task of another core reads (``Plan.readers``) to
that core's worker when it is on another host (``FairDispatcher._push_to``); the reader's EVAL
names the copy ``pushed`` and reads it there, so the transfer overlaps the producer's next
compute instead of starting when the reader's EVAL arrives. Fake clock and honest by-name
workers (``broker.testing.HonestPool``), no sockets; the simulator's figures are at the end,
the wire's in tests/test_wire.py, the worker's inbox and the data plane's PUT in
tests/test_pushed_copies.py and tests/test_push_dataplane.py."""

from __future__ import annotations

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.broker import dispatch
from chords_mq.broker.core import Send
from chords_mq.broker.links import host_of
from chords_mq.wire import DropMessage, EvalMessage, HitMessage, ResultMessage
from chords_mq.wire.named import Fetched, Push
from tests.test_binding import _sixteen_mib
from tests.test_links import LATENT, two_hosts

A_B = {"a0": "hosta", "a1": "hosta", "b0": "hostb", "b1": "hostb"}


class _Run:
    """Drives a ``two_hosts`` pool to DONE: every job answered, the least recently sent first,
    one fake second each; records the EVALs sent (worker name, message), the DROPs (worker
    name, refs) and each core's hit (its latent, else its media)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.evals: list[tuple[str, EvalMessage]] = []
        self.drops: list[tuple[str, tuple[Ref, ...]]] = []
        self.hits: dict[int, torch.Tensor] = {}
        self.order: list[bytes] = list(pool.jobs)
        for name, job in pool.jobs.items():
            if isinstance(job, EvalMessage):
                self.evals.append((name.decode(), job))
        pool.route = self.route  # (the instance's: ``Pool.answer`` routes through it)

    def route(self, sends: list[Send]) -> None:
        for send in sends:
            message = send.message
            if send.to == "client" and isinstance(message, HitMessage):
                tensor = message.latent if message.latent is not None else message.media
                assert tensor is not None
                self.hits[message.core] = tensor.clone()
            elif send.to != "client" and isinstance(message, EvalMessage):
                self.evals.append((send.identity.decode(), message))
                self.order.append(send.identity)
            elif send.to != "client" and isinstance(message, DropMessage):
                self.drops.append((send.identity.decode(), message.refs))
            elif send.to != "client" and send.identity in self.pool.jobs:
                continue
            elif send.to != "client":
                self.order.append(send.identity)
        type(self.pool).route(self.pool, sends)

    def step(self) -> str:
        """Answer the job sent longest ago; the worker's name."""
        while self.order[0] not in self.pool.jobs:
            self.order.pop(0)
        name = self.order.pop(0).decode()
        self.pool.clock.now += 1.0
        self.pool.answer(name, self.pool.clock.now)
        return name

    def to_done(self, limit: int = 400) -> _Run:
        for _ in range(limit):
            if self.pool.done or not self.pool.jobs:
                break
            self.step()
        assert self.pool.done == 1, f"not DONE after {limit} answers: {self.pool.jobs}"
        return self

    def pushes(self) -> list[tuple[str, Push]]:
        return [(name, push) for name, message in self.evals for push in message.push or ()]


def _pool(push: bool, names: dict[str, str] = A_B, cores: int = 4, local: bool = False):
    """``local``: ``--push-local`` (pushes within a host too); most tests here look at the
    pushes across hosts alone."""
    pool = two_hosts(names, cores=cores)
    pool.core.dispatcher.push = push
    pool.core.dispatcher.push_local = local
    return pool


def test_a_result_read_across_hosts_is_pushed_to_its_readers_worker_and_read_there():
    """K=4 on two hosts of two: cores 1-2 on one, 3-4 on the other. Each result core 2 makes
    that core 3 reads is pushed to core 3's worker on the other host, the EVAL reading it
    names it pushed, and the reader takes the copy: nothing it was pushed is fetched."""
    pool = _pool(True)
    run = _Run(pool).to_done()
    asked = run.pushes()
    assert asked, "no push asked"
    for producer, push in asked:
        for to in push.to:
            assert host_of(to.endpoint, b"") != A_B[producer]  # across hosts only
    named = {ref for _, message in run.evals for ref in message.pushed or ()}
    assert named == {push.ref for _, push in asked}  # each push read by an EVAL naming it
    assert {ref for _, _, ref in pool.pool.used_pushes} == named
    assert len(pool.pool.pushes) == len(asked)


ONE_HOST = {"a0": "hosta", "a1": "hosta", "a2": "hosta", "a3": "hosta"}


def test_within_a_host_nothing_is_pushed_without_push_local():
    pool = _pool(True, ONE_HOST)
    run = _Run(pool).to_done()
    assert run.evals and not any(message.push or message.pushed for _, message in run.evals)


def test_with_push_local_a_result_read_on_the_same_host_is_pushed_and_read_there():
    """``--push-local`` (the broker's default): one host of four workers, K=4. Each result
    another core reads goes to that core's worker as soon as it exists, the EVAL reading it
    names it pushed and takes the copy, and the hits are those of a run that fetched."""
    pool = _pool(True, ONE_HOST, local=True)
    run = _Run(pool).to_done()
    asked = run.pushes()
    assert asked, "no push asked within the host"
    named = {ref for _, message in run.evals for ref in message.pushed or ()}
    assert named == {push.ref for _, push in asked}
    assert {ref for _, _, ref in pool.pool.used_pushes} == named
    fetching = _pool(True, ONE_HOST)
    fetched = _Run(fetching).to_done()
    assert pool.pool.fetched < fetching.pool.fetched  # the pushes replaced fetches
    assert run.hits.keys() == fetched.hits.keys() and run.hits
    for core in run.hits:
        assert torch.equal(run.hits[core], fetched.hits[core]), core


def test_push_local_leaves_a_latent_over_a_mib_to_be_fetched_within_a_host(monkeypatch):
    """Past ``PUSH_LOCAL_MAX_BYTES`` a copy pushed to a reader that runs elsewhere costs more
    than the fetch it saves: within a host nothing is pushed."""
    monkeypatch.setattr(dispatch, "PUSH_LOCAL_MAX_BYTES", LATENT - 1)
    pool = _pool(True, ONE_HOST, local=True)
    run = _Run(pool).to_done()
    assert run.evals and not any(message.push or message.pushed for _, message in run.evals)


def test_push_changes_no_result_and_off_nothing_is_pushed():
    on = _pool(True)
    with_push = _Run(on).to_done().hits
    off = _pool(False)
    run = _Run(off).to_done()
    assert not any(message.push or message.pushed for _, message in run.evals)
    assert not off.pool.pushes
    assert on.pool.pushes  # (the comparison means something)
    assert with_push.keys() == run.hits.keys() and with_push
    for core in with_push:
        assert torch.equal(with_push[core], run.hits[core]), core


def test_a_push_that_never_comes_is_fetched_instead_with_the_same_result():
    """The pushes are lost on their way (a full inbox, a dead link): each reader fetches the
    input from its holder, and every hit is the same as with pushes delivered."""
    delivered = _pool(True)
    good = _Run(delivered).to_done().hits
    lost = _pool(True)
    lost.pool.deliver_pushes = False
    run = _Run(lost).to_done()
    assert any(message.pushed for _, message in run.evals)  # named pushed, never there
    assert not lost.pool.used_pushes
    assert lost.pool.fetched > delivered.pool.fetched
    assert run.hits.keys() == good.keys()
    for core in good:
        assert torch.equal(run.hits[core], good[core]), core


def test_a_copy_pushed_to_a_worker_that_never_reads_it_is_dropped_there():
    """A push asked to two workers, of which one (b1) runs no task that reads it: once the
    result is in and nothing needs it, b1 gets a DROP for its copy, and no push is left on the
    books."""
    pool = _pool(True)
    run = _Run(pool)
    session = next(iter(pool.core.sessions.values()))
    for _ in range(200):
        if run.pushes():
            break
        run.step()
    (_, push), *_ = run.pushes()
    reader = {to.endpoint for to in push.to}
    assert pool.endpoints[b"b1"] not in reader  # b1 is not the reader
    session.pushes[push.ref] = session.pushes[push.ref] | {b"b1"}
    run.to_done()
    assert any(name == "b1" and push.ref in refs for name, refs in run.drops), run.drops
    assert not session.pushes


def test_no_push_to_a_worker_outside_the_request():
    """The other host's workers were excluded from the request (they failed it, say): nothing
    is pushed to them, and the request ends on the first host."""
    pool = _pool(True)
    run = _Run(pool)
    session = next(iter(pool.core.sessions.values()))
    session.excluded.update({b"b0", b"b1"})
    run.to_done()
    assert not run.pushes()
    assert run.hits


def test_a_wait_for_a_pushed_copy_is_left_out_of_the_speed_model():
    """A worker reports the wait for a pushed copy as a fetch of no bytes (``Worker._pushed``):
    the broker's speed model takes it off the EVAL's time, and the links learn nothing from
    it (a part-wait is not a bandwidth)."""
    pool = _pool(True)
    (first,) = pool.evals()
    info = pool.core.registry.workers[first.encode()]
    job = pool.jobs.pop(first.encode())
    reply = pool.pool.answer(job, pool.endpoints[first.encode()])
    assert isinstance(reply, ResultMessage)
    wait = Fetched(pool.endpoints[b"b0"], 0, 0.8)
    sent_at = pool.core.registry.workers[first.encode()].job.sent_at  # type: ignore[union-attr]
    pool.clock.now = sent_at + 1.0
    reply = ResultMessage(entries=reply.entries, compute_s=reply.compute_s, fetched=(wait,)).ids(
        job
    )
    pool.route(pool.core.worker_message(first.encode(), reply))
    # the speed model had 1 s an EVAL; it learns 0.2 s (1 s less the 0.8 s wait), 0.3 weighted
    assert info.speed[(LATENT, 1)] == pytest.approx(1.0 + 0.3 * (0.2 - 1.0))
    assert pool.core.links.bytes_s("hosta", "hostb") is None


def _sixteen(push: bool, jitter: float = 0.0, seed: int = 0, chain: int = 1):
    """The pushes across the hosts alone (``push_local`` off: within a host the simulator
    counts transfers as free, so a push there changes no time)."""
    return _sixteen_mib(jitter, seed, chain, push, push_local=False)


@pytest.mark.parametrize("chain", [1, 4])
def test_a_pushed_crossing_leaves_the_critical_path(chain):
    """The cross-host benchmark's pool in the simulator (tests/test_binding.py: three
    crossings, two on the critical path, 1.99 s): pushed, core 5's rectification input is on
    its worker when its EVAL starts; the same crossings, one fewer on the critical path."""
    pull = _sixteen(False, chain=chain)
    pushed = _sixteen(True, chain=chain)
    assert pull.pushed == 0 and pull.between_hosts == 3
    assert pushed.pushed == pushed.pushed_read == 2
    assert pushed.between_hosts == 3
    assert pushed.done_s < pull.done_s - 0.1436 + 0.01
    assert pushed.evaluations == pull.evaluations


def test_with_jittering_evals_push_is_never_slower_than_pull():
    for seed in range(4):
        pull = _sixteen(False, jitter=0.1, seed=seed)
        pushed = _sixteen(True, jitter=0.1, seed=seed)
        assert pushed.done_s <= pull.done_s + 1e-9, seed
        assert pushed.pushed_read == pushed.pushed, seed


def test_nothing_is_pushed_while_the_cores_are_not_bound():
    """A request that ran a task again no longer binds its cores to workers (``_bound``): its
    readers' tasks go wherever they finish first, so a copy pushed to a core's worker would
    cross the link for nothing. Nothing is pushed from then on."""
    pool = _pool(True)
    run = _Run(pool)
    session = next(iter(pool.core.sessions.values()))
    session.tasks.attempts[10**6] = 2  # a task ran again (its second attempt)
    assert pool.core.dispatcher._bound(session, {b"a0": 1.0}) == {}
    run.to_done()
    assert not run.pushes()
    assert run.hits
