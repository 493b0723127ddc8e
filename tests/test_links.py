"""Placement that counts the links (issue 25 item 4): each worker's host, the bandwidth learnt per
pair of hosts from the workers' own fetches (RESULT ``fetched``, protocol 8), and the earliest
finish time with each input's transfer in it. Fake clock and honest by-name workers
(``broker.testing.HonestPool``), no sockets; the last tests run the simulator on two hosts."""

from __future__ import annotations

import dataclasses
import math
import random
import warnings

import pytest
import torch

from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.broker.directory import X0, Lineage
from chords_mq.broker.links import DEFAULT_BYTES_S, LATENCY_S, MAX_PAIRS, Links, host_of
from chords_mq.broker.simulate import simulate
from chords_mq.broker.testing import FakeClock, HonestPool, hello
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    DoneMessage,
    EvalMessage,
    Message,
    ResultEntry,
    ResultMessage,
    SubmitMessage,
    WireError,
)
from chords_mq.wire import decode as decode_frames
from chords_mq.wire import encode as encode_message
from chords_mq.wire.named import MAX_FETCHED, Fetched, HeldResult

MODEL = "m"
LATENT = 256 * 1024  # bytes of the honest workers' latents here (float32)
SLOW = 10e3  # bytes/s of a link taught as slow: a latent takes about 26 s, an EVAL 1 s


def test_a_workers_host_is_its_data_endpoints_and_one_without_is_a_host_of_its_own():
    assert host_of("tcp://10.0.0.2:5600", b"w") == "10.0.0.2"
    assert host_of("tcp://[fe80::1]:7", b"w") == "fe80::1"
    assert host_of("tcp://Node-A:1", b"w") == "node-a"
    assert host_of(None, b"w1") != host_of(None, b"w2")


def test_an_unmeasured_link_is_a_gigabit_between_hosts_and_free_within_one():
    links = Links()
    assert links.seconds("a", "b", 125_000_000) == pytest.approx(1.0 + LATENCY_S)
    assert DEFAULT_BYTES_S == 125e6
    assert links.seconds("a", "a", 1 << 30) == LATENCY_S  # a round trip, no bytes


def test_fetches_teach_a_link_both_ways_and_small_ones_teach_nothing():
    links = Links()
    links.learn("b", [Fetched("tcp://a:1", 1_000_000, 0.1 + LATENCY_S)])
    assert links.bytes_s("a", "b") == pytest.approx(10e6)
    assert links.seconds("b", "a", 1_000_000) == pytest.approx(0.1 + LATENCY_S)
    links.learn("b", [Fetched("tcp://a:1", 1_000_000, 1.0 + LATENCY_S)])  # an average
    assert links.bytes_s("a", "b") == pytest.approx(10e6 + 0.3 * (1e6 - 10e6))
    links.learn("c", [Fetched("tcp://a:1", 100, 5.0)])  # a round trip, not a bandwidth
    assert links.bytes_s("a", "c") is None
    links.learn("a", [Fetched("tcp://a:2", 1_000_000, 0.01)])  # within a host: measured
    assert links.seconds("a", "a", 1_000_000) > LATENCY_S


def test_the_links_remembered_are_bounded():
    links = Links()
    for i in range(MAX_PAIRS + 10):
        links.learn(f"h{i}", [Fetched("tcp://hub:1", 1 << 20, 0.1)])
    assert len(links.summary()) == MAX_PAIRS
    assert links.bytes_s("hub", "h0") is None and links.bytes_s("hub", f"h{MAX_PAIRS + 9}")


def _result(fetched: tuple[Fetched, ...] | None) -> ResultMessage:
    held = {1: HeldResult("float32", (4,), 16, True)}
    return ResultMessage(entries=(ResultEntry(0, 0, {}, held),), compute_s=0.1, fetched=fetched)


def test_a_result_carries_its_fetches_on_the_wire():
    sent = _result((Fetched("tcp://10.0.0.2:5600", 4096, 0.25),))
    assert sent.body()["fetched"] == [["tcp://10.0.0.2:5600", 4096, 0.25]]
    got = decode_frames(encode_message(sent))
    assert isinstance(got, ResultMessage) and got.fetched == sent.fetched
    assert "fetched" not in _result(None).body()  # not sent: nothing fetched
    assert decode_frames(encode_message(_result(None))).fetched is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "fetched",
    [
        "tcp://a:1",
        [["tcp://a:1", 1, 0.1]] * (MAX_FETCHED + 1),
        [["udp://a:1", 1, 0.1]],
        [["tcp://a:1", -1, 0.1]],
        [["tcp://a:1", 1, -0.1]],
        [["tcp://a:1", 1, math.nan]],
        [["tcp://a:1", 1, True]],
        [["tcp://a:1", 1]],
        [["tcp://" + "a" * 300, 1, 0.1]],
    ],
)
def test_a_bad_fetch_report_is_a_wire_error(fetched):
    body = {**_result(None).body(), "fetched": fetched}
    with pytest.raises(WireError, match="fetch"):
        ResultMessage.parse({}, body, {})


# -- the broker's decisions ---------------------------------------------------------------------


@dataclasses.dataclass
class Pool:
    """A broker core and honest by-name workers on hosts; jobs are answered when a test says."""

    core: BrokerCore
    clock: FakeClock
    pool: HonestPool
    endpoints: dict[bytes, str]
    jobs: dict[bytes, Message] = dataclasses.field(default_factory=dict)
    done: int = 0  # requests DONE

    def route(self, sends: list[Send]) -> None:
        for send in sends:
            if send.to == "client":
                self.done += isinstance(send.message, DoneMessage)
                continue
            if send.message.kind.value in ("PREPARE", "EVAL", "DECODE"):
                assert send.identity not in self.jobs, f"{send.identity!r} has a job already"
                self.jobs[send.identity] = send.message
            elif send.message.kind.value in ("DROP", "RELEASE"):
                self.pool.answer(send.message, self.endpoints[send.identity])

    def answer(self, name: str, at: float, fetched_s: float | None = None) -> Message:
        """``name`` answers its job at ``at`` (its fetches reported as taking ``fetched_s``)."""
        identity = name.encode()
        job = self.jobs.pop(identity)
        self.clock.now = max(self.clock.now, at)
        before = len(self.pool.transfers)
        reply = self.pool.answer(job, self.endpoints[identity])
        assert reply is not None
        moved = self.pool.transfers[before:]
        if moved and fetched_s is not None and isinstance(reply, ResultMessage):
            report = tuple(Fetched(src, n, fetched_s / len(moved)) for src, _, n in moved)
            reply = dataclasses.replace(reply, fetched=report)
        self.route(self.core.worker_message(identity, reply))
        return job

    def evals(self) -> dict[str, EvalMessage]:
        return {w.decode(): m for w, m in self.jobs.items() if isinstance(m, EvalMessage)}


def two_hosts(
    names: dict[str, str],
    link_placement: bool = True,
    cores: int = 2,
    speeds: dict[str, float] | None = None,
    requests: int = 1,
) -> Pool:
    """``names``: worker -> host. A CHORDS request of ``cores`` cores, every worker prepared and
    known to take 1 s an EVAL (or its ``speeds``); the first EVAL (core 1 from x0, on the first
    worker) sent, not answered."""
    clock = FakeClock()
    config = BrokerConfig(
        liveness=10**6,
        heartbeat_s=10**6,
        deadline_floor_s=1e6,
        link_placement=link_placement,
        verify="off",  # placement alone: no replicas,
        chain=1,  # and each step placed on its own (tests/test_broker_chains.py: chains)
    )
    core = BrokerCore(config, clock, epoch=7)
    endpoints = {
        name.encode(): f"tcp://{host}:{5600 + i}" for i, (name, host) in enumerate(names.items())
    }
    pool = Pool(core, clock, HonestPool(torch.zeros(LATENT // 4)), endpoints)
    for name in names:
        pool.route(
            core.worker_message(name.encode(), hello(name, MODEL, data=endpoints[name.encode()]))
        )
    spec = RequestSpec(model=MODEL, steps=12, cores=cores, seed=0, exact_cores=True)
    for request in range(requests):
        submit = SubmitMessage(spec=spec.to_dict(), request=f"r{request}")
        pool.route(core.client_message(b"client", submit))
    for _ in range(requests):
        for name in names:
            if name.encode() in pool.jobs:
                pool.answer(name, 0.0)  # PREPARED
    for info in core.registry.workers.values():
        info.observe((LATENT, 1), (speeds or {}).get(info.name, 1.0))
    assert len(pool.evals()) == requests, pool.jobs
    return pool


def test_a_core_waits_for_its_busy_holder_rather_than_cross_a_slow_link():
    """After core 1's first step both its next step and core 2's start read its result: the
    holder takes one, and the worker on the other host leaves the other to it (26 s to fetch,
    against 2 s of waiting) instead of taking it."""
    pool = two_hosts({"a0": "hosta", "b0": "hostb"})
    (first,) = pool.evals()
    pool.core.links.learn("hosta", [Fetched("tcp://hostb:1", 1 << 20, (1 << 20) / SLOW)])
    pool.answer(first, 1.0)
    assert list(pool.evals()) == [first]  # the other host's worker waits


def test_a_core_moves_to_the_other_host_when_that_finishes_sooner():
    pool = two_hosts({"a0": "hosta", "b0": "hostb"})  # a gigabit: 2 ms a latent
    (first,) = pool.evals()
    pool.answer(first, 1.0)
    assert sorted(pool.evals()) == ["a0", "b0"]
    moved = pool.core.registry.workers[b"b0"].job
    assert moved is not None and moved.expected_s is not None  # its fetch, then its EVAL
    assert moved.expected_s == pytest.approx(1.0 + LATENCY_S + LATENT / DEFAULT_BYTES_S)
    # its deadline allows for that input at the transfer floor too (a shared link is slower)
    stays = pool.core.registry.workers[b"a0"].job
    assert moved.fetch_bytes == LATENT and stays is not None and stays.fetch_bytes == 0
    config = pool.core.config
    deadline = pool.core.deadlines.deadline(pool.core.registry.workers[b"b0"])
    assert deadline is not None
    allowed = deadline - moved.sent_at
    allowed -= max(config.deadline_factor * moved.expected_s, config.deadline_floor_s)
    moving = (2 * moved.expected_bytes + LATENT) / config.transfer_floor_bytes_s
    assert allowed == pytest.approx(moving, rel=1e-6)


def test_a_holder_busy_with_another_cores_chain_is_not_waited_for():
    """Core 2's start reads core 1's first result; its holder goes on with core 1 first, so it
    would start core 2 two EVALs from now: across a link of 1.5 EVALs it starts sooner."""
    pool = two_hosts({"a0": "hosta", "b0": "hostb"})
    pool.core.links.learn("hosta", [Fetched("tcp://hostb:1", LATENT, 1.5 + LATENCY_S)])
    pool.answer("a0", 1.0)
    assert sorted(pool.evals()) == ["a0", "b0"]


def test_a_busy_holder_on_another_core_counts_one_eval_more():
    """One host (no blocks: only the links decide), its loopback learnt slow: 1.5 EVALs a
    latent. Core 2's start reads core 1's first result; its holder goes on with core 1 first
    (free in 1 EVAL, core 2 then one EVAL later: done in 3), so the idle worker, fetching for
    1.5 EVALs, finishes it sooner (2.5) and takes it. Counted without that EVAL the holder
    would look done in 2 and keep it."""
    pool = two_hosts({"a0": "hosta", "a1": "hosta"})
    pool.core.links.learn("hosta", [Fetched("tcp://hosta:1", LATENT, 1.5 + LATENCY_S)])
    pool.answer("a0", 1.0)
    assert sorted(pool.evals()) == ["a0", "a1"]


@pytest.mark.parametrize("counted", [True, False])
def test_a_core_starts_beside_its_input_rather_than_across_the_link(counted):
    """The holder's host has an idle worker: core 2 starts there, though the other host's
    worker is asked first (the links not counted: it takes it, and fetches across)."""
    pool = two_hosts({"a0": "hosta", "b0": "hostb", "a1": "hosta"}, counted, cores=3)
    (first,) = pool.evals()
    assert first == "a0"
    pool.answer(first, 1.0)
    assert sorted(pool.evals()) == (["a0", "a1"] if counted else ["a0", "b0"])


def test_a_worker_that_left_a_task_to_an_idle_one_takes_it_once_that_one_took_another():
    """a1 and b0 (their EVALs a hair faster) are asked before a0, which holds both ready
    tasks' input and so finishes either soonest: both leave them to it; it takes one, and a1,
    its neighbour, then takes the other in the same pass (not after a0's next answer)."""
    names = {"a0": "hosta", "a1": "hosta", "b0": "hostb"}
    pool = two_hosts(names, cores=3, speeds={"a1": 0.9999, "b0": 0.9999})
    pool.answer("a0", 1.0)
    assert sorted(pool.evals()) == ["a0", "a1"]


@pytest.mark.parametrize("seed", range(4))
def test_a_worker_that_left_one_requests_task_and_took_anothers_has_one_job(seed):
    """Two requests on three workers across a slow link, answered in a random order: a worker
    that leaves one request's task to its holder and takes another request's in the same
    pass gets no second job when the pass looks again at who left a task (``Pool.route``
    asserts one job per worker)."""
    rng = random.Random(seed)
    pool = two_hosts({"a0": "hosta", "b0": "hostb", "a1": "hosta"}, requests=2)
    pool.core.links.learn("hosta", [Fetched("tcp://hostb:1", 1 << 20, (1 << 20) / SLOW)])
    at = 0.0
    for _ in range(100):
        if not pool.jobs:
            break
        at += rng.random()
        pool.answer(rng.choice(sorted(pool.jobs)).decode(), at)
    assert pool.done == 2  # both requests ran to their end


def test_a_result_s_fetches_teach_the_link_and_the_speed_model_keeps_the_compute():
    pool = two_hosts({"a0": "hosta", "b0": "hostb"})
    (first,) = pool.evals()
    pool.answer(first, 1.0)
    other = next(name for name in pool.evals() if name != first)
    pool.answer(other, 2.5, fetched_s=0.5)  # 1.5 s seen from the broker, 0.5 s of it fetching
    bytes_s = pool.core.links.bytes_s("hosta", "hostb")
    assert bytes_s == pytest.approx(LATENT / (0.5 - LATENCY_S))
    assert pool.core.registry.workers[other.encode()].speed[(LATENT, 1)] == pytest.approx(1.0)


def test_holders_are_named_nearest_first():
    pool = two_hosts({"w1": "hostb", "w2": "hosta", "w3": "hosta"}, cores=3)
    session = next(iter(pool.core.sessions.values()))
    (ref,) = session.directory.record(Lineage(1000, 3, 0, (1,), X0), b"w1", LATENT)
    session.directory.copied(ref, b"w2")
    named = [h.endpoint for h in pool.core._holders(session, ref, worker=b"w3")]
    assert named == [pool.endpoints[b"w2"], pool.endpoints[b"w1"]]  # w2 shares w3's host


# -- the simulator: two hosts of four workers ---------------------------------------------------

FASTEST = RequestSpec(model="sim", steps=50, cores=8, stop="core-index:1")
HOSTS = ["a"] * 4 + ["b"] * 4


def _two_hosts(link_placement: bool, between_bytes_s: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
        return simulate(
            [0.1] * 8,
            FASTEST,
            hosts=HOSTS,
            latent_bytes=64 * 1024,
            between_bytes_s=between_bytes_s,
            link_placement=link_placement,
        )


def test_counting_the_links_moves_fewer_latents_between_hosts():
    """Against the broker before (``link_placement=False``: a chain stays while its holder is
    idle, the speed model has the fetches in it), 8 workers of 100 ms on two hosts: at 131 ms
    a latent between the hosts (more than an EVAL) the same evaluations run and at most three
    quarters as many latents cross; at 13 ms a latent no more cross and the makespan is at most
    1 % longer. (The simulator's figures: docs/architecture.md, "The links count".)"""
    blind, counted = _two_hosts(False, 0.5e6), _two_hosts(True, 0.5e6)
    assert counted.evaluations == blind.evaluations  # the same dataflow, whoever runs it
    assert counted.between_hosts <= blind.between_hosts * 0.75
    blind, counted = _two_hosts(False, 5e6), _two_hosts(True, 5e6)
    assert counted.between_hosts <= blind.between_hosts
    assert counted.done_s <= blind.done_s * 1.01


def test_on_one_host_the_links_cost_nothing_and_the_pool_keeps_its_critical_path():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = simulate([0.1] * 8, FASTEST, hosts=["a"] * 8, latent_bytes=64 * 1024)
    assert report.between_hosts == 0
    assert report.done_s < report.lower_bound_s * 1.05


def _blocks(speeds: list[float], latent_bytes: int, between_bytes_s: float, link_placement: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return simulate(
            speeds,
            FASTEST,
            hosts=HOSTS,
            latent_bytes=latent_bytes,
            between_bytes_s=between_bytes_s,
            link_placement=link_placement,
            chain=1,  # the placement of each step (chains keep a core on its worker either way)
        )


@pytest.mark.parametrize(
    ("speeds", "latent_bytes", "between_bytes_s", "most"),
    [  # a latent across: 131 ms, 13 ms, 1 ms; 134 ms on 7 fast workers and a 5x slower one
        ([0.1] * 8, 64 * 1024, 0.5e6, 6),  # measured: 2.230 s, 5 crossings (off: 2.629 s, 17)
        ([0.1] * 8, 64 * 1024, 5e6, 3),  # 1.731 s, 2 (1.815 s, 12)
        ([0.1] * 8, 64 * 1024, 64 * 1024 / 1e-3, 3),  # 1.709 s, 2 (1.718 s, 12)
        ([0.1] * 7 + [0.5], 1 << 20, 7.8e6, 4),  # 2.193 s, 3 (2.617 s, 17)
    ],
)
def test_cores_in_blocks_per_host_cross_less_and_finish_no_later(
    speeds, latent_bytes, between_bytes_s, most
):
    """A request's cores in contiguous blocks per host (``FairDispatcher._core_hosts``), the
    init chain's host first: only the boundary core reads across, and the init chain crosses
    once. Against the broker before, on two hosts of four, K=8 to the fastest core."""
    blind = _blocks(speeds, latent_bytes, between_bytes_s, False)
    counted = _blocks(speeds, latent_bytes, between_bytes_s, True)
    assert counted.evaluations == blind.evaluations
    assert counted.between_hosts <= most < blind.between_hosts
    assert counted.done_s <= blind.done_s
    if latent_bytes / between_bytes_s > 0.1:  # a latent across takes longer than an EVAL
        assert counted.done_s < blind.done_s * 0.9
