"""What learnt speeds say about placement on a pool of mixed speeds (HEFT's rules).

``FairDispatcher`` decides which request an idle worker serves; this decides, from the speeds
the registry has learnt, whether the worker should take a task of it now, which one, or wait:
earliest finish time (``others_first``), slack for slow workers (``slower``), the goal graph
scheduled ahead when the pool's workers are of more than one speed class (``schedule``,
``allows``; ``broker/placement.py``), and a slow worker not taking a place that markedly faster
ones are about to free (``faster_soon``). Pure decisions over the registry and the sessions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from chords_mq.algorithms.base import Task
from chords_mq.broker.placement import SLOWER_RATIO, Planner, Schedule, speed_classes
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession

log = logging.getLogger("chords.broker")


class SpeedPolicy:
    """Placement by learnt speeds, for ``FairDispatcher``."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self.registry = registry
        self.planner = Planner()
        # Workers finishing work of a request that has ended: about to be free (few: the
        # in-flight tasks of requests that just returned). Set once per dispatch pass.
        self.stale: list[WorkerInfo] = []

    @staticmethod
    def pace(worker: WorkerInfo) -> float:
        """A worker's typical EVAL time (its median estimate); unknown: 0, it goes first."""
        known = sorted(worker.speed.values())
        return known[len(known) // 2] if known else 0.0

    def allows(
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

    def schedule(
        self, session: RequestSession, key: tuple[int, int], now: float
    ) -> Schedule | None:
        """The session's goal graph scheduled ahead on its workers
        (``chords_mq.broker.placement``), if its plan knows the graph and its workers are of more
        than one speed class; planned again when they change. None: place by earliest finish
        time, task by task."""
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

    def others_first(
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
        critical chain never goes to a slow worker while a fast one is about to be free. A
        worker of ``worker``'s speed class (``speed_classes``) counts as exactly as fast: a few
        ms of learnt difference (EVAL times that jitter) do not make it wait."""
        capacity = 0
        others: dict[bytes, tuple[WorkerInfo, float]] = {}
        for identity in session.prepared:
            other = self.registry.get(identity)
            if other is None or other is worker or other.quarantined(now):
                continue
            seconds = self.registry.expected(other, key)
            if seconds:
                others[identity] = (other, seconds)
        known = {identity: seconds for identity, (_, seconds) in others.items()}
        classed = speed_classes({**known, worker.identity: mine})
        for identity, (other, seconds) in others.items():
            free = other.free_at(now)
            if free is None:
                continue
            if classed[identity] == classed[worker.identity]:
                seconds = mine  # one class
            if other.job is not None and other.job.expected_s is None:
                continue  # busy with something of unknown length: do not count on it
            # tasks it completes strictly before ``finish`` (equal speeds: none, so two equal
            # workers never both wait for each other)
            ratio = (mine - (free - now)) / seconds
            capacity += max(0, math.ceil(ratio - 1e-9) - 1)
            if capacity >= ready:
                return True
        return False

    def fastest(self, session: RequestSession, key: tuple[int, int], now: float) -> float:
        known = [
            seconds
            for identity in session.prepared
            if (other := self.registry.get(identity)) is not None and not other.quarantined(now)
            if (seconds := self.registry.expected(other, key))
        ]
        return min(known, default=1.0)

    def slower(
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
        for identity in session.prepared:
            other = self.registry.get(identity)
            if other is None or other is worker or other.quarantined(now):
                continue
            seconds = self.registry.expected(other, key)
            if seconds and seconds * SLOWER_RATIO < mine:
                return True
        return False

    def faster_soon(self, worker: WorkerInfo, session: RequestSession, now: float) -> bool:
        """Are enough markedly faster workers of the model finishing stale work (for a request
        that has ended: a copy, or a core past the returned hit) before ``worker`` would
        finish one EVAL? Then they take the request's remaining places (a request of K cores
        has at most K workers) when they answer, and a slow worker does not hold one. Workers
        busy with running requests are not counted: they may stay there."""
        mine = self.pace(worker)
        if mine == 0.0:
            return False
        places = max(1, session.parallelism - len(session.prepared) - len(session.preparing))
        faster = 0
        for other in self.stale:
            if (
                other is worker
                or other.model != worker.model
                or other.identity in session.prepared
                or other.identity in session.preparing
                or other.identity in session.excluded
                or other.quarantined(now)
            ):
                continue
            pace, free = self.pace(other), other.free_at(now)
            if free is not None and pace * SLOWER_RATIO < mine and free - now < mine:
                faster += 1
                if faster >= places:
                    return True
        return False
