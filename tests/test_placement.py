"""Scheduling a goal graph ahead (broker/placement.py): pure functions, exact fake time.

The figures these tests hold the planner to come from elsewhere: 20 fast rounds for CHORDS
K=8, N=50 (fastest core) on 4 fast and 4 three-times-slower workers is the optimum OR-Tools
CP-SAT finds for that graph (``benchmarks/placement_optimum.py``; the broker's placement one
task at a time by earliest finish time reached 21), and 17 rounds is the graph's critical
path."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from chords_mq.algorithms.chords import ChordsPlan
from chords_mq.algorithms.init_sequence import init_sequence
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.broker.placement import (
    GoalGraph,
    Planner,
    Schedule,
    Slot,
    _list_schedule,
    plan_schedule,
    speed_classes,
)


def goal(cores: int = 8, steps: int = 50, index: int = 1) -> GoalGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
        plan = ChordsPlan(torch.zeros(4), steps, init_sequence(cores, steps), CoreIndex(index))
    graph = plan.goal()
    assert graph is not None
    return GoalGraph.of(graph)


def pool(*seconds: float) -> dict[bytes, tuple[float, float]]:
    return {f"w{i}".encode(): (s, 0.0) for i, s in enumerate(seconds)}


def check(schedule: Schedule, graph: GoalGraph, finished: dict | None = None) -> None:
    """A schedule runs every task left once, after all it reads, one at a time per worker,
    for the worker's planned time."""
    finished = finished or {}
    assert set(schedule.slots) == set(graph.parents) - set(finished)
    end = dict(finished)
    for node, slot in schedule.slots.items():
        end[node] = slot.start + slot.budget
    for node, slot in schedule.slots.items():
        for parent in graph.parents[node]:
            assert slot.start >= end[parent] - 1e-9, (node, parent)
    by_worker: dict[bytes, list[Slot]] = {}
    for slot in schedule.slots.values():
        by_worker.setdefault(slot.worker, []).append(slot)
    for slots in by_worker.values():
        slots.sort(key=lambda s: s.start)
        for a, b in itertools.pairwise(slots):
            assert b.start >= a.start + a.budget - 1e-9
    assert schedule.makespan == pytest.approx(max(end[node] for node in schedule.slots))


def test_the_goal_graph_has_its_critical_path_and_successor_counts():
    graph = goal()
    assert len(graph.parents) == 73
    assert max(graph.rank.values()) == 17
    first = (1, 0)  # every task depends on core 1's first step
    assert graph.weight[first] == 72
    assert all(graph.weight[n] == 0 for n, children in graph.children.items() if not children)


def test_four_fast_and_four_slow_take_the_optimums_twenty_rounds():
    graph = goal()
    schedule = plan_schedule(graph, {}, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    assert schedule is not None
    check(schedule, graph)
    assert schedule.makespan == pytest.approx(20.0)
    slow = [slot for slot in schedule.slots.values() if slot.budget == 3.0]
    assert slow, "the slow workers take part"
    # a list schedule by earliest finish time alone loses rounds (22 here)
    eft, _ = _list_schedule(graph, {}, pool(*[1.0] * 4, *[3.0] * 4), 0.0, None, 1.0)
    assert eft >= 21.0


@pytest.mark.parametrize(
    "seconds",
    [
        [1.0] * 8,
        [1.0] * 7 + [5.0],
        [1.0] * 4 + [3.0] * 4,
        [1.0] * 3 + [2.0] * 3 + [4.0] * 2,
        [1.0] * 7 + [100.0],
        [0.0308] * 4 + [0.0908] * 4,
    ],
)
def test_every_schedule_is_valid_and_no_longer_than_placing_by_earliest_finish(seconds):
    graph = goal()
    schedule = plan_schedule(graph, {}, pool(*seconds), now=5.0)
    assert schedule is not None
    check(schedule, graph)
    unit = min(seconds)
    assert schedule.makespan >= 5.0 + 17 * unit - 1e-9  # the critical path
    eft, _ = _list_schedule(graph, {}, pool(*seconds), 5.0, None, unit)
    assert schedule.makespan <= eft + 1e-9


def test_a_uniform_pool_is_planned_once_at_the_critical_path():
    graph = goal()
    schedule = plan_schedule(graph, {}, pool(*[1.0] * 8), now=0.0)
    assert schedule is not None
    assert schedule.tries == 1  # one speed class: nothing to decide
    assert schedule.makespan == pytest.approx(17.0)


def test_a_very_slow_worker_is_left_out():
    graph = goal()
    schedule = plan_schedule(graph, {}, pool(*[1.0] * 7, 100.0), now=0.0)
    assert schedule is not None
    assert all(slot.worker != b"w7" for slot in schedule.slots.values())


def test_workers_within_the_spread_of_their_class_are_planned_at_its_slowest():
    classes = speed_classes({b"a": 0.0316, b"b": 0.032, b"c": 0.035, b"d": 0.092, b"e": 0.094})
    assert classes == {b"a": 0.035, b"b": 0.035, b"c": 0.035, b"d": 0.094, b"e": 0.094}
    assert speed_classes({b"a": 1.0, b"b": 2.0}) == {b"a": 1.0, b"b": 2.0}


def test_four_fast_workers_of_slightly_different_speeds_still_take_twenty_rounds():
    # one by one, 31.6 to 32.3 ms, a list schedule's ties fall another way and lose a round
    graph = goal()
    seconds = [0.0316, 0.032, 0.032, 0.0323, 0.0921, 0.0925, 0.0926, 0.0929]
    schedule = plan_schedule(graph, {}, pool(*seconds), now=0.0)
    assert schedule is not None
    check(schedule, graph)
    assert schedule.makespan == pytest.approx(20 * 0.0323)


def test_planning_again_mid_run_schedules_what_is_left_after_what_is_in_flight():
    graph = goal()
    order = sorted(graph.parents, key=lambda n: (n[1], n[0]))  # topological
    done = {node: 9.0 for node in order[:20]}
    running = next(n for n in order[20:] if all(p in done for p in graph.parents[n]))
    finished = {**done, running: 12.5}  # in flight until 12.5
    schedule = plan_schedule(graph, finished, pool(*[1.0] * 4, *[3.0] * 4), now=10.0)
    assert schedule is not None
    check(schedule, graph, finished)
    assert all(slot.start >= 10.0 for slot in schedule.slots.values())
    for child in graph.children[running]:
        assert schedule.slots[child].start >= 12.5


def test_nothing_left_or_no_workers_plans_nothing():
    graph = goal(cores=4)
    everything = dict.fromkeys(graph.parents, 0.0)
    assert plan_schedule(graph, everything, pool(1.0), now=0.0) is None
    assert plan_schedule(graph, {}, {}, now=0.0) is None


def test_a_schedule_allows_a_worker_up_to_its_class_and_fits_only_its_pool():
    graph = goal()
    workers = pool(*[1.0] * 4, *[3.0] * 4)
    schedule = plan_schedule(graph, {}, workers, now=0.0)
    assert schedule is not None
    fast = next(n for n, s in schedule.slots.items() if s.budget == 1.0)
    slow = next(n for n, s in schedule.slots.items() if s.budget == 3.0)
    assert schedule.allows(1.0, fast) and schedule.allows(1.0, slow)
    assert not schedule.allows(3.0, fast) and schedule.allows(3.0, slow)
    assert schedule.allows(50.0, (99, 99))  # not planned: anyone
    speeds = {w: s for w, (s, _) in workers.items()}
    assert schedule.fits(speeds)
    assert schedule.fits({**speeds, b"w0": 1.2})  # within the drift
    assert not schedule.fits({**speeds, b"w0": 1.3})
    assert not schedule.fits({w: s for w, s in speeds.items() if w != b"w7"})


def test_the_planner_reuses_a_fresh_schedule_for_the_same_shape_and_speed_classes():
    graph = goal()
    planner = Planner()
    first = planner.plan(graph, {}, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    others = {f"v{i}".encode(): (s, 100.0) for i, s in enumerate([1.01] * 4 + [3.0] * 4)}
    again = planner.plan(graph, {}, others, now=100.0)
    assert planner.planned == 1
    assert first is not None and again is not None
    assert again.makespan == pytest.approx(first.makespan + 100.0)
    for node, slot in again.slots.items():
        assert slot.start == pytest.approx(first.slots[node].start + 100.0)
        assert slot.worker in others
    check(again, graph)
    planner.plan(graph, {}, pool(*[1.0] * 4, *[2.0] * 4), now=0.0)  # other classes
    planner.plan(goal(cores=4), {}, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)  # another graph
    assert planner.planned == 3
    started = {(1, 0): 1.0}  # not fresh: planned, never cached
    planner.plan(graph, started, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    planner.plan(graph, started, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    assert planner.planned == 5


def test_the_cache_is_bounded():
    planner = Planner(size=2)
    graph = goal()
    for slow in (2.0, 3.0, 4.0):
        planner.plan(graph, {}, pool(1.0, slow), now=0.0)
    planner.plan(graph, {}, pool(1.0, 2.0), now=0.0)  # the oldest was dropped
    assert planner.planned == 4


def test_planning_work_is_bounded_on_large_graphs():
    """K=8, N=1000 (1327 tasks): at most about PLAN_WORK tasks placed over all tries, so a
    plan stays within tens of ms on the broker's loop; small graphs get every target."""
    from chords_mq.broker.placement import MAX_TARGETS, PLAN_WORK

    large = goal(steps=1000)
    schedule = plan_schedule(large, {}, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    assert schedule is not None
    check(schedule, large)
    assert schedule.tries >= 2 and schedule.tries * len(large.parents) <= PLAN_WORK
    small = plan_schedule(goal(), {}, pool(*[1.0] * 4, *[3.0] * 4), now=0.0)
    assert small is not None and small.tries <= MAX_TARGETS + 1
