"""How far placement is from the best schedule there is, on the mixed-pool benchmark's pools.

The simulator's lower bound, ``max(critical path on the fastest worker, total work / total
speed)``, ignores that a task can only start once its inputs exist. This computes the optimum
itself: the shortest makespan of the tasks the returned hit depends on (``ChordsPlan.goal_graph``
for CHORDS K, N=50, ``core-index:1``), on the pool's workers, each task on one worker for its
forward time plus the transport's round trip, a task starting only after every task it reads,
and at most K workers used (a request of K cores is served by at most K). A constraint solver
(OR-Tools CP-SAT, a research tool and no dependency of chords-mq: ``pip install -e
'.[research]'``) solves it in units of 0.1 ms, with a time limit per pool. A pool whose optimum
is not proven in time reports the best schedule found and the best lower bound known: the
solver's own, or the window bound (``window_bound``), which proves the schedule optimal when
they meet.

Reported per pool: the defined lower bound, the optimum, the simulator's ``eft`` time and the
real median time from benchmarks/results/mixed_pool.json (the same commit's run), each as a
ratio to the optimum. Prints a table and writes benchmarks/results/placement_optimum.json (quoted
by docs/benchmarks.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.mixed_pool import POOLS
from benchmarks.mixed_pool import RESULTS as MIXED
from chords_mq.algorithms.chords import ChordsPlan
from chords_mq.algorithms.init_sequence import init_sequence
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.apps.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "placement_optimum.json"
UNIT_S = 1e-4  # the solver's time unit: 0.1 ms


def goal_graph(cores: int, steps: int = 50) -> dict[tuple[int, int], list[tuple[int, int]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
        plan = ChordsPlan(torch.zeros(4), steps, init_sequence(cores, steps))
    graph = plan.goal_graph(CoreIndex(1))
    assert graph is not None
    return graph


def optimum(
    graph: dict[tuple[int, int], list[tuple[int, int]]],
    seconds: list[float],
    cores: int,
    limit_s: float,
) -> dict[str, Any]:
    from ortools.sat.python import cp_model  # research only: pip install ortools

    durations = [max(1, round(s / UNIT_S)) for s in seconds]
    horizon = len(graph) * max(durations)
    model = cp_model.CpModel()
    nodes = list(graph)
    start = {n: model.NewIntVar(0, horizon, "") for n in nodes}
    end = {n: model.NewIntVar(0, horizon, "") for n in nodes}
    used = [model.NewBoolVar("") for _ in durations]
    lanes: list[list[Any]] = [[] for _ in durations]
    for node in nodes:
        choice = []
        for w, length in enumerate(durations):
            here = model.NewBoolVar("")
            lanes[w].append(model.NewOptionalIntervalVar(start[node], length, end[node], here, ""))
            model.AddImplication(here, used[w])
            choice.append(here)
        model.AddExactlyOne(choice)
        for parent in graph[node]:
            model.Add(start[node] >= end[parent])
    for lane in lanes:
        model.AddNoOverlap(lane)
    model.Add(sum(used) <= cores)
    return shortest(model, list(end.values()), horizon, limit_s)[1]


def shortest(
    model: Any, ends: list[Any], horizon: int, limit_s: float
) -> tuple[Any, dict[str, Any]]:
    """Minimize the latest of ``ends`` on ``model`` (CP-SAT, ``limit_s``, 2 threads): the
    solver (for the schedule's values) and what it found, in seconds."""
    from ortools.sat.python import cp_model  # research only: pip install ortools

    makespan = model.NewIntVar(0, horizon, "")
    model.AddMaxEquality(makespan, ends)
    model.Minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = limit_s
    solver.parameters.num_workers = 2
    began = time.perf_counter()
    status = solver.Solve(model)
    return solver, {
        "status": solver.StatusName(status),
        "optimum_s": round(solver.ObjectiveValue() * UNIT_S, 4),
        "proven_bound_s": round(solver.BestObjectiveBound() * UNIT_S, 4),
        "solve_s": round(time.perf_counter() - began, 1),
    }


def window_bound(
    graph: dict[tuple[int, int], list[tuple[int, int]]],
    seconds: list[float],
    cores: int,
) -> float:
    """A lower bound on the makespan that counts precedence (energetic reasoning): for a
    makespan T, a task cannot start before its chain of ancestors has run on the fastest worker,
    nor end later than T minus its chain of descendants there; the tasks whose whole window lies
    in [a, b] must fit in what the ``cores`` best workers can complete inside [a, b] (worker w:
    floor((b - a) / its time) tasks). The smallest T (in solver units) for which every window
    fits, found by bisection."""
    durations = sorted(max(1, round(s / UNIT_S)) for s in seconds)
    fastest = durations[0]
    children: dict[tuple[int, int], list[tuple[int, int]]] = {n: [] for n in graph}
    for node, parents in graph.items():
        for parent in parents:
            children[parent].append(node)
    order = sorted(graph, key=lambda n: (n[1], n[0]))  # topological (see ChordsPlan)
    depth: dict[tuple[int, int], int] = {}
    for node in order:
        depth[node] = 1 + max((depth[p] for p in graph[node]), default=0)
    rank: dict[tuple[int, int], int] = {}
    for node in reversed(order):
        rank[node] = 1 + max((rank[c] for c in children[node]), default=0)

    def fits(makespan: int) -> bool:
        release = {n: (depth[n] - 1) * fastest for n in graph}
        deadline = {n: makespan - (rank[n] - 1) * fastest for n in graph}
        for a in sorted(set(release.values())):
            inside = [deadline[n] for n in graph if release[n] >= a]
            for b in sorted(set(inside)):
                count = sum(1 for d in inside if d <= b)
                room = sorted(((b - a) // d for d in durations), reverse=True)[:cores]
                if count > sum(room):
                    return False
        return True

    low = max(rank.values()) * fastest  # the critical path: always a bound, maybe not enough
    high = len(graph) * durations[-1]
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low * UNIT_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-s", type=float, default=60.0, help="solver time per pool")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    measured = json.loads(MIXED.read_text())
    overhead = measured["transport_overhead_ms"] / 1000
    rows: dict[str, Any] = {}
    print(
        f"{'pool':36s} {'bound':>6s} {'proven':>7s} {'optimum':>8s} {'sim':>6s} {'real':>6s}"
        "  real/opt"
    )
    for name, (latencies, cores) in POOLS.items():
        pool = measured["pools"].get(name)
        if pool is None:
            continue
        graph = goal_graph(cores)
        seconds = [ms / 1000 + overhead for ms in latencies]
        best = optimum(graph, seconds, cores, args.limit_s)
        proven = max(best["proven_bound_s"], round(window_bound(graph, seconds, cores), 4))
        best["proven_bound_s"] = proven
        if best["optimum_s"] <= proven + UNIT_S:  # the schedule found meets a lower bound
            best["status"] = "OPTIMAL"
        real, sim = pool["eft"]["median_s"], pool["sim_eft_s"]
        row = {
            "latencies_ms": latencies,
            "cores": cores,
            "tasks": len(graph),
            "lower_bound_s": pool["lower_bound_s"],
            **best,
            "sim_eft_s": sim,
            "real_eft_s": real,
            "sim_vs_optimum": round(sim / best["optimum_s"], 3),
            "real_vs_optimum": round(real / best["optimum_s"], 3),
            "optimum_vs_bound": round(best["optimum_s"] / pool["lower_bound_s"], 3),
        }
        rows[name] = row
        print(
            f"{name:36s} {row['lower_bound_s']:6.3f} {row['proven_bound_s']:7.3f} "
            f"{row['optimum_s']:8.3f} {sim:6.3f} "
            f"{real:6.3f}  {row['real_vs_optimum']:.2f} ({best['status'].lower()})",
            flush=True,
        )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "transport_overhead_ms": measured["transport_overhead_ms"],
        "limit_s": args.limit_s,
        "pools": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
