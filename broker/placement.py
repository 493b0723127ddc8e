"""Scheduling a request's goal graph ahead, on a pool of mixed speeds.

When a plan knows in advance every task its returned hit depends on (``Plan.goal``: CHORDS under
a ``core-index`` stop) and the request's workers are of more than one speed class, placing one
ready task at a time by earliest finish time loses rounds: on 4 fast and 4 slow workers (30 and
90 ms) it takes 21 fast rounds where the best schedule takes 20. Every task of that graph lies on
a critical chain, so a task run on a slow worker delays everything after it; the slow workers
may only take tasks whose chains can absorb the delay, and the fast ones must keep the widest
part of the graph moving.

``plan_schedule`` finds such a schedule by list scheduling with deadlines (a pure function of
the graph, the workers' expected EVAL times and when each is free): for a target makespan ``T``,
each task has a latest finish ``T - (rank - 1) * fastest`` (its chain of successors run on the
fastest workers); a fast worker takes the most urgent ready task (highest rank, then the one with
the most tasks after it), and a slow worker only a ready task it would finish by that latest
finish (half a fast EVAL of tolerance), the least urgent first. Targets from the critical path
upward, half a fast EVAL apart, are tried and the shortest schedule kept.

What the dispatcher keeps of it is robust to timing: each task's *budget* (the EVAL time of the
worker class it was planned on: a markedly slower worker may not take it) and its planned start
(the queue's order). The dispatcher still serves whatever is ready to whoever may take it, so a
pool slower or faster than its model only shifts the schedule; a new worker set or speeds off
by more than ``REPLAN_DRIFT`` make it plan again from the tasks still to run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Node = tuple[int, int]  # (core, step): a task of the goal graph

# A worker this many times slower than another is of a slower class: it takes the least urgent
# task when placing task by task (dispatch), the tasks a schedule leaves it when planning ahead.
SLOWER_RATIO = 1.5
# Plan again once a worker's expected EVAL time differs by this fraction from the planned one.
REPLAN_DRIFT = 0.25
# Workers within this fraction of the fastest of their class are planned as one class, at the
# class's slowest time: the schedule's decisions are by class, and a list schedule's ties are
# fragile (4 fast workers at 31.6 to 32.2 ms planned one by one lose the round that 4 at 32.2
# win), and one slow answer moves a worker's estimate (EMA) by up to a fifth.
CLASS_SPREAD = 0.25
# At most this many targets are tried (half a fast EVAL apart), and at most PLAN_WORK tasks
# placed in all tries together (at least two tries: K=8, N=50 has 73 tasks, N=1000 1327), so
# planning stays within tens of ms on the broker's loop; graphs above MAX_NODES are not
# scheduled ahead.
MAX_TARGETS = 24
PLAN_WORK = 8000
MAX_NODES = 2048
# Schedules of fresh requests kept for reuse (by graph and speed classes), and how finely the
# classes' EVAL times are told apart for it (a factor).
CACHED_SCHEDULES = 32
CACHE_STEP = 1.1
# A core's next task leaves the worker its chain is bound to (``bind_cores``) only for one that
# would finish it sooner by this many EVALs (of the pool's fastest class): EVAL times that jitter
# by a few percent delay a chain, they do not move it.
MOVE_EVALS = 0.5


@dataclass(frozen=True)
class Slot:
    """Where the schedule put a task: when it starts, on which worker, and that worker's EVAL
    time as planned (the budget: a markedly slower worker may not take the task)."""

    start: float
    budget: float
    worker: bytes


@dataclass
class Schedule:
    slots: dict[Node, Slot]
    makespan: float
    target: float
    speeds: dict[bytes, float]  # the expected EVAL time of each worker it was planned for
    tries: int = 0

    def allows(self, seconds: float, node: Node) -> bool:
        """May a worker whose EVAL takes ``seconds`` run ``node``? Unless it is markedly slower
        than the worker class the schedule planned the task on."""
        slot = self.slots.get(node)
        return slot is None or seconds < slot.budget * SLOWER_RATIO

    def moved(self, by: float, speeds: Mapping[bytes, float]) -> Schedule:
        """This schedule ``by`` seconds later, for the workers of ``speeds`` (as many as it was
        planned for: the k-th fastest takes the k-th fastest's tasks)."""
        rename = dict(
            zip(
                sorted(self.speeds, key=lambda w: (self.speeds[w], w)),
                sorted(speeds, key=lambda w: (speeds[w], w)),
                strict=True,
            )
        )
        slots = {
            node: Slot(slot.start + by, slot.budget, rename[slot.worker])
            for node, slot in self.slots.items()
        }
        return Schedule(slots, self.makespan + by, self.target + by, dict(speeds), self.tries)

    def budget(self, node: Node) -> float | None:
        """The planned worker class's EVAL time for ``node`` (None: not planned)."""
        slot = self.slots.get(node)
        return None if slot is None else slot.budget

    def fits(self, speeds: Mapping[bytes, float]) -> bool:
        """Is this schedule still for these workers at about these speeds?"""
        if speeds.keys() != self.speeds.keys():
            return False
        return all(
            abs(seconds - self.speeds[who]) <= REPLAN_DRIFT * self.speeds[who]
            for who, seconds in speeds.items()
        )


@dataclass
class GoalGraph:
    """A goal graph with what scheduling reads: children, upward ranks and successor counts."""

    parents: dict[Node, list[Node]]
    key: int = 0  # the graph's shape, for the schedule cache
    children: dict[Node, list[Node]] = field(default_factory=dict)
    rank: dict[Node, int] = field(default_factory=dict)
    weight: dict[Node, int] = field(default_factory=dict)  # how many tasks come after it

    @classmethod
    def of(cls, graph: Mapping[Node, Sequence[Node]]) -> GoalGraph:
        parents = {node: [p for p in ps if p in graph] for node, ps in graph.items()}
        children: dict[Node, list[Node]] = {node: [] for node in parents}
        for node, ps in parents.items():
            for parent in ps:
                children[parent].append(node)
        order = _topological(parents, children)
        rank: dict[Node, int] = {}
        index = {node: i for i, node in enumerate(order)}
        after: dict[Node, int] = {}  # the tasks after each, as a bit set over ``order``
        for node in reversed(order):
            rank[node] = 1 + max((rank[c] for c in children[node]), default=0)
            below = 0
            for child in children[node]:
                below |= after[child] | (1 << index[child])
            after[node] = below
        weight = {node: after[node].bit_count() for node in order}
        key = hash(tuple(sorted((node, tuple(sorted(ps))) for node, ps in parents.items())))
        return cls(parents, key, children, rank, weight)


def _topological(parents: dict[Node, list[Node]], children: dict[Node, list[Node]]) -> list[Node]:
    waiting = {node: len(ps) for node, ps in parents.items()}
    order = [node for node, count in waiting.items() if count == 0]
    for node in order:  # grows while it is read
        for child in children[node]:
            waiting[child] -= 1
            if waiting[child] == 0:
                order.append(child)
    if len(order) != len(parents):
        raise ValueError("the goal graph has a cycle")
    return order


class Planner:
    """``plan_schedule`` with a cache: requests of one shape on one pool start from the same
    schedule, so only the first of them pays for planning (a few ms for CHORDS K=8, N=50, on
    the broker's path to its first EVAL). Only fresh requests (nothing run, every worker
    free) are cached; a schedule is reused when the graph and the workers' speed classes (their
    planned EVAL times to within ``CACHE_STEP``) are the same."""

    def __init__(self, size: int = CACHED_SCHEDULES) -> None:
        self.size = size
        self._cache: OrderedDict[tuple[int, tuple[int, ...]], Schedule] = OrderedDict()
        self.planned = 0  # schedules computed (not taken from the cache)

    def plan(
        self,
        graph: GoalGraph,
        finished: Mapping[Node, float],
        workers: Mapping[bytes, tuple[float, float]],
        now: float,
    ) -> Schedule | None:
        fresh = not finished and all(free <= now for _, free in workers.values())
        key = None
        if fresh and workers and min(seconds for seconds, _ in workers.values()) > 0:
            classed = speed_classes({who: seconds for who, (seconds, _) in workers.items()})
            steps = tuple(
                sorted(round(math.log(s) / math.log(CACHE_STEP)) for s in classed.values())
            )
            key = (graph.key, steps)
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached.moved(now, {who: seconds for who, (seconds, _) in workers.items()})
        schedule = plan_schedule(graph, finished, workers, now)
        self.planned += 1
        if key is not None and schedule is not None:
            self._cache[key] = schedule.moved(-now, schedule.speeds)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return schedule


def plan_schedule(
    graph: GoalGraph,
    finished: Mapping[Node, float],
    workers: Mapping[bytes, tuple[float, float]],
    now: float,
) -> Schedule | None:
    """The best schedule found for the tasks of ``graph`` not in ``finished`` (node -> when its
    result is in: done, or in flight until then) on ``workers`` (identity -> (expected EVAL
    seconds, when it is free)), from ``now``. None without workers, with nothing left to run
    or with a graph too large to schedule ahead.

    Tried: one list schedule by earliest finish time (each ready task, most urgent first, to
    the worker that would finish it soonest, waiting for a busy one if need be), and list
    schedules with deadlines for targets from the critical path up, half a fast EVAL apart,
    until the target passes the best makespan found. The shortest is kept."""
    remaining = [node for node in graph.parents if node not in finished]
    if not remaining or not workers or len(graph.parents) > MAX_NODES:
        return None
    speeds = {who: seconds for who, (seconds, _) in workers.items()}
    if min(speeds.values()) <= 0:
        return None
    classed = speed_classes(speeds)
    workers = {who: (classed[who], free) for who, (_, free) in workers.items()}
    unit = min(classed.values())
    makespan, slots = _list_schedule(graph, finished, workers, now, None, unit)
    best = (makespan, math.inf, slots)
    tries = 1
    if max(classed.values()) >= unit * SLOWER_RATIO:  # one class: nothing to decide
        critical = now + max(graph.rank[node] for node in remaining) * unit
        for step in range(min(MAX_TARGETS, max(1, PLAN_WORK // len(remaining) - 1))):
            target = critical + step * unit / 2
            if target > best[0] + 1e-9:
                break  # a later target only lets slow workers take more
            makespan, slots = _list_schedule(graph, finished, workers, now, target, unit)
            tries += 1
            if makespan < best[0] - 1e-9:
                best = (makespan, target, slots)
    return Schedule(best[2], best[0], best[1], speeds, tries)


def speed_classes(speeds: Mapping[bytes, float]) -> dict[bytes, float]:
    """Each worker's EVAL time as planned: the slowest of its class (workers sorted by speed,
    a class holding those within ``CLASS_SPREAD`` of its fastest)."""
    order = sorted(speeds, key=lambda who: (speeds[who], who))
    classes: list[list[bytes]] = []
    for who in order:
        if classes and speeds[who] <= speeds[classes[-1][0]] * (1 + CLASS_SPREAD):
            classes[-1].append(who)
        else:
            classes.append([who])
    return {who: speeds[group[-1]] for group in classes for who in group}


def _list_schedule(
    graph: GoalGraph,
    finished: Mapping[Node, float],
    workers: Mapping[bytes, tuple[float, float]],
    now: float,
    target: float | None,
    unit: float,
) -> tuple[float, dict[Node, Slot]]:
    """One list schedule (see ``plan_schedule``): by earliest finish time when ``target`` is
    None, else with deadlines for ``target``; (makespan, slots). Ties between tasks of equal
    rank and weight go to the fastest core (the highest), as in the session's queue."""
    pool = sorted(workers.items(), key=lambda item: (item[1][0], item[0]))
    seconds = [s for _, (s, _) in pool]
    free = [max(at, now) for _, (_, at) in pool]
    fast = [s < unit * SLOWER_RATIO for s in seconds]
    rank, weight = graph.rank, graph.weight
    waiting: dict[Node, int] = {}
    ready_at: dict[Node, float] = {}
    end: dict[Node, float] = dict(finished)
    for node, parents in graph.parents.items():
        if node not in finished:
            todo = [p for p in parents if p not in finished]
            waiting[node] = len(todo)
            if not todo:
                ready_at[node] = max((finished[p] for p in parents), default=now)
    slots: dict[Node, Slot] = {}

    def urgency(node: Node) -> tuple[int, int, int, int]:
        return (-rank[node], -weight[node], -node[0], node[1])

    def run(node: Node, w: int, t: float) -> None:
        del ready_at[node]
        free[w] = end[node] = t + seconds[w]
        slots[node] = Slot(t, seconds[w], pool[w][0])
        for child in graph.children[node]:
            if child in waiting:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready_at[child] = max(end[p] for p in graph.parents[child])

    t = now
    for _ in range(4 * (len(waiting) + len(pool)) + 16):  # each pass runs a task or moves time
        if len(slots) == len(waiting):
            break
        available = sorted((n for n, at in ready_at.items() if at <= t + 1e-12), key=urgency)
        if target is None:  # earliest finish time
            virtual = [max(f, t) for f in free]
            for node in available:
                w = min(range(len(pool)), key=lambda i: (virtual[i] + seconds[i], i))
                if virtual[w] > t + 1e-12:
                    virtual[w] += seconds[w]  # it waits for that worker
                else:
                    virtual[w] = t + seconds[w]
                    run(node, w, t)
        else:
            for w in range(len(pool)):  # the fastest first
                if not available:
                    break
                if free[w] > t + 1e-12:
                    continue
                if fast[w]:
                    node = available[0]
                else:  # only a task it finishes by the task's latest finish, the least urgent
                    finish = t + seconds[w] - unit / 2
                    eligible = [n for n in available if finish <= target - (rank[n] - 1) * unit]
                    if not eligible:
                        continue
                    node = eligible[-1]
                available.remove(node)
                run(node, w, t)
        later = [f for f in free if f > t + 1e-12] + [a for a in ready_at.values() if a > t + 1e-12]
        if not later:
            break
        t = min(later)
    if len(slots) < len(waiting):
        return math.inf, slots  # cannot happen: the fastest worker may take any task
    return max((end[node] for node in slots), default=now), slots


def bind_cores(
    cores: Sequence[int],
    hosts: Mapping[int, str],
    workers: Mapping[str, Sequence[bytes]],
    previous: Mapping[int, bytes],
) -> dict[int, bytes]:
    """The worker each core's chain is bound to for a request: each host's cores (``hosts``:
    core -> host, contiguous blocks) split into contiguous runs, one run per worker of the host
    (``workers``, in order of preference), as even as they divide. A core keeps its
    ``previous`` worker where that one is still of its host and its run has room, so a worker
    joining or leaving moves as few chains as it can. Cores of a host without workers are
    not bound."""
    bound: dict[int, bytes] = {}
    for host, theirs in workers.items():
        mine = [core for core in cores if hosts.get(core) == host]
        if not theirs or not mine:
            continue
        count, many = len(mine), len(theirs)
        # (the first workers take the longer runs, the last none when there are fewer cores)
        room = {w: -(-count * (i + 1) // many) + (-count * i // many) for i, w in enumerate(theirs)}
        for core in mine:
            kept = previous.get(core)
            if kept is not None and room.get(kept, 0) > 0:
                bound[core] = kept
                room[kept] -= 1
        places = [w for w in theirs for _ in range(room[w])]
        for core in mine:
            if core not in bound:
                bound[core] = places.pop(0)
    return bound
