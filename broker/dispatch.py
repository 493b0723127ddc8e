"""Which work goes to which idle worker: fair across requests, prepared workers first.

Pure decision-making over the registry and the sessions; ``BrokerCore`` sends what it decides.
``assign`` returns complete jobs: each names its kind, its worker and exactly the tasks (or the
decode) it popped from its session, so nothing downstream re-derives a count. Each idle worker
takes the next session in round-robin order that has a hit to decode or a task to run and for
which it is already prepared; failing that, it is prepared for a session that needs one more
worker (at most as many workers as the request has cores).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from chords_mq.algorithms.base import Task
from chords_mq.broker.bindings import Bindings
from chords_mq.broker.placement import SLOWER_RATIO, Planner, Schedule
from chords_mq.broker.registry import Job, WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.wire import DEFAULT_LIMITS, Kind

log = logging.getLogger("chords.broker")

# The size of an answer we cannot predict (an initial latent, decoded media): at most one frame.
UNKNOWN_ANSWER_BYTES = DEFAULT_LIMITS.max_frame_bytes


class FairDispatcher:
    def __init__(
        self, registry: WorkerRegistry | None = None, bindings: Bindings | None = None
    ) -> None:
        self._turn = 0
        self.registry = registry  # for the speed model; None: plain FIFO placement
        self.bindings = bindings if bindings is not None else Bindings(WorkerRegistry(0.0))
        self.planner = Planner()

    def assign(
        self, idle: list[WorkerInfo], sessions: list[RequestSession], now: float
    ) -> list[Job]:
        """Jobs for the currently idle workers, their tasks already taken from the sessions."""
        jobs: list[Job] = []
        count = len(sessions)
        if count == 0:
            return jobs
        if self.registry is not None:  # the fastest first: they get prepared and served first
            idle = sorted(idle, key=self._pace)
        self._waited: dict[str, list[WorkerInfo]] = {}
        self._planned: dict[str, Schedule | None] = {}  # this pass's ``_schedule`` by session
        active = {session.id for session in sessions}
        # Workers finishing work of a request that has ended: about to be free (few: the
        # in-flight tasks of requests that just returned). Found once per pass, not per worker.
        self._stale = (
            []
            if self.registry is None
            else [
                w
                for w in self.registry.workers.values()
                if w.job is not None and w.job.request not in active
            ]
        )
        for worker in idle:
            turn = self._turn % count
            order = sessions[turn:] + sessions[:turn] if turn else sessions
            job = self._decode(worker, order, now) or self._eval(worker, order, now)
            job = job or self._prepare(worker, order, now, self._faster_soon)
            if job is not None:
                worker.job = job
                jobs.append(job)
                chosen = next(s for s in order if s.id == job.request)
                self._turn = (sessions.index(chosen) + 1) % count
            else:
                self._unblock(worker, sessions, now, jobs)
        return jobs

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
            expected = None if self.registry is None else self.registry.expected(worker, key)
            job = self._take_eval(worker, session, 1, now, expected)
            worker.job = job
            jobs.append(job)
            return

    def _working(self, identity: bytes, session: RequestSession) -> bool:
        other = None if self.registry is None else self.registry.get(identity)
        return bool(other and other.job is not None and not other.job.late)

    @staticmethod
    def _pace(worker: WorkerInfo) -> float:
        """A worker's typical EVAL time (its median estimate); unknown: 0, it goes first."""
        known = sorted(worker.speed.values())
        return known[len(known) // 2] if known else 0.0

    @staticmethod
    def _decode(worker: WorkerInfo, order: list[RequestSession], now: float) -> Job | None:
        """Decoding a released hit comes first: users wait for it."""
        for session in order:
            if session.model == worker.model and worker.identity in session.prepared:
                pending = session.media.next_decode(worker.identity)
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
            ready = session.dispatchable()
            if ready == 0:
                continue
            # One EVAL takes up to spec.batch tasks (1 unless the request opted in).
            count = min(session.spec.batch, worker.max_batch, ready)
            key = (session.latent_bytes, count)
            mine = None if self.registry is None else self.registry.expected(worker, key)
            schedule = None
            if self.registry is not None and count == 1:
                if session.id not in self._planned:
                    self._planned[session.id] = self._schedule(session, key, now)
                schedule = self._planned[session.id]
            if schedule is not None and mine is not None:
                allowed = self._allows(schedule, worker, session, mine, now)
                if not session.may_take(allowed):  # every ready task is for a faster worker
                    self._waited.setdefault(session.id, []).append(worker)
                    continue
                return self._take_eval(worker, session, count, now, mine, allowed=allowed)
            slack = mine is not None and self._slower(worker, session, key, now, mine)
            demand = ready
            if slack and mine is not None:  # each fast answer readies a successor meanwhile
                demand = ready * max(1, math.ceil(mine / self._fastest(session, key, now)))
            if mine is not None and self._others_first(worker, session, key, demand, now, mine):
                self._waited.setdefault(session.id, []).append(worker)
                continue  # faster workers finish every ready task before this one would
            return self._take_eval(worker, session, count, now, mine, slack)
        return None

    def _allows(
        self,
        schedule: Schedule,
        worker: WorkerInfo,
        session: RequestSession,
        mine: float,
        now: float,
    ) -> Callable[[Task], bool]:
        """Which queued tasks ``worker`` (``mine`` seconds an EVAL) may take: none the
        schedule planned on a markedly faster class, and none planned on a slower class while
        a worker of that class is idle or about to be (within half of ``mine``: it takes the
        task then, and this worker stays free for the task the schedule has for it, which may
        be ready a moment later)."""
        registry = self.registry
        assert registry is not None
        slower: list[float] | None = None  # found when first needed (most calls never do)

        def free_slower() -> list[float]:
            return [
                seconds
                for identity in session.prepared
                if (other := registry.get(identity)) is not None
                and other is not worker
                and not other.quarantined(now)
                and (free := other.free_at(now)) is not None
                and free - now <= mine / 2
                and (seconds := registry.expected(other, (session.latent_bytes, 1)))
                and seconds >= mine * SLOWER_RATIO
            ]

        def allowed(task: Task) -> bool:
            nonlocal slower
            node = (task.core, task.step)
            if not schedule.allows(mine, node):
                return False
            budget = schedule.budget(node)
            if budget is None or budget < mine * SLOWER_RATIO:
                return True  # planned on this worker's class (or not planned)
            if slower is None:
                slower = free_slower()
            return not any(schedule.allows(seconds, node) for seconds in slower)

        return allowed

    def _schedule(
        self, session: RequestSession, key: tuple[int, int], now: float
    ) -> Schedule | None:
        """The session's goal graph scheduled ahead on its workers
        (``chords_mq.broker.placement``), if its plan knows the graph and its workers are of more
        than one speed class; planned again when they change. None: place by earliest finish
        time, task by task."""
        assert self.registry is not None
        if session.plan is None or session.plan.goal() is None:
            return None
        pool: dict[bytes, tuple[float, float]] = {}
        for identity in session.prepared | session.preparing:
            other = self.registry.get(identity)
            if other is None or other.quarantined(now):
                continue
            seconds, free = self.registry.expected(other, key), other.free_at(now)
            if not seconds or free is None:
                continue  # of unknown speed, or late: not counted on
            pool[identity] = (seconds, free)
        speeds = [seconds for seconds, _ in pool.values()]
        if not speeds or max(speeds) < min(speeds) * SLOWER_RATIO:
            if session.schedule is not None:
                session.use_schedule(None)
            return None
        current = session.schedule
        if current is not None and current.fits({w: s for w, (s, _) in pool.items()}):
            return current
        graph = session.goal_graph()
        if graph is None:
            return None  # too large to schedule ahead
        finished: dict[tuple[int, int], float] = dict.fromkeys(session.finished, now)
        for task, _, identity in session.in_flight.values():
            other = self.registry.get(identity)
            free = None if other is None else other.free_at(now)
            finished[(task.core, task.step)] = free if free is not None else now + min(speeds)
        began = time.perf_counter()
        planned = self.planner.planned
        schedule = self.planner.plan(graph, finished, pool, now)
        session.use_schedule(schedule)
        if schedule is not None:
            log.debug(
                "request %s: %d tasks scheduled ahead on %d workers in %.1f ms (%s): "
                "done in %.3f s; EVAL times %s ms",
                session.id,
                len(schedule.slots),
                len(pool),
                (time.perf_counter() - began) * 1000,
                f"{schedule.tries} tries" if self.planner.planned > planned else "cached",
                schedule.makespan - now,
                sorted(round(seconds * 1000, 1) for seconds in speeds),
            )
        return schedule

    @staticmethod
    def _take_eval(
        worker: WorkerInfo,
        session: RequestSession,
        count: int,
        now: float,
        expected: float | None,
        slack: bool = False,
        allowed: Callable[[Task], bool] | None = None,
    ) -> Job:
        """An EVAL of up to ``count`` tasks taken from ``session`` for ``worker``."""
        taken = session.take(worker.identity, count, slack=slack, allowed=allowed)
        results = sum(len(task.targets) for task, _ in taken) * session.latent_bytes
        return Job(
            Kind.EVAL,
            session.id,
            worker.identity,
            now,
            taken,
            expected_bytes=results,
            expected_s=expected,
        )

    def _others_first(
        self,
        worker: WorkerInfo,
        session: RequestSession,
        key: tuple[int, int],
        ready: int,
        now: float,
        mine: float,
    ) -> bool:
        """Earliest finish time: would the session's other prepared workers, counting when each
        frees up and how fast it is, complete all ``ready`` tasks before ``worker`` (done
        ``mine`` seconds from now) completes one? Then ``worker`` waits, and a task on the
        critical chain never goes to a slow worker while a fast one is about to be free."""
        assert self.registry is not None
        capacity = 0
        for identity in session.prepared:
            other = self.registry.get(identity)
            if other is None or other is worker or other.quarantined(now):
                continue
            free = other.free_at(now)
            seconds = self.registry.expected(other, key)
            if free is None or not seconds:
                continue
            if other.job is not None and other.job.expected_s is None:
                continue  # busy with something of unknown length: do not count on it
            # tasks it completes strictly before ``finish`` (equal speeds: none, so two equal
            # workers never both wait for each other)
            ratio = (mine - (free - now)) / seconds
            capacity += max(0, math.ceil(ratio - 1e-9) - 1)
            if capacity >= ready:
                return True
        return False

    def _fastest(self, session: RequestSession, key: tuple[int, int], now: float) -> float:
        assert self.registry is not None
        known = [
            seconds
            for identity in session.prepared
            if (other := self.registry.get(identity)) is not None and not other.quarantined(now)
            if (seconds := self.registry.expected(other, key))
        ]
        return min(known, default=1.0)

    def _slower(
        self,
        worker: WorkerInfo,
        session: RequestSession,
        key: tuple[int, int],
        now: float,
        mine: float,
    ) -> bool:
        """Is a worker of the request markedly faster (SLOWER_RATIO) than ``worker``? Then
        ``worker`` takes the least urgent ready task, the one with the most slack, and the
        urgent ones stay for the fast workers (HEFT's rule: slow processors take slack)."""
        assert self.registry is not None
        for identity in session.prepared:
            other = self.registry.get(identity)
            if other is None or other is worker or other.quarantined(now):
                continue
            seconds = self.registry.expected(other, key)
            if seconds and seconds * SLOWER_RATIO < mine:
                return True
        return False

    def _faster_soon(self, worker: WorkerInfo, session: RequestSession, now: float) -> bool:
        """Are enough markedly faster workers of the model finishing stale work (for a request
        that has ended: a copy, or a core past the returned hit) before ``worker`` would
        finish one EVAL? Then they take the request's remaining places (a request of K cores
        has at most K workers) when they answer, and a slow worker does not hold one. Workers
        busy with running requests are not counted: they may stay there."""
        if self.registry is None:
            return False
        mine = self._pace(worker)
        if mine == 0.0:
            return False
        places = max(1, session.parallelism - len(session.prepared) - len(session.preparing))
        faster = 0
        for other in self._stale:
            if (
                other is worker
                or other.model != worker.model
                or other.identity in session.prepared
                or other.identity in session.preparing
                or other.identity in session.excluded
                or other.quarantined(now)
            ):
                continue
            pace, free = self._pace(other), other.free_at(now)
            if free is not None and pace * SLOWER_RATIO < mine and free - now < mine:
                faster += 1
                if faster >= places:
                    return True
        return False

    def _prepare(
        self,
        worker: WorkerInfo,
        order: list[RequestSession],
        now: float,
        faster_soon: Callable[[WorkerInfo, RequestSession, float], bool] | None = None,
    ) -> Job | None:
        for session in order:
            if session.model == worker.model and session.wants_worker(worker.identity):
                if faster_soon is not None and faster_soon(worker, session, now):
                    continue
                self.bindings.preparing(worker, session)
                initial = session.plan is None and session.x0_from is None
                if initial:
                    session.x0_from = worker.identity
                size = UNKNOWN_ANSWER_BYTES if initial else 0
                return Job(
                    Kind.PREPARE,
                    session.id,
                    worker.identity,
                    now,
                    initial=initial,
                    expected_bytes=size,
                )
        return None
