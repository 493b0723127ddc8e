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
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.request import RequestSpec
from chords_mq.solvers import solve_targets, solver_spec, unit_euler
from chords_mq.wire import (
    PROTOCOL_VERSION,
    Message,
    ResultEntry,
    eval_entries,
    result_message,
    solver_tensors,
    tensor_digest,
)

MODEL = "sim"
CLIENT = b"simulated-client"


def _velocity(x: torch.Tensor, step: int) -> torch.Tensor:
    return torch.tanh(x) * (1 + step) * 0.01 - 0.1 * x


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


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    speeds: Sequence[float],
    spec: RequestSpec,
    policy: str = "eft",
    warmup: bool = True,
    limit: int = 200_000,
    overhead_s: float = 0.0,
    jitter: float = 0.0,
    seed: int = 0,
) -> SimReport:
    """Run ``spec`` on workers whose EVALs take ``speeds`` seconds each; see the module doc.
    ``warmup`` first runs a short request so the speed model knows every worker.
    ``overhead_s`` is added to every EVAL: the broker-to-worker round trip of the transport
    (``benchmarks/mixed_pool.py`` measures it on a worker whose forward takes no time).
    ``seed`` other than 0 shuffles the order the workers register in, which decides ties: who
    is idle first, who is asked to prepare. FIFO placement depends on it (a slow worker asked
    first holds critical tasks), and in a real pool it is set by timing; run several seeds to
    see the spread. ``jitter`` makes each EVAL take up to that fraction longer, at random."""
    if policy not in ("eft", "fifo"):
        raise ValueError(f"policy must be eft or fifo, got {policy!r}")
    clock = _Clock()
    config = BrokerConfig(
        heartbeat_s=1e9, worker_timeout_s=1e9, deadline_floor_s=0.0, placement=policy
    )
    core = BrokerCore(config, clock=clock, epoch=1)
    workers = [f"sim/{i}".encode() for i in range(len(speeds))]
    speed = {identity: seconds + overhead_s for identity, seconds in zip(workers, speeds)}
    rng = random.Random(seed)
    hello = list(workers)
    if seed:
        rng.shuffle(hello)  # which worker registers (so: is idle, is asked) first
    noise = (lambda: 1.0 + jitter * rng.random()) if jitter else (lambda: 1.0)
    for identity in hello:
        body = {
            "worker": identity.decode(),
            "model": MODEL,
            "device": "sim",
            "dtype": "float32",
            "max_batch": 1,
            "version": "sim",
            "protocol": PROTOCOL_VERSION,
        }
        core.worker_message(identity, Message("HELLO", body, epoch=core.epoch))
    spec = replace(spec, model=MODEL)
    if warmup and policy == "eft":
        warm = RequestSpec(model=MODEL, steps=4 * len(speeds), cores=len(speeds), seed=1)
        _run(core, "warm", warm, speed, clock, limit, noise)
    started = clock.now
    counts_before = {w: core.registry.workers[w].completed for w in workers}
    first, done, evaluations, critical = _run(core, "run", spec, speed, clock, limit, noise)
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
    )


def _run(
    core: BrokerCore,
    request: str,
    spec: RequestSpec,
    speed: dict[bytes, float],
    clock: _Clock,
    limit: int,
    noise: Callable[[], float],
) -> tuple[float, float, int, int]:
    """Submit ``spec`` and serve it to DONE; (first hit time, DONE time, evaluations, the
    returned hit's round)."""
    message = Message("SUBMIT", {"request": spec.to_dict()}, request=request, epoch=core.epoch)
    replies = core.client_message(CLIENT, message)
    pending = _route(core, replies, speed, clock, noise)
    first = done = None
    evaluations = rounds = 0
    for _ in range(limit):
        for reply in pending.client:
            if reply.request != request:
                continue
            if reply.kind == "HIT" and first is None:
                first = clock.now
            elif reply.kind == "DONE":
                done = clock.now
                stats = reply.body["stats"]
                evaluations = int(stats["evaluations"])
                rounds = int((stats.get("returned") or {}).get("round", 0))
            elif reply.kind == "ERROR":
                raise RuntimeError(f"simulated request failed: {reply.body}")
        pending.client.clear()
        if done is not None:
            assert first is not None
            return first, done, evaluations, rounds
        if not pending.jobs:
            raise RuntimeError("the simulated pool stalled: no job in flight and no DONE")
        finish, identity, job = min(pending.jobs, key=lambda item: (item[0], item[1]))
        pending.jobs.remove((finish, identity, job))
        clock.now = max(clock.now, finish)
        answered = core.worker_message(identity, _answer(job))
        _merge(pending, _route(core, answered, speed, clock, noise))
        _merge(pending, _route(core, core.tick(clock.now), speed, clock, noise))
    raise RuntimeError(f"the simulated request did not finish in {limit} events")


@dataclass
class _Pending:
    jobs: list[tuple[float, bytes, Message]] = field(default_factory=list)
    client: list[Message] = field(default_factory=list)


def _merge(into: _Pending, more: _Pending) -> None:
    into.jobs.extend(more.jobs)
    into.client.extend(more.client)


def _route(
    core: BrokerCore,
    sends: list[Send],
    speed: dict[bytes, float],
    clock: _Clock,
    noise: Callable[[], float],
) -> _Pending:
    pending = _Pending()
    for send in sends:
        if send.to == "client":
            pending.client.append(send.message)
            continue
        kind = send.message.kind
        if kind in ("PREPARE", "EVAL"):
            cost = speed[send.identity] * noise() if kind == "EVAL" else 0.0
            pending.jobs.append((clock.now + cost, send.identity, send.message))
        elif kind == "RELEASE":
            pending.jobs[:] = [
                job
                for job in pending.jobs
                if not (job[1] == send.identity and job[2].request == send.message.request)
            ]
    return pending


def _answer(job: Message) -> Message:
    """What an honest worker answers to a PREPARE or an EVAL."""
    if job.kind == "PREPARE":
        fields, tensors = solver_spec(unit_euler)
        frames = solver_tensors(tensors)
        x0 = torch.linspace(-1, 1, 4)
        if job.body.get("initial"):
            frames["x0"] = x0
        reply = Message("PREPARED", {"solver": fields, "x0_digest": tensor_digest(x0)}, frames)
    else:
        entries = []
        for entry, latent in eval_entries(job):
            out = _velocity(latent, entry.step)
            results = solve_targets(unit_euler, latent, out, entry.step, entry.targets)
            entries.append(ResultEntry(entry.task, entry.attempt, results))
        reply = result_message(entries, compute_s=0.0)
    reply.epoch, reply.request, reply.task, reply.attempt = (
        job.epoch,
        job.request,
        job.task,
        job.attempt,
    )
    return reply
