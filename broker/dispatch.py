"""Which work goes to which idle worker: fair across requests, prepared workers first.

Pure decision-making over the registry and the sessions; ``BrokerCore`` sends what it decides.
``assign`` returns complete jobs: each names its kind, its worker and exactly the tasks (or the
decode) it popped from its session, so nothing downstream re-derives a count. Each idle worker
takes the next session in round-robin order that has a hit to decode or a task to run and for
which it is already prepared; failing that, it is prepared for a session that needs one more
worker (at most as many workers as the request has cores). On the data plane a task's inputs
have holders, and moving one costs its transfer (``broker.links``): a worker leaves a task to
another that would finish it sooner, counting each input's transfer (``_nearby``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from chords_mq.algorithms.base import Hit, Latent, Ref, Task, refs_of
from chords_mq.broker.bindings import Bindings
from chords_mq.broker.links import Links, host_of
from chords_mq.broker.placement import (
    MOVE_EVALS,
    SLOWER_RATIO,
    Schedule,
    bind_cores,
    speed_classes,
)
from chords_mq.broker.registry import Job, WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.broker.speeds import SpeedPolicy
from chords_mq.wire import DEFAULT_LIMITS, MAX_TASKS, Kind
from chords_mq.wire.named import MAX_PUSH_TO, MAX_PUSHES

# ``--push-local`` pushes results of at most this size within a host: there a fetch's round
# trip (1.4 ms at the median, 8 workers on 2 cores) is what a reader waits for, not the bytes;
# a bigger copy pushed to a reader that then runs elsewhere costs more than it saves (16 MiB:
# 13 to 18 of 19 pushes read, the CHORDS ratio 0.48 to 0.61 against 0.63 to 0.67 without).
PUSH_LOCAL_MAX_BYTES = 1 << 20

log = logging.getLogger("chords.broker")

# The size of an answer we cannot predict (an initial latent, decoded media): at most one frame.
UNKNOWN_ANSWER_BYTES = DEFAULT_LIMITS.max_frame_bytes
# A request's cores are kept in blocks per host (``_core_hosts``) unless moving one latent
# between two hosts takes longer than this many EVALs: then the transfers decide alone.
BLOCK_EVALS = 4.0
# A worker whose best EVAL time comes from one EVAL alone is of a slower class only past this
# ratio to the fastest (SLOWER_RATIO once a second EVAL confirms it): ``_alike``.
LONE_RATIO = 2 * SLOWER_RATIO


@dataclass(frozen=True)
class CoreLayout:
    """Where a request's cores belong (``FairDispatcher._layout``), for its prepared workers:
    the init chain's host and worker, each core's host (blocks; empty on one host) and the
    worker each core's chain is bound to."""

    prepared: frozenset[bytes]
    start: str
    first: bytes
    hosts: dict[int, str]
    workers: dict[int, bytes]


class FairDispatcher:
    def __init__(
        self,
        registry: WorkerRegistry | None = None,
        bindings: Bindings | None = None,
        links: Links | None = None,
    ) -> None:
        self._turn = 0
        self._idle: set[bytes] = set()
        self._deferred: list[WorkerInfo] = []  # left every task to a worker finishing it sooner
        # placement by learnt speeds (over ``registry``); None: plain FIFO placement
        self.speeds = None if registry is None else SpeedPolicy(registry)
        self.bindings = bindings if bindings is not None else Bindings(WorkerRegistry(0.0))
        # The links' costs (with the speed model): a task goes where it finishes soonest,
        # transfers counted. None: a core's chain stays on its worker while that one is idle.
        self.links = links if registry is not None else None
        # by session: the host and the worker of each of its cores (``_layout``)
        self._blocks: dict[str, CoreLayout] = {}
        self._unbound: set[str] = set()  # sessions whose unbinding was logged (``_say_unbound``)
        # The most steps of one core an EVAL carries (``BrokerConfig.chain``; 1: no chains).
        self.chain = 1
        self.push = True  # ``BrokerConfig.push``: results pushed to their readers (``_push_to``)
        self.push_local = True  # ``BrokerConfig.push_local``: to readers on the same host too
        self._running: dict[str, int] = {}  # this pass: requests running, by model

    def assign(
        self, idle: list[WorkerInfo], sessions: list[RequestSession], now: float
    ) -> list[Job]:
        """Jobs for the currently idle workers, their tasks already taken from the sessions."""
        jobs: list[Job] = []
        count = len(sessions)
        if count == 0:
            return jobs
        if self.speeds is not None:  # the fastest first: they get prepared and served first
            idle = sorted(idle, key=SpeedPolicy.pace)
        self._running = {}
        for session in sessions:
            self._running[session.model] = self._running.get(session.model, 0) + 1
        self._waited: dict[str, list[WorkerInfo]] = {}
        self._planned: dict[str, Schedule | None] = {}  # this pass's ``_schedule`` by session
        active = {session.id for session in sessions}
        for gone in self._blocks.keys() - active:
            del self._blocks[gone]
        self._unbound &= active
        self._idle = {worker.identity for worker in idle}  # not yet given a job this pass
        if self.speeds is not None:  # found once per pass, not per worker
            self.speeds.stale = [
                w
                for w in self.speeds.registry.workers.values()
                if w.job is not None and w.job.request not in active
            ]
        self._deferred = []
        for worker in idle:
            turn = self._turn % count
            order = sessions[turn:] + sessions[:turn] if turn else sessions
            faster_soon = None if self.speeds is None else self.speeds.faster_soon
            job = self._decode(worker, order, now)
            # A request that no worker serves yet comes before the next step of one served:
            # with fewer workers than requests, the served ones always have a step ready.
            unserved = [s for s in order if not s.prepared and not s.preparing]
            if job is None and unserved:
                job = self._prepare(worker, unserved, now, faster_soon)
            job = job or self._eval(worker, order, now)
            job = job or self._prepare(worker, order, now, faster_soon)
            if job is not None:
                self._give(worker, job, jobs, sessions, order)
            elif worker not in self._deferred:
                self._unblock(worker, sessions, now, jobs)
        if self._deferred:
            # Who left a task to an idle worker that took another: once more, waiting only for
            # busy workers (they answer, and dispatch runs again), never for an idle one.
            deferred, self._deferred, self._idle = self._deferred, [], set()
            for worker in deferred:
                turn = self._turn % count
                order = sessions[turn:] + sessions[:turn] if turn else sessions
                job = self._eval(worker, order, now)
                if job is not None:
                    self._give(worker, job, jobs, sessions, order)
                else:
                    self._unblock(worker, sessions, now, jobs)
        return jobs

    def _give(
        self,
        worker: WorkerInfo,
        job: Job,
        jobs: list[Job],
        sessions: list[RequestSession],
        order: list[RequestSession],
    ) -> None:
        self._idle.discard(worker.identity)
        if worker in self._deferred:  # it left one request's tasks and took another's
            self._deferred.remove(worker)
        worker.job = job
        jobs.append(job)
        chosen = next(s for s in order if s.id == job.request)
        self._turn = (sessions.index(chosen) + 1) % len(sessions)

    def _unblock(
        self, worker: WorkerInfo, sessions: list[RequestSession], now: float, jobs: list[Job]
    ) -> None:
        """A worker that waited for faster ones stays idle only while one of them is working
        on the request: with nobody of it busy, no answer would come to dispatch again."""
        for session in sessions:
            if worker not in self._waited.get(session.id, []) or session.dispatchable() == 0:
                continue
            if any(self._working(identity, session) for identity in session.prepared):
                continue
            key = (session.latent_bytes, 1)
            speeds = self.speeds
            expected = None if speeds is None else speeds.registry.expected(worker, key)
            job = self._take_eval(worker, session, 1, now, expected)
            worker.job = job
            jobs.append(job)
            return

    def _working(self, identity: bytes, session: RequestSession) -> bool:
        other = None if self.speeds is None else self.speeds.registry.get(identity)
        return bool(other and other.job is not None and not other.job.late)

    def _decode(self, worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        """Decoding a released hit comes first: users wait for it."""
        for session in order:
            if session.model == worker.model and worker.identity in session.prepared:
                ready: Callable[[Hit], bool] | None = session.decodable if session.named else None
                if ready is not None and self.links is not None:
                    ready = self._decodes_near(worker, session, ready)
                serial = session.hits_one_at_a_time
                pending = session.media.next_decode(worker.identity, ready, serial)
                if pending is not None:
                    return Job(
                        Kind.DECODE,
                        session.id,
                        worker.identity,
                        now,
                        decode=pending,
                        expected_bytes=UNKNOWN_ANSWER_BYTES,
                    )
        return None

    def _eval(self, worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        for session in order:
            if session.model != worker.model or worker.identity not in session.prepared:
                continue
            replica = self._replica(worker, session, now, urgent=True)
            if replica is not None:  # a chain waits for it
                return replica
            ready = session.dispatchable()
            if ready == 0:
                continue
            if session.tasks.avoid is not None and not session.tasks.may_take(
                None, worker=worker.identity
            ):
                continue  # every ready task recomputes what this worker was accused of serving
            # One EVAL takes up to spec.batch tasks (1 unless the request opted in).
            count = min(session.spec.batch, worker.max_batch, ready)
            key = (session.latent_bytes, count)
            speeds = self.speeds
            mine = None if speeds is None else speeds.registry.expected(worker, key)
            schedule = None
            if speeds is not None and count == 1:
                if session.id not in self._planned:
                    self._planned[session.id] = speeds.schedule(session, key, now)
                schedule = self._planned[session.id]
            if self.links is None:
                local = self._local(worker, session)
            else:
                local = self._nearby(worker, session, now, mine)
            # every ready task finishes sooner elsewhere, transfers counted: leave them
            elsewhere = local is not None and not session.tasks.may_take(
                local, worker=worker.identity
            )
            if speeds is None or mine is None:  # FIFO, or a worker of unknown speed
                if elsewhere:
                    self._defer(worker)
                    continue
                return self._take_eval(worker, session, count, now, mine, allowed=local)
            if schedule is not None:
                allowed = speeds.allows(schedule, worker, session, mine, now)
                # every ready task is for a faster worker
                if not session.tasks.may_take(allowed, worker=worker.identity):
                    self._waited.setdefault(session.id, []).append(worker)
                    continue
                if local is not None:
                    both = _both(allowed, local)
                    if session.tasks.may_take(both, worker=worker.identity):
                        allowed = both
                    elif self.links is not None and elsewhere:
                        # every ready task finishes sooner elsewhere, transfers counted
                        self._defer(worker)
                        continue
                # (no chain: the schedule places each step, and may move a core between classes)
                return self._take_eval(
                    worker, session, count, now, mine, allowed=allowed, chain=False
                )
            slack = speeds.slower(worker, session, key, now, mine)
            demand = ready
            if slack:  # each fast answer readies a successor meanwhile
                demand = ready * max(1, math.ceil(mine / speeds.fastest(session, key, now)))
            if speeds.others_first(worker, session, key, demand, now, mine):
                self._waited.setdefault(session.id, []).append(worker)
                continue  # faster workers finish every ready task before this one would
            if elsewhere:
                self._defer(worker)
                continue
            return self._take_eval(
                worker, session, count, now, mine, slack, allowed=local, chain=not slack
            )
        if worker in getattr(self, "_deferred", ()):  # it left a task to another: it waits
            return None
        for session in order:  # nothing else for it: a replica that checks a sampled result
            if session.model == worker.model and worker.identity in session.prepared:
                replica = self._replica(worker, session, now, urgent=False)
                if replica is not None:
                    return replica
        return None

    def _replica(
        self, worker: WorkerInfo, session: RequestSession, now: float, urgent: bool
    ) -> Job | None:
        """An EVAL of one replica (``broker.verify``) ``worker`` may run (another principal
        than the task's answers, the same device class): ``urgent``, of a held result (its
        chain waits), else of a sampled one."""
        checks = session.verifying
        if not checks.replicas:
            return None
        fits = checks.fits(worker)
        wanted = lambda task: fits(task) and checks.urgent(task) == urgent  # noqa: E731
        if not session.tasks.may_take(wanted, spare=True):
            return None
        taken = session.tasks.take(worker.identity, 1, allowed=wanted, spare=True)
        key = (session.latent_bytes, 1)
        expected = None if self.speeds is None else self.speeds.registry.expected(worker, key)
        # (its expected time is the computation's alone: its inputs' transfers are not added)
        return self._eval_job(worker, session, now, taken, expected, transfers=False)

    def _verifier(self, worker: WorkerInfo, session: RequestSession) -> bool:
        """Should ``worker`` be prepared for ``session`` beyond its cores, to run a replica
        that none of the workers prepared for it may run (a request of one core, say)?"""
        checks = session.verifying
        if not checks.replicas or session.plan is None:
            return False
        if worker.identity in session.prepared | session.preparing | session.excluded:
            return False
        queued = [t for t in session.tasks.queued() if checks.is_replica(t)]
        if not any(checks.fits(worker)(task) for task in queued):
            return False
        registry = self.bindings.registry
        others = [registry.get(i) for i in session.prepared | session.preparing]
        return not any(
            other is not None and checks.fits(other)(task) for other in others for task in queued
        )

    def _defer(self, worker: WorkerInfo) -> None:
        if worker not in self._deferred:
            self._deferred.append(worker)

    def _local(self, worker: WorkerInfo, session: RequestSession) -> Callable[[Task], bool] | None:
        """On the data plane, a core's chain stays on the worker holding it: ``worker`` leaves
        a task to the worker holding its input (``RequestSession.home``) while that one is
        idle in this pass, unless nothing else is left for it. None: no preference."""
        if not session.named:
            return None
        idle = self._idle - {worker.identity}

        def local(task: Task) -> bool:
            home = session.home(task)
            return not home or worker.identity in home or home.isdisjoint(idle)

        return local if session.tasks.may_take(local, worker=worker.identity) else None

    def _nearby(
        self, worker: WorkerInfo, session: RequestSession, now: float, mine: float | None
    ) -> Callable[[Task], bool] | None:
        """On the data plane, with the links' costs: ``worker`` may take a task unless another
        worker would finish it sooner (earliest finish time, each input's transfer from its
        nearest holder counted: ``broker.links``). The others: the task's holders and the
        workers of the request idle in this pass. A busy one starts when it is expected free,
        one EVAL later if it runs another core (that core's chain goes on there first); a late
        one, or one busy for an unknown time, is not waited for; on a tie the worker holding
        the task's first input (its core's chain) takes it. And while the request has run
        clean on a pool of one speed class (``speed_classes``), each core's chain is bound to
        a worker (``_layout``): another takes a task of it only if it has no ready task of its
        own cores and finishes it sooner by ``MOVE_EVALS`` of the fastest class's EVALs, and
        the core's worker leaves it only to one sooner by as much. So jittering EVALs delay a
        chain and do not move it. None: no preference (not on the data plane, no ready
        task)."""
        if not session.named or self.links is None or self.speeds is None:
            return None
        registry = self.speeds.registry
        key = (session.latent_bytes, 1)
        idle = self._idle - {worker.identity}
        classed = self._class_times(session, key, now)

        def seconds(other: WorkerInfo) -> float:
            if mine is None:  # speeds unknown: the transfers decide alone
                return 0.0
            return registry.expected(other, key) or mine

        blocks = self._core_hosts(session)
        bound = self._bound(session, now)
        margin = MOVE_EVALS * min(classed.values(), default=0.0) if mine is not None else 0.0
        # a worker with a ready task of its own cores takes no other core's
        busy = any(bound.get(task.core) == worker.identity for task in session.tasks.queued())

        def away(task: Task, info: WorkerInfo) -> float:
            """A core off its host's block: later, its rectifications' inputs from one
            neighbouring core and its results for the other cross between hosts (two latents).
            None for a chain staying on its worker, or across a link slower than
            ``BLOCK_EVALS`` EVALs a latent (there the transfers decide alone)."""
            want = blocks.get(task.core)
            here = host_of(info.data, info.identity)
            if want is None or want == here or self.links is None:
                return 0.0
            refs = refs_of(task.latent)
            if info.identity in session.home(task):
                lineage = session.directory.lineage(refs[0])
                if lineage is not None and lineage.core == task.core:
                    return 0.0
            crossing = self.links.seconds(want, here, session.latent_bytes)
            if crossing > BLOCK_EVALS * seconds(info):
                return 0.0
            return 2 * crossing

        def finish(task: Task) -> float:
            return now + self.transfer_s(session, task, worker) + away(task, worker) + (mine or 0.0)

        def ends(task: Task, identity: bytes) -> float | None:
            """When another worker of the request would finish ``task``; None: not to be
            waited for (gone, quarantined, late, busy for an unknown time)."""
            other = registry.get(identity)
            if other is None or identity not in session.prepared or other.quarantined(now):
                return None
            start = now
            if identity not in idle:
                free, job = other.free_at(now), other.job
                if free is None or job is None or job.expected_s is None:
                    return None  # late, or of unknown length; idle but taken in this pass
                start = free
                if job.request != session.id or all(t.core != task.core for t, _ in job.tasks):
                    start += seconds(other)
            end = start + self.transfer_s(session, task, other) + away(task, other) + seconds(other)
            return end

        def sooner(task: Task, identity: bytes, by: float, home: frozenset[bytes]) -> bool:
            end = ends(task, identity)
            if end is None:
                return False
            if identity in home and worker.identity not in home:  # its chain, on a tie
                return end <= by + 1e-9
            return end < by - 1e-9

        def near(task: Task) -> bool:
            by = finish(task)
            owner = bound.get(task.core)
            if owner is not None and owner != worker.identity:
                if busy:
                    return False
                theirs = ends(task, owner)
                if theirs is not None and by > theirs - margin - 1e-9:
                    return False  # its core's worker takes it, or hardly later
            elif owner is not None:
                by -= margin  # its own core's: it leaves it only to one sooner by the margin
            holders = {h for ref in refs_of(task.latent) for h in session.directory.holders(ref)}
            others = (holders | idle) - {worker.identity}
            if not others:
                return True
            home = session.home(task)
            return not any(sooner(task, identity, by, home) for identity in others)

        return near if len(session.tasks) else None

    def _bound(self, session: RequestSession, now: float) -> dict[int, bytes]:
        """Each core's worker (``_core_workers``) while the binding holds, else none: while the
        request has run clean, in a pool of one speed class. Of mixed classes the schedule
        ahead and the slack rules decide (a slow worker's core would wait for it); once a task
        ran again or a result was recomputed, the earliest finish alone (the worker bound may
        be why)."""
        clean = not session.tasks.attempts and not session.replays and not session.directory.replays
        if log.isEnabledFor(logging.DEBUG) and session.id not in self._unbound:
            self._say_unbound(session, now, clean)
        return self._core_workers(session) if clean and self._alike(session, now) else {}

    def _say_unbound(self, session: RequestSession, now: float, clean: bool) -> None:
        """At DEBUG, once per request with a core layout: its cores are not bound (any more),
        and why (an unbound request's chains may cross between hosts: this tells which worker
        looked slower, or that a task ran again)."""
        if session.id not in self._blocks or (clean and self._alike(session, now)):
            return
        self._unbound.add(session.id)
        if not clean:
            why = "a task ran again or a result was recomputed"
        else:
            assert self.speeds is not None
            registry, key = self.speeds.registry, (session.latent_bytes, 1)
            best = {
                other.name: round(other.best[key] * 1000, 1)
                for identity in sorted(session.prepared)
                if (other := registry.get(identity)) is not None and key in other.best
            }
            why = f"the workers' best EVAL times are not one speed class: {best} ms"
        log.debug("request %s: cores unbound: %s", session.id, why)

    def _alike(self, session: RequestSession, now: float) -> bool:
        """The request's workers are of one speed class: each one's best EVAL time lately
        (``WorkerInfo.best``) within SLOWER_RATIO of the fastest's, as the schedule ahead counts
        one class. Their learnt times would not do: on shared CPUs 16 MiB EVALs learn 100 to
        425 ms, a rectification with more inputs takes longer than a plain step, and either
        split a pool of one device into classes, which left the cores unbound in most real
        runs (and crossing between hosts)."""
        assert self.speeds is not None
        registry = self.speeds.registry
        key = (session.latent_bytes, 1)
        best = [
            (seconds, other.seen.get(key, 0) > 1)
            for identity in session.prepared
            if (other := registry.get(identity)) is not None and not other.quarantined(now)
            if (seconds := other.best.get(key))
        ]
        if not best:
            return False
        fastest = min(seconds for seconds, _ in best)
        # A best of one EVAL alone may be a spike (on shared CPUs one warm 16 MiB EVAL took
        # 1.8x the others'): it splits the class only past LONE_RATIO; a second EVAL confirms.
        return all(
            seconds < fastest * (SLOWER_RATIO if confirmed else LONE_RATIO)
            for seconds, confirmed in best
        )

    def _class_times(
        self, session: RequestSession, key: tuple[int, int], now: float
    ) -> dict[bytes, float]:
        """The EVAL time of each prepared worker's speed class (``speed_classes``: the slowest
        of the workers within ``CLASS_SPREAD`` of their class's fastest), not quarantined, of
        known speed."""
        assert self.speeds is not None
        registry = self.speeds.registry
        known = {
            identity: seconds
            for identity in session.prepared
            if (other := registry.get(identity)) is not None and not other.quarantined(now)
            if (seconds := registry.expected(other, key))
        }
        return speed_classes(known) if known else {}

    def _core_hosts(self, session: RequestSession) -> dict[int, str]:
        """The host each core's chain belongs on: CHORDS reads between neighbouring cores (core
        k is rectified by core k-1), so the cores split into contiguous blocks, one per host,
        as many cores as the host has prepared workers (rounded), the host of the init chain
        (the holder of the first result a queued task reads) taking the first block, the others
        by name. The init chain moves to the next block once (a core's start off its block costs
        two crossings), not each core's chain. Empty while the init chain has not started, and on
        one host (no preference)."""
        layout = self._layout(session)
        return {} if layout is None else layout.hosts

    def _core_workers(self, session: RequestSession) -> dict[int, bytes]:
        """The worker each core's chain is bound to for the request (``bind_cores``): within
        its host's block, contiguous runs of cores, one per prepared worker of the host, the
        worker that ran the init chain's first task taking the first run, the others by
        routing id. Empty while the init chain has not started."""
        layout = self._layout(session)
        return {} if layout is None else layout.workers

    def _layout(self, session: RequestSession) -> CoreLayout | None:
        """``session``'s cores' hosts and workers, computed again when its prepared workers
        change (a core keeps its worker where it can)."""
        assert self.speeds is not None
        registry = self.speeds.registry
        prepared = frozenset(session.prepared)
        known = self._blocks.get(session.id)
        if known is not None and known.prepared == prepared:
            return known
        if known is not None:
            start, first = known.start, known.first
        else:
            homes = [session.home(task) for task in session.tasks.queued()]
            holder = next((h for home in homes for h in sorted(home)), None)
            info = None if holder is None else registry.get(holder)
            if info is None:
                return None
            start, first = host_of(info.data, info.identity), info.identity
        count: dict[str, int] = {}
        workers: dict[str, list[bytes]] = {}
        for identity in sorted(prepared):
            if (info := registry.get(identity)) is not None:
                here = host_of(info.data, info.identity)
                count[here] = count.get(here, 0) + 1
                workers.setdefault(here, []).append(identity)
        blocks: dict[int, str] = {}
        if len(count) > 1:
            order = sorted(count, key=lambda host: (host != start, host))
            cores, total, seen = session.parallelism, sum(count.values()), 0
            for host in order:
                first_core = 1 + round(cores * seen / total)
                seen += count[host]
                for core in range(first_core, 1 + round(cores * seen / total)):
                    blocks[core] = host
        everywhere = range(1, session.parallelism + 1)
        hosts = blocks or {core: host for core in everywhere for host in workers}
        for theirs in workers.values():  # the init chain's worker takes the first run
            theirs.sort(key=lambda identity: identity != first)
        previous = {} if known is None else known.workers
        bound = bind_cores(everywhere, hosts, workers, previous)
        layout = CoreLayout(prepared, start, first, blocks, bound)
        self._blocks[session.id] = layout
        if log.isEnabledFor(logging.DEBUG):

            def name(identity: bytes) -> str:
                known = registry.get(identity)
                return "?" if known is None else known.name

            log.debug(
                "request %s: cores on %s prepared workers (%s; %s first, %s its first run): %s",
                session.id,
                len(prepared),
                ", ".join(f"{host} {n}" for host, n in sorted(count.items())),
                start,
                name(first),
                {core: name(worker) for core, worker in sorted(bound.items())},
            )
        return layout

    def _decodes_near(
        self, worker: WorkerInfo, session: RequestSession, ready: Callable[[Hit], bool]
    ) -> Callable[[Hit], bool]:
        """On the data plane, with the links' costs: which released hits (of those ``ready``
        allows) ``worker`` decodes. One of the request's workers idle in this pass does it
        first if it has no ready task of a core bound to it while ``worker`` has one (a
        decode there would hold up that core's chain), else if it fetches the hit's latent
        sooner (its holder, or one on the holder's host: the returned hit's decode is on the
        request's critical path)."""
        registry = self.bindings.registry if self.speeds is None else self.speeds.registry
        bound = {} if self.speeds is None else self._core_workers(session)
        waiting = {bound[task.core] for task in session.tasks.queued() if task.core in bound}
        idle = [
            other
            for identity in self._idle - {worker.identity}
            if identity in session.prepared and (other := registry.get(identity)) is not None
        ]

        def near(hit: Hit) -> bool:
            if not ready(hit):
                return False
            mine = (worker.identity in waiting, self.fetch_s(session, hit.latent, worker))
            return not any(
                (o.identity in waiting, self.fetch_s(session, hit.latent, o)) < mine for o in idle
            )

        return near

    def transfer_s(self, session: RequestSession, task: Task, worker: WorkerInfo) -> float:
        """What fetching ``task``'s inputs to ``worker`` takes: each one it does not hold from
        its nearest holder, one after the other (as a worker fetches them); 0 without links."""
        return self.fetch_s(session, task.latent, worker)

    def fetch_s(self, session: RequestSession, latent: Latent, worker: WorkerInfo) -> float:
        """What fetching the results ``latent`` is made of to ``worker`` takes (``transfer_s``)."""
        if self.links is None or self.speeds is None or not session.named:
            return 0.0
        registry = self.speeds.registry
        here = host_of(worker.data, worker.identity)
        total = 0.0
        for ref in refs_of(latent):
            holders = session.directory.holders(ref)
            if not holders or worker.identity in holders:
                continue  # held here (or by nobody: it is being recomputed)
            nbytes = session.directory.nbytes(ref) or session.latent_bytes
            costs = [
                self.links.seconds(host_of(info.data, info.identity), here, nbytes)
                for holder in holders
                if (info := registry.get(holder)) is not None
            ]
            total += min(costs, default=0.0)
        return total

    @staticmethod
    def fetch_bytes(session: RequestSession, task: Task, worker: WorkerInfo) -> int:
        """Bytes of ``task``'s inputs that ``worker`` must fetch from others (held elsewhere,
        not by it; x0 every prepared worker holds); 0 off the data plane."""
        if not session.named:
            return 0
        total = 0
        for ref in refs_of(task.latent):
            holders = session.directory.holders(ref)
            if holders and worker.identity not in holders:
                total += session.directory.nbytes(ref) or session.latent_bytes
        return total

    def _take_eval(
        self,
        worker: WorkerInfo,
        session: RequestSession,
        count: int,
        now: float,
        expected: float | None,
        slack: bool = False,
        allowed: Callable[[Task], bool] | None = None,
        chain: bool = True,
    ) -> Job:
        """An EVAL of up to ``count`` tasks taken from ``session`` for ``worker``; one task,
        where ``chain`` and the session allow, with the steps that follow it on its core (at
        most ``self.chain`` in all): the worker runs them in a row, without round trips."""
        taken = session.tasks.take(worker.identity, count, slack=slack, allowed=allowed)
        followers = []
        # A chain holds the worker for several steps: only while no other request of its model
        # runs, so that requests sharing workers still take turns a step at a time.
        chain = chain and self._running.get(session.model, 0) <= 1
        if chain and self.chain > 1 and len(taken) == 1 and session.chains:
            followers = session.follow(taken[0][0], worker.identity, min(self.chain, MAX_TASKS) - 1)
        if followers and expected is not None:  # one after another
            expected *= 1 + len(followers)
        job = self._eval_job(worker, session, now, taken + followers, expected, transfers=True)
        job.chain = bool(followers)
        return job

    def _eval_job(
        self,
        worker: WorkerInfo,
        session: RequestSession,
        now: float,
        taken: list[tuple[Task, int]],
        expected: float | None,
        *,
        transfers: bool,
    ) -> Job:
        """The EVAL of ``taken`` (a plan's tasks or a replica) for ``worker``: the bytes of
        the results it keeps, and ``expected``, the seconds its computation should take (None:
        unknown), plus, if ``transfers`` and the links are counted, its inputs' transfers (a
        chain's followers read theirs in place: none). A plan's tasks (``transfers``) push
        their results to the workers that will read them across hosts (``_push_to``); a
        replica pushes nothing."""
        results = sum(len(task.targets) for task, _ in taken) * session.latent_bytes
        if transfers and expected is not None and self.links is not None:
            expected += sum(self.transfer_s(session, task, worker) for task, _ in taken)
        fetched = sum(self.fetch_bytes(session, task, worker) for task, _ in taken)
        job = Job(
            Kind.EVAL,
            session.id,
            worker.identity,
            now,
            taken,
            expected_bytes=results,
            expected_s=expected,
            fetch_bytes=fetched,
        )
        if session.named and log.isEnabledFor(logging.DEBUG) and self.speeds is not None:
            bound = self._bound(session, now)
            for task, _ in taken:
                owner = bound.get(task.core)
                if owner is not None and owner != worker.identity:
                    other = self.speeds.registry.get(owner)
                    log.debug(
                        "request %s: core %s's step %s to %s, not its bound worker %s (%s)",
                        session.id,
                        task.core,
                        task.step,
                        worker.name,
                        other.name if other is not None else "gone",
                        "idle" if other is not None and other.job is None else "busy",
                    )
        if session.named:
            if transfers:
                job.push = self._push_to(worker, session, taken, now)
            job.pushed = _pushed_to(worker, session, taken)
            session.pushes_asked += sum(len(to) for to in job.push.values())
            session.pushed_inputs += len(job.pushed)
            if job.push or job.pushed:
                log.debug(
                    "request %s: EVAL of %s to %s pushes %s, reads pushed %s",
                    session.id,
                    [(task.core, task.step) for task, _ in taken],
                    worker.name,
                    {f"{r.task}:{r.target}": len(to) for r, to in job.push.items()},
                    [f"{r.task}:{r.target}" for r in job.pushed],
                )
            for ref in job.pushed:  # its worker frees the copy once read: no DROP for it
                rest = session.pushes[ref] - {worker.identity}
                if rest:
                    session.pushes[ref] = rest
                else:
                    del session.pushes[ref]
        return job

    def _push_to(
        self,
        worker: WorkerInfo,
        session: RequestSession,
        taken: list[tuple[Task, int]],
        now: float,
    ) -> dict[Ref, tuple[bytes, ...]]:
        """On the data plane, with the request's cores bound to workers (``_core_workers``):
        for each result of ``taken`` that a task of another core reads (``Plan.readers``; one
        the returned hit depends on, where the plan knows which), the worker bound to that
        core (on another host than ``worker``; with ``push_local``, for a latent of at most
        ``PUSH_LOCAL_MAX_BYTES``, on any): ``worker``
        pushes the result there as soon as it exists, so the transfer overlaps compute instead
        of starting when the reader's EVAL arrives (within a host too: a fetch there is a
        loopback round trip, 1.4 ms at the median with 8 workers on 2 cores, on the critical
        path of every rectification a core's worker reads from another's). Only to a worker prepared
        for the request and not excluded from it. Recorded in ``session.pushes`` (a retry
        decides again: a result made elsewhere is pushed from there, or not at all). Only while
        the binding holds (``_bound``): unbound, the reader's task goes wherever it finishes
        first, and a copy pushed to the core's worker would cross the link for nothing."""
        plan = session.plan
        pushes: dict[Ref, tuple[bytes, ...]] = {}
        if plan is not None and self.speeds is not None and self.push:
            bound = self._bound(session, now)
            registry = self.speeds.registry
            here = host_of(worker.data, worker.identity)
            local = self.push_local and session.latent_bytes <= PUSH_LOCAL_MAX_BYTES
            goal = plan.goal()
            for task, _ in taken:
                for target, nodes in plan.readers(task).items():
                    to: list[bytes] = []
                    for node in nodes:
                        reader = bound.get(node[0])
                        if reader is None or reader == worker.identity or reader in to:
                            continue
                        if goal is not None and node not in goal:
                            continue  # not read on the way to the returned hit
                        if reader not in session.prepared or reader in session.excluded:
                            continue
                        info = registry.get(reader)
                        if info is None or info.data is None:
                            continue
                        if local or host_of(info.data, info.identity) != here:
                            to.append(reader)
                    if to and len(pushes) < MAX_PUSHES:  # (the wire's bounds)
                        pushes[Ref(task.id, target)] = tuple(to[:MAX_PUSH_TO])
        for task, _ in taken:
            for target in task.targets:
                ref = Ref(task.id, target)
                if ref in pushes:
                    session.pushes[ref] = frozenset(pushes[ref])
                else:
                    session.pushes.pop(ref, None)
        return pushes

    def _prepare(
        self,
        worker: WorkerInfo,
        order: list[RequestSession],
        now: float,
        faster_soon: Callable[[WorkerInfo, RequestSession, float], bool] | None = None,
    ) -> Job | None:
        for session in order:
            if session.model == worker.model and (
                session.wants_worker(worker.identity) or self._verifier(worker, session)
            ):
                if session.named and worker.data is None:
                    continue  # it could not hand its results to the others
                if faster_soon is not None and faster_soon(worker, session, now):
                    continue
                self.bindings.preparing(worker, session)
                initial = session.plan is None and session.x0_from is None
                if initial:
                    session.x0_from = worker.identity
                values = initial and session.x0_wanted(worker.data is not None)
                size = UNKNOWN_ANSWER_BYTES if values else 0
                return Job(
                    Kind.PREPARE,
                    session.id,
                    worker.identity,
                    now,
                    initial=initial,
                    x0=values,
                    expected_bytes=size,
                )
        return None


def _pushed_to(
    worker: WorkerInfo, session: RequestSession, taken: list[tuple[Task, int]]
) -> tuple[Ref, ...]:
    """The inputs of ``taken`` their producers were asked to push to ``worker``
    (``session.pushes``) and that it does not hold: it uses each once there."""
    pushed = []
    for task, _ in taken:
        for ref in refs_of(task.latent):
            if (
                worker.identity in session.pushes.get(ref, ())
                and ref not in pushed
                and worker.identity not in session.directory.holders(ref)
            ):
                pushed.append(ref)
    return tuple(pushed[:MAX_PUSHES])


def _both(first: Callable[[Task], bool], second: Callable[[Task], bool]) -> Callable[[Task], bool]:
    return lambda task: first(task) and second(task)
