"""A discrete-event run of requests on a pool of given speeds, with no processes and no sockets.

The real ``BrokerCore`` makes every decision; only the workers are simulated: each EVAL takes its
worker a fixed number of seconds of fake time, and the answer that would arrive first is handed
to the core first. So placement policies are compared on the code that runs in production, in
milliseconds per pool. Latents are 4 floats with a cheap analytic velocity: the plan's dataflow
and the broker's choices are real, the numbers are not a model's.

    from chords_mq.broker.simulate import simulate
    report = simulate([0.03] * 7 + [0.15], RequestSpec(model="sim", steps=50, cores=8, ...))
    report.first_hit_s, report.lower_bound_s, report.barrier_s

``policy="fifo"`` turns the speed model off (every ready task goes to whichever worker is idle),
as the broker did before placement by earliest finish time.

With ``hosts`` (one name per worker) the request runs on the data plane: honest workers keep
their results (``HonestPool``), an input held elsewhere is fetched before the EVAL's compute at
``between_bytes_s`` from another host or ``within_bytes_s`` within one (plus ``latency_s``),
each RESULT reports its fetches (so the broker learns the links), and the report counts the
latents moved between and within hosts. A result an EVAL pushes (``EvalMessage.push``) leaves
when its EVAL ends and arrives a transfer later; the EVAL reading it waits only for what is
left of that transfer. ``latent_bytes`` sizes the latents (float32).
``link_placement=False`` is the broker before the links counted (a core's chain stays on its
worker only while that one is idle, the speed model has the fetches in it), for comparison.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from chords_mq.algorithms.base import Ref
from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.broker.testing import FakeClock, HonestPool, honest_answer
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    PROTOCOL_VERSION,
    DoneMessage,
    ErrorMessage,
    EvalMessage,
    HelloMessage,
    HitMessage,
    Kind,
    Message,
    ResultMessage,
    SubmitMessage,
)
from chords_mq.wire.named import Fetched

MODEL = "sim"
CLIENT = b"simulated-client"


@dataclass
class SimReport:
    speeds: list[float]
    policy: str
    first_hit_s: float  # the first hit's time
    done_s: float  # the request's DONE: with a stop rule, when the returned hit arrived
    evaluations: int
    per_worker: list[int] = field(default_factory=list)  # EVALs each worker ran
    critical_rounds: int = 0  # the returned hit's round: its chain of evaluations
    lower_bound_s: float = 0.0
    barrier_s: float = 0.0
    between_hosts: int = 0  # latents fetched from (or pushed to) a worker on another host
    within_host: int = 0  # latents fetched from another worker of the same host
    pushed: int = 0  # of those, pushed (with ``hosts``)
    pushed_read: int = 0  # pushed copies an EVAL read


@dataclass
class _Pool:
    """The simulated workers: each one's EVAL time, and on the data plane their results
    (``pool``), endpoints, hosts and the links between them."""

    speed: dict[bytes, float]
    noise: Callable[[], float]
    pool: HonestPool | None = None
    endpoint: dict[bytes, str] = field(default_factory=dict)
    host: dict[str, str] = field(default_factory=dict)  # by endpoint
    between_bytes_s: float = 125e6
    within_bytes_s: float = 2e9
    latency_s: float = 5e-4
    moved: list[int] = field(default_factory=lambda: [0, 0])  # latents [between, within] hosts
    # each pushed copy: (the reader's endpoint, request, ref) -> (its producer's, arrival time)
    arrives: dict[tuple[str, str, Ref], tuple[str, float]] = field(default_factory=dict)
    pushed: list[int] = field(default_factory=lambda: [0, 0])  # [pushed, read]
    # each worker's first EVAL takes this much longer; its RESULT says cold if ``say_cold``
    cold: dict[bytes, float] = field(default_factory=dict)
    say_cold: bool = True

    def seconds(self, source: str, target: str, nbytes: int) -> float:
        same = self.host[source] == self.host[target]
        return self.latency_s + nbytes / (self.within_bytes_s if same else self.between_bytes_s)

    def answer(
        self, identity: bytes, job: Message, start: float = 0.0
    ) -> tuple[float, Message | None]:
        """The seconds ``job`` takes ``identity`` and its answer (computed now, delivered
        then); off the data plane, the answer is computed when it is delivered (None).
        ``start``: when the job starts (the time its pushes leave and arrive from)."""
        cost = self.speed[identity] * self.noise() if job.kind is Kind.EVAL else 0.0
        extra = self.cold.pop(identity, None) if job.kind is Kind.EVAL else None
        if extra is not None:
            cost += extra
        if self.pool is None:
            return cost, None
        endpoint = self.endpoint[identity]
        before = len(self.pool.transfers)
        pushes, reads = len(self.pool.pushes), len(self.pool.used_pushes)
        reply = self.pool.answer(job, endpoint)
        fetched = []
        waited = 0.0
        for source, _, nbytes in self.pool.transfers[before:]:
            same = self.host[source] == self.host[endpoint]
            seconds = self.seconds(source, endpoint, nbytes)
            fetched.append(Fetched(source, nbytes, seconds))
            self.moved[1 if same else 0] += 1
            waited += seconds  # a worker fetches its inputs one after another, then computes
        for reader, request, ref in self.pool.used_pushes[reads:]:  # what is left of a push
            source, arrival = self.arrives.pop((reader, request, ref), (reader, start))
            left = max(0.0, arrival - (start + waited))
            fetched.append(Fetched(source, 0, left))  # a wait, as a worker reports it
            waited += left
            self.pushed[1] += 1
        cost += waited
        for source, target, request, ref, nbytes in self.pool.pushes[pushes:]:
            arrival = start + cost + self.seconds(source, target, nbytes)
            self.arrives[(target, request, ref)] = (source, arrival)
            self.moved[0 if self.host[source] != self.host[target] else 1] += 1
            self.pushed[0] += 1
        if isinstance(reply, ResultMessage) and fetched:
            reply = replace(reply, fetched=tuple(fetched))
        if isinstance(reply, ResultMessage) and extra is not None and self.say_cold:
            reply = replace(reply, cold=True)
        return cost, reply


def simulate(
    speeds: Sequence[float],
    spec: RequestSpec,
    policy: str = "eft",
    warmup: bool = True,
    limit: int = 200_000,
    overhead_s: float = 0.0,
    jitter: float = 0.0,
    seed: int = 0,
    hosts: Sequence[str] | None = None,
    latent_bytes: int = 16,
    between_bytes_s: float = 125e6,
    within_bytes_s: float = 2e9,
    latency_s: float = 5e-4,
    link_placement: bool = True,
    chain: int = BrokerConfig.chain,
    push: bool = BrokerConfig.push,
    push_local: bool = BrokerConfig.push_local,
    cold: Sequence[float] | None = None,
    say_cold: bool = True,
) -> SimReport:
    """Run ``spec`` on workers whose EVALs take ``speeds`` seconds each; see the module doc.
    ``warmup`` first runs a short request so the speed model knows every worker.
    ``overhead_s`` is added to every EVAL: the broker-to-worker round trip of the transport
    (``benchmarks/mixed_pool.py`` measures it on a worker whose forward takes no time).
    ``seed`` other than 0 shuffles the order the workers register in, which decides ties: who
    is idle first, who is asked to prepare. FIFO placement depends on it (a slow worker asked
    first holds critical tasks), and in a real pool it is set by timing; run several seeds to
    see the spread. ``jitter`` makes each EVAL take up to that fraction longer, at random.
    ``chain``: the broker's ``--chain`` (on the data plane: a core's steps in a row);
    ``push``: its ``--push`` (on the data plane: results pushed to their readers' workers);
    ``push_local``: its ``--push-local`` (to readers on the producer's host too).
    ``cold`` (with ``hosts``): per worker, the seconds its first EVAL (of the measured request,
    after any warm-up) takes longer, as a real worker's first forward of a size does; its RESULT
    says so (``ResultMessage.cold``) unless ``say_cold`` is False (a worker before that field)."""
    if policy != "eft" and policy != "fifo":
        raise ValueError(f"policy must be eft or fifo, got {policy!r}")
    if hosts is not None and len(hosts) != len(speeds):
        raise ValueError(f"{len(hosts)} hosts for {len(speeds)} workers")
    if cold is not None and (hosts is None or len(cold) != len(speeds)):
        raise ValueError(f"cold: one time per worker ({len(speeds)}), with hosts")
    clock = FakeClock()
    config = BrokerConfig(
        heartbeat_s=1e9,
        worker_timeout_s=1e9,
        deadline_floor_s=0.0,
        placement="eft" if policy == "eft" else "fifo",
        data_plane=hosts is not None,
        link_placement=link_placement,
        chain=chain,
        push=push,
        push_local=push_local,
        verify="off",  # placement alone: verification's replicas (broker.verify) are not simulated
    )
    core = BrokerCore(config, clock=clock, epoch=1)
    workers = [f"sim/{i}".encode() for i in range(len(speeds))]
    speed = {identity: seconds + overhead_s for identity, seconds in zip(workers, speeds)}
    rng = random.Random(seed)
    hello = list(workers)
    if seed:
        rng.shuffle(hello)  # which worker registers (so: is idle, is asked) first
    noise = (lambda: 1.0 + jitter * rng.random()) if jitter else (lambda: 1.0)
    sim = _Pool(speed, noise, None, {}, {}, between_bytes_s, within_bytes_s, latency_s)
    if hosts is not None:
        sim.pool = HonestPool(torch.linspace(-1, 1, max(1, latent_bytes // 4)))
        for i, (identity, host) in enumerate(zip(workers, hosts)):
            sim.endpoint[identity] = f"tcp://{host}:{5600 + i}"
            sim.host[sim.endpoint[identity]] = host
    for identity in hello:
        hello_message = HelloMessage(
            worker=identity.decode(),
            model=MODEL,
            device="sim",
            dtype="float32",
            max_batch=1,
            version="sim",
            protocol=PROTOCOL_VERSION,
            epoch=core.epoch,
            data=sim.endpoint.get(identity),
        )
        core.worker_message(identity, hello_message)
    spec = replace(spec, model=MODEL)
    if warmup and policy == "eft":
        warm = RequestSpec(model=MODEL, steps=4 * len(speeds), cores=len(speeds), seed=1)
        _run(core, "warm", warm, sim, clock, limit)
    sim.say_cold = say_cold
    if cold is not None:  # (after the warm-up: what the measured request's first EVALs cost)
        sim.cold = {identity: extra for identity, extra in zip(workers, cold) if extra > 0}
    started = clock.now
    sim.moved = [0, 0]
    sim.pushed = [0, 0]
    counts_before = {w: core.registry.workers[w].completed for w in workers}
    first, done, evaluations, critical = _run(core, "run", spec, sim, clock, limit)
    per_worker = [core.registry.workers[w].completed - counts_before[w] for w in workers]
    fastest = min(speed.values())
    throughput = sum(1.0 / s for s in speed.values())
    return SimReport(
        speeds=list(speeds),
        policy=policy,
        first_hit_s=first - started,
        done_s=done - started,
        evaluations=evaluations,
        per_worker=per_worker,
        critical_rounds=critical,
        lower_bound_s=max(critical * fastest, evaluations / throughput),
        barrier_s=critical * max(speed.values()),
        between_hosts=sim.moved[0],
        within_host=sim.moved[1],
        pushed=sim.pushed[0],
        pushed_read=sim.pushed[1],
    )


def _run(
    core: BrokerCore,
    request: str,
    spec: RequestSpec,
    sim: _Pool,
    clock: FakeClock,
    limit: int,
) -> tuple[float, float, int, int]:
    """Submit ``spec`` and serve it to DONE; (first hit time, DONE time, evaluations, the
    returned hit's round)."""
    message = SubmitMessage(spec=spec.to_dict(), request=request, epoch=core.epoch)
    replies = core.client_message(CLIENT, message)
    pending = _route(core, replies, sim, clock)
    first = done = None
    evaluations = rounds = 0
    for _ in range(limit):
        for reply in pending.client:
            if reply.request != request:
                continue
            if isinstance(reply, HitMessage) and first is None:
                first = clock.now
            elif isinstance(reply, DoneMessage):
                done = clock.now
                evaluations = int(reply.stats["evaluations"])
                rounds = int((reply.stats.get("returned") or {}).get("round", 0))
            elif isinstance(reply, ErrorMessage):
                raise RuntimeError(f"simulated request failed: {reply.code}: {reply.message}")
        pending.client.clear()
        if done is not None:
            assert first is not None
            return first, done, evaluations, rounds
        if not pending.jobs:
            raise RuntimeError("the simulated pool stalled: no job in flight and no DONE")
        finish, identity, job, ready = min(pending.jobs, key=lambda item: (item[0], item[1]))
        pending.jobs.remove((finish, identity, job, ready))
        clock.now = max(clock.now, finish)
        answered = core.worker_message(identity, ready or honest_answer(job))
        _merge(pending, _route(core, answered, sim, clock))
        _merge(pending, _route(core, core.tick(clock.now), sim, clock))
    raise RuntimeError(f"the simulated request did not finish in {limit} events")


@dataclass
class _Pending:
    # (when it answers, the worker, the job, its answer if computed when it was sent)
    jobs: list[tuple[float, bytes, Message, Message | None]] = field(default_factory=list)
    client: list[Message] = field(default_factory=list)


def _merge(into: _Pending, more: _Pending) -> None:
    into.jobs.extend(more.jobs)
    into.client.extend(more.client)


def _route(core: BrokerCore, sends: list[Send], sim: _Pool, clock: FakeClock) -> _Pending:
    pending = _Pending()
    for send in sends:
        if send.to == "client":
            pending.client.append(send.message)
            continue
        kind = send.message.kind
        if isinstance(send.message, EvalMessage) and send.message.chain:
            finish = clock.now  # a chain: its steps one after another, each answered at its end
            for step in send.message.steps():
                cost, reply = sim.answer(send.identity, step, finish)
                finish += cost
                pending.jobs.append((finish, send.identity, step, reply))
        elif kind in (Kind.PREPARE, Kind.EVAL) or (kind is Kind.DECODE and sim.pool is not None):
            cost, reply = sim.answer(send.identity, send.message, clock.now)
            pending.jobs.append((clock.now + cost, send.identity, send.message, reply))
        elif kind in (Kind.DROP, Kind.RELEASE) and sim.pool is not None:
            sim.pool.answer(send.message, sim.endpoint[send.identity])
        if kind is Kind.RELEASE:
            pending.jobs[:] = [
                job
                for job in pending.jobs
                if not (job[1] == send.identity and job[2].request == send.message.request)
            ]
    return pending
