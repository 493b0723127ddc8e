"""The best CHORDS can do across two hosts: the optimal schedule when a latent crossing hosts
takes its transfer time (issue 25's cross-host targets, against what any placement can reach).

``benchmarks/crosshost.py`` measures CHORDS K=8, N=50 to the fastest core (``core-index:1``) on
two hosts of 4 workers, 100 ms forwards, links shaped to 1 Gbit/s, and reports the measured
speedup over the round-speedup (2.94). This computes, for the same task graph
(``ChordsPlan.goal_graph``, as ``benchmarks/placement_optimum.py``) and the same pool, the
shortest makespan any placement has, with one cost added: a task whose parent ran on the other
host starts at least ``latent / bandwidth + round trip`` after that parent ends (the bytes must
cross the link). Everything else is free: a transfer within a host, the broker's round trip,
the solver's arithmetic, links shared by several transfers at once. So the figure is a lower
bound on the real makespan, and ``ideal / optimum`` an upper bound on the "speedup over
round-speedup" ratio any engine could measure there (ideal: the round-speedup's own time,
rounds x forward). CP-SAT (OR-Tools: ``pip install -e '.[research]'``; not a dependency of
chords-mq) solves it in units of 0.1 ms; a size whose optimum is not proven in the time limit
reports the best schedule found and the solver's proven bound, which is what the upper bound
on the ratio uses.

    python -m benchmarks.crosshost_optimum
    python -m benchmarks.crosshost_optimum --broker-only   # the simulator alone, no CP-SAT

Prints a table and writes benchmarks/results/crosshost_optimum.json (quoted by
docs/benchmarks.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.placement_optimum import UNIT_S, goal_graph, shortest
from chords_mq.apps.bench import machine_info
from chords_mq.broker.simulate import simulate
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "crosshost_optimum.json"
SIZES = {"64KiB": 1 << 16, "1MiB": 1 << 20, "4MiB": 1 << 22, "16MiB": 1 << 24}
LINK_BYTES_S = 938e6 / 8  # tbf at 1gbit, as measured on this machine (MACHINE-NOTES.md)
ROUND_TRIP_S = 0.0005  # one fetch's request and reply (the broker's assumption, broker/links.py)
# What ``optimum`` finds, kept from an earlier run by ``--broker-only``
FOUND = ("status", "optimum_s", "proven_bound_s", "crossings", "solve_s")


def optimum(
    graph: dict[tuple[int, int], list[tuple[int, int]]],
    forward_s: float,
    hosts: int,
    per_host: int,
    crossing_s: float,
    limit_s: float,
) -> dict[str, Any]:
    """The shortest makespan of ``graph`` on ``hosts`` x ``per_host`` workers of ``forward_s``
    each, an edge between hosts costing ``crossing_s``."""
    from ortools.sat.python import cp_model  # research only: pip install ortools

    length = max(1, round(forward_s / UNIT_S))
    delay = round(crossing_s / UNIT_S)
    horizon = len(graph) * (length + delay)
    model = cp_model.CpModel()
    nodes = sorted(graph, key=lambda n: (n[1], n[0]))  # topological (see ChordsPlan)
    start = {n: model.NewIntVar(0, horizon, "") for n in nodes}
    end = {n: model.NewIntVar(0, horizon, "") for n in nodes}
    host = {n: model.NewBoolVar("") for n in nodes}  # True: the second host
    lanes: list[list[Any]] = [[] for _ in range(hosts * per_host)]
    links: list[list[Any]] = [[] for _ in range(hosts)]  # each host's outgoing link
    for node in nodes:
        model.Add(end[node] == start[node] + length)
        choice = []
        for w in range(hosts * per_host):
            here = model.NewBoolVar("")
            lanes[w].append(model.NewOptionalIntervalVar(start[node], length, end[node], here, ""))
            choice.append(here)
        model.AddExactlyOne(choice)
        model.Add(host[node] == sum(choice[per_host:]))  # two hosts
        for parent in graph[node]:
            crossed = model.NewBoolVar("")
            model.Add(crossed >= host[node] - host[parent])
            model.Add(crossed >= host[parent] - host[node])
            model.Add(crossed <= host[node] + host[parent])
            model.Add(crossed <= 2 - host[node] - host[parent])
            # the crossing's transfer, on the sending host's link (one latent at a time)
            sent = model.NewIntVar(0, horizon, "")
            model.Add(sent >= end[parent])
            model.Add(start[node] >= sent + delay).OnlyEnforceIf(crossed)
            model.Add(start[node] >= end[parent])
            for side in range(hosts):
                on = model.NewBoolVar("")  # crossed, sent from ``side``
                model.AddBoolAnd(
                    [crossed, host[parent] if side else host[parent].Not()]
                ).OnlyEnforceIf(on)
                model.AddBoolOr(
                    [crossed.Not(), host[parent].Not() if side else host[parent]]
                ).OnlyEnforceIf(on.Not())
                links[side].append(model.NewOptionalFixedSizeIntervalVar(sent, delay, on, ""))
    for lane in [*lanes, *links]:
        model.AddNoOverlap(lane)
    model.Add(host[nodes[0]] == 0)  # the hosts are alike: the first task on the first
    solver, found = shortest(model, list(end.values()), horizon, limit_s)
    found["crossings"] = sum(
        1
        for node in nodes
        for parent in graph[node]
        if solver.Value(host[node]) != solver.Value(host[parent])
    )
    return found


def placed(
    size: int, forward_s: float, per_host: int, cores: int, steps: int, jitter: float, seeds: int
) -> dict[str, Any]:
    """The broker's own placement on the same pool in the simulator (``broker.simulate``: the
    real BrokerCore on a fake clock; the same link, transfers within a host free, as in the
    optimum), each EVAL up to ``jitter`` longer at random: median makespan and crossings over
    ``seeds`` seeds."""
    spec = RequestSpec("synthetic", cores=cores, exact_cores=True, stop="core-index:1", steps=steps)
    runs = [
        simulate(
            [forward_s] * (2 * per_host),
            spec,
            jitter=jitter,
            seed=seed,
            hosts=["a"] * per_host + ["b"] * per_host,
            latent_bytes=size,
            between_bytes_s=LINK_BYTES_S,
            within_bytes_s=1e15,
            latency_s=ROUND_TRIP_S,
        )
        for seed in range(seeds)
    ]
    sequential = RequestSpec("synthetic", method="sequential", steps=steps)
    alone = [  # sequential with the same jitter: what the measured ratio divides
        simulate([forward_s], sequential, jitter=jitter, seed=seed).done_s for seed in range(seeds)
    ]
    ratios = sorted(
        seq / run.done_s / (steps / run.critical_rounds)
        for seq, run in zip(alone, runs, strict=True)
    )
    done = sorted(r.done_s for r in runs)
    return {
        "done_s": [round(d, 3) for d in done],
        "crossings": sorted(r.between_hosts for r in runs),
        "median_s": round(done[len(done) // 2], 3),
        "ratios": [round(r, 3) for r in ratios],
        "median_ratio": round(ratios[len(ratios) // 2], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"of {', '.join(SIZES)}")
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--hosts", type=int, default=2, choices=[2])
    parser.add_argument("--workers-per-host", type=int, default=4)
    parser.add_argument("--limit-s", type=float, default=60.0, help="solver time per size")
    parser.add_argument("--seeds", type=int, default=4, help="simulator seeds per jitter")
    parser.add_argument("--jitters", default="0,0.1", help="the simulator's EVAL jitters")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--broker-only",
        action="store_true",
        help="no CP-SAT: the optimum of each size from --out's last run, the broker's "
        "placement in the simulator again (its figures there kept as sim_jitter_*_before)",
    )
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    if any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: choose from {list(SIZES)}")
    graph = goal_graph(args.cores, args.steps)
    forward_s = args.latency_ms / 1000
    depth: dict[tuple[int, int], int] = {}
    for node in sorted(graph, key=lambda n: (n[1], n[0])):
        depth[node] = 1 + max((depth[p] for p in graph[node]), default=0)
    rounds = max(depth.values())
    ideal = rounds * forward_s
    print(
        f"K={args.cores}, N={args.steps}, core-index:1: {len(graph)} tasks, {rounds} rounds "
        f"(round-speedup {args.steps / rounds:.2f}, ideal {ideal:.2f} s); "
        f"{args.hosts} hosts x {args.workers_per_host} workers of {args.latency_ms:g} ms"
    )
    print(
        f"{'latent':>7s} {'crossing':>9s} {'optimum':>8s} {'proven':>7s} {'cross':>6s}"
        " ratio (bound)"
    )
    rows = []
    earlier: dict[str, dict[str, Any]] = {}
    if args.broker_only:
        if not args.out.exists():
            parser.error(f"--broker-only reads the optima from {args.out}: run without it first")
        last = json.loads(args.out.read_text())
        earlier = {row["latent"]: row for row in last["rows"]}
        args.limit_s = last["limit_s"]  # what the optima kept were solved under
        if any(size not in earlier for size in sizes):
            parser.error(f"--broker-only: {args.out} has no optimum for some of {sizes}")
    for size in sizes:
        crossing = SIZES[size] / LINK_BYTES_S + ROUND_TRIP_S
        if args.broker_only:
            kept = earlier[size]
            best = {k: v for k, v in kept.items() if k in FOUND}
            best.update(
                {
                    f"{k}_before": v
                    for k, v in kept.items()
                    if k.startswith("sim_jitter") and not k.endswith("_before")
                }
            )
        else:
            best = optimum(
                graph, forward_s, args.hosts, args.workers_per_host, crossing, args.limit_s
            )
        row = {
            "latent": size,
            "latent_bytes": SIZES[size],
            "crossing_s": round(crossing, 4),
            **best,
            "ideal_s": round(ideal, 4),
            # what the best schedule found reaches (a placement that exists) ...
            "schedule_speedup_over_round_speedup": round(ideal / best["optimum_s"], 3),
            # ... and what no engine can pass on this pool (the solver's proven bound)
            "max_speedup_over_round_speedup": round(ideal / best["proven_bound_s"], 3),
        }
        rows.append(row)
        print(
            f"{size:>7s} {crossing * 1000:7.1f}ms {best['optimum_s']:7.3f}s "
            f"{best['proven_bound_s']:6.3f}s {best['crossings']:6d} "
            f"{row['schedule_speedup_over_round_speedup']:.3f} "
            f"(<= {row['max_speedup_over_round_speedup']:.3f}, {best['status'].lower()})",
            flush=True,
        )
        for jitter in (float(j) for j in args.jitters.split(",") if j):
            sim = placed(
                SIZES[size],
                forward_s,
                args.workers_per_host,
                args.cores,
                args.steps,
                jitter,
                args.seeds,
            )
            row[f"sim_jitter_{jitter:g}"] = sim
            print(
                f"        the broker's placement, jitter {jitter:g}: median {sim['median_s']:.3f}"
                f" s, ratio {sim['median_ratio']:.3f} (seeds {sim['ratios']}), crossings "
                f"{sim['crossings']}",
                flush=True,
            )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "cores": args.cores,
        "steps": args.steps,
        "latency_ms": args.latency_ms,
        "hosts": args.hosts,
        "workers_per_host": args.workers_per_host,
        "link_bytes_s": LINK_BYTES_S,
        "round_trip_s": ROUND_TRIP_S,
        "tasks": len(graph),
        "rounds": rounds,
        "limit_s": args.limit_s,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
