"""The worker registry: who is connected, what they serve, whether they are alive and busy.

Plain data owned by ``BrokerCore`` (no locks, no clock of its own: times come from the core's
injected clock). A worker is alive while it has been heard from within its liveness window. The
window is stretched while the worker is expected to be sending a large message, because its
heartbeats queue behind that message on the same connection. The broker also probes every
worker on a socket disconnect event, which catches a killed worker within milliseconds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chords_mq.wire import Kind

if TYPE_CHECKING:
    from chords_mq.algorithms.base import Ref, Task
    from chords_mq.broker.parts import HitStream
    from chords_mq.broker.session import PendingHit

# How far one higher EVAL time lifts a worker's best (``WorkerInfo.best``): 5 % of the way.
BEST_RISE = 0.05


@dataclass
class Job:
    """What one worker is doing for the broker, complete: its kind, its request, and exactly the
    tasks (with their attempts) or the decode it carries. An answer must match it."""

    kind: Kind  # PREPARE, EVAL or DECODE
    request: str
    worker: bytes
    sent_at: float
    tasks: list[tuple[Task, int]] = field(default_factory=list)  # EVAL: (task, attempt)
    decode: PendingHit | None = None  # DECODE
    initial: bool = False  # PREPARE: the first, whose answer starts the plan
    x0: bool = False  # PREPARE, initial: the worker sends x0's values (else its declaration)
    expected_bytes: int = 0  # how large the answer will be (0: small)
    expected_s: float | None = None  # EVAL: the worker's expected time for it (speed model)
    # EVAL on the data plane: bytes of the inputs its worker fetches from others (its deadline
    # allows for them at the transfer floor, as for a large answer: a shared link is slower)
    fetch_bytes: int = 0
    late: bool = False  # past its deadline: its tasks run elsewhere; the worker gets no work
    # EVAL: a chain (``Plan.follow``): its tasks run one after another, each answered by its
    # own RESULT; the job is then the tasks not answered yet (``expected_s`` theirs).
    chain: bool = False
    # EVAL on the data plane (issue 25): results its worker pushes, once kept, to the workers
    # that will read them (``FairDispatcher._push_to``), and inputs pushed to it (used in place
    # once there, else fetched)
    push: dict[Ref, tuple[bytes, ...]] = field(default_factory=dict)
    pushed: tuple[Ref, ...] = ()
    # DECODE that asked for the latent in pieces: what they must be, and how far they came
    # (``broker.parts``); each is checked and sent on to the client as it arrives
    stream: HitStream | None = None

    @property
    def task(self) -> int | None:
        """The id the answer's header carries: an EVAL's first task, a DECODE's id."""
        if self.tasks:
            return self.tasks[0][0].id
        if self.decode is not None:
            return self.decode.decode_id
        return None

    @property
    def attempt(self) -> int | None:
        return self.tasks[0][1] if self.tasks else None

    @property
    def key(self) -> tuple[str, int]:
        """What failures of this job are counted against: (kind, task or decode id)."""
        return (self.kind, self.task or 0)


@dataclass
class WorkerInfo:
    identity: bytes
    name: str
    model: str
    device: str
    dtype: str
    max_batch: int
    last_seen: float
    job: Job | None = None
    prepared: set[str] = field(default_factory=set)  # request ids with a cached context
    completed: int = 0
    # who it is: its CURVE key, or (insecure) the name and host its HELLO claims; its strikes,
    # quarantine and learnt speed follow this across reconnects (``Trust``, ``learnt``)
    principal: str = ""
    alias: str = ""  # the name clients see (never the routing id)
    quarantined_until: float = 0.0  # no work before this time (bad results)
    bad_results: int = 0
    # The speed model: an EMA of the seconds one EVAL takes, as the broker sees it (compute and
    # wire), per (latent bytes, tasks per EVAL).
    speed: dict[tuple[int, int], float] = field(default_factory=dict)
    # Its best EVAL time lately, per key: a new low at once, a higher time only by BEST_RISE of
    # the difference (a worker that really became slower is followed, slowly). Spikes (a
    # shared CPU, a task with more inputs) leave it; a slower device never reaches it. What
    # tells one speed class from another (``FairDispatcher._alike``).
    best: dict[tuple[int, int], float] = field(default_factory=dict)
    # The keys whose one cold EVAL (``ResultMessage.cold``) was left out of both: a worker's
    # first forward of a size is slower than the worker (allocations, on a GPU autotuning), and
    # judged by it alone a worker of the pool's one speed class looked slower, unbinding the
    # cores (``FairDispatcher._alike``). One per key: another claim is learnt as usual.
    cold: set[tuple[int, int]] = field(default_factory=set)
    # How many EVALs of each key it learnt from (cold ones not counted), up to 1000: a best of
    # one EVAL alone is judged more loosely (``FairDispatcher._alike``).
    seen: dict[tuple[int, int], int] = field(default_factory=dict)
    missed: int = 0  # deadlines missed in a row
    session: str = ""  # the worker's socket session (its HELLO says it)
    solver: str | None = None  # what it runs for its scheduler, as its HELLO says
    data: str | None = None  # its data endpoint, as its HELLO advertises it
    # its device kind and torch build (HELLO): a replica's worker shares it (``broker.verify``)
    device_class: str | None = None
    compares: bool = False  # its HELLO lists "compare": it answers COMPARE (across classes)
    probes: bool = False  # its HELLO lists "probe": it answers a probe (``broker.probes``)
    parts: bool = False  # its HELLO lists "parts": it sends a hit's latent in PARTs if asked

    @property
    def idle(self) -> bool:
        return self.job is None

    def quarantined(self, now: float) -> bool:
        return now < self.quarantined_until or (self.job is not None and self.job.late)

    def observe(
        self, key: tuple[int, int], seconds: float, alpha: float = 0.3, cold: bool = False
    ) -> None:
        """Learn that an EVAL of ``key`` took ``seconds``; a ``cold`` one (its worker's first
        of that size, as it says) teaches nothing, once per key (at most 64 keys)."""
        if cold and key not in self.cold and len(self.cold) < 64:
            self.cold.add(key)
            return
        old = self.speed.get(key)
        self.speed[key] = seconds if old is None else old + alpha * (seconds - old)
        best = self.best.get(key)
        self.best[key] = (
            seconds if best is None or seconds < best else best + BEST_RISE * (seconds - best)
        )
        self.seen[key] = min(self.seen.get(key, 0) + 1, 1000)
        for learnt in (self.speed, self.best, self.seen):
            while len(learnt) > 64:  # bounded: a few latent sizes per worker in practice
                learnt.pop(next(iter(learnt)))

    def free_at(self, now: float) -> float | None:
        """When this worker is expected to be free (now if idle); None if it is late."""
        if self.job is None:
            return now
        if self.job.late:
            return None
        if self.job.expected_s is None:
            return now
        return max(now, self.job.sent_at + self.job.expected_s)

    def state(self, now: float) -> str:
        if self.quarantined(now):
            return "quarantined"
        return "ready" if self.job is None else "busy"

    def summary(self, now: float, admin: bool = False) -> dict[str, Any]:
        """What STATUS shows: to an admin, the routing id and key too."""
        shown = {
            "name": self.name if admin else self.alias,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "solver": self.solver,
            "state": self.state(now),
            "busy": self.job is not None,
            "prepared": len(self.prepared),
            "completed": self.completed,
            "bad_results": self.bad_results,
            "expected_ms": {
                f"{size}x{batch}": round(seconds * 1000, 3)
                for (size, batch), seconds in self.speed.items()
            },
        }
        if admin:
            shown["principal"] = self.principal
            shown["data"] = self.data
        return shown


class WorkerRegistry:
    def __init__(
        self, timeout_s: float, transfer_floor_bytes_s: float = 100e6, remembered: int = 4096
    ) -> None:
        self.timeout_s = timeout_s
        self.transfer_floor_bytes_s = transfer_floor_bytes_s
        self.workers: dict[bytes, WorkerInfo] = {}
        self._aliases = 0
        # The learnt speeds of workers gone, by principal (with the model and device they were
        # learnt on), for a worker that comes back under it; at most ``remembered``, the
        # oldest forgotten first.
        self.remembered = remembered
        self._speeds: OrderedDict[str, tuple[str, str, dict[tuple[int, int], float]]] = (
            OrderedDict()
        )

    def new_alias(self) -> str:
        """The name clients see for a newly registered worker (never its routing id)."""
        self._aliases += 1
        return f"worker-{self._aliases}"

    def hello(self, info: WorkerInfo) -> WorkerInfo | None:
        """Register ``info``, with the speeds learnt under its principal before (if it has none
        of its own); returns the previous entry under the same identity, if any."""
        previous = self.workers.pop(info.identity, None)
        if previous is not None:
            self._remember(previous)
        if not info.speed:
            info.speed = self.learnt(info.principal, info.model, info.device)
            info.best = {**info.speed, **info.best}  # (its best since is lower, if anything)
        self.workers[info.identity] = info
        return previous

    def learnt(self, principal: str, model: str, device: str) -> dict[tuple[int, int], float]:
        """The speeds a worker gone learnt under ``principal`` (for the same model on the same
        device): where a worker that comes back under it starts."""
        kept = self._speeds.pop(principal, None)
        if kept is None or kept[:2] != (model, device):
            return {}
        return kept[2]

    def _remember(self, worker: WorkerInfo) -> None:
        if not worker.speed or not worker.principal:
            return
        self._speeds[worker.principal] = (worker.model, worker.device, dict(worker.speed))
        self._speeds.move_to_end(worker.principal)
        while len(self._speeds) > self.remembered:
            self._speeds.popitem(last=False)

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def by_data(self, endpoint: str | None) -> WorkerInfo | None:
        """The worker whose data endpoint is ``endpoint``, if one is registered."""
        if endpoint is None:
            return None
        return next((w for w in self.workers.values() if w.data == endpoint), None)

    def remove(self, identity: bytes) -> WorkerInfo | None:
        worker = self.workers.pop(identity, None)
        if worker is not None:
            self._remember(worker)
        return worker

    def allowance(self, worker: WorkerInfo) -> float:
        """How long ``worker`` may be silent: the liveness window, plus the time its answer
        takes to arrive at the slowest transfer rate we allow for."""
        pending = worker.job.expected_bytes if worker.job is not None else 0
        return self.timeout_s + pending / self.transfer_floor_bytes_s

    def expired(self, now: float) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if now - w.last_seen > self.allowance(w)]

    def serving(self, model: str, now: float) -> list[WorkerInfo]:
        """Workers of ``model`` that may get work (not quarantined)."""
        return [w for w in self.workers.values() if w.model == model and now >= w.quarantined_until]

    def answering(self, identity: bytes, since: float, now: float, ceiling_s: float) -> bool:
        """May a side job sent to ``identity`` at ``since`` (a COMPARE, a probe) still be
        answered: the worker is still here, neither quarantined nor late, and within
        ``ceiling_s`` of sending it."""
        worker = self.workers.get(identity)
        return worker is not None and not worker.quarantined(now) and now - since <= ceiling_s

    def expected(self, worker: WorkerInfo, key: tuple[int, int]) -> float | None:
        """``worker``'s expected seconds for an EVAL of ``key``: its own estimate, else the
        median of the other workers of its model (a new worker starts there), else None."""
        own = worker.speed.get(key)
        if own is not None:
            return own
        others = sorted(
            w.speed[key]
            for w in self.workers.values()
            if w.model == worker.model and key in w.speed
        )
        return others[len(others) // 2] if others else None

    def idle(self, now: float) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.job is None and now >= w.quarantined_until]
