"""Mixed pools: real daemons with per-worker forward times, against the simulator.

For each pool (synthetic workers, each with its own ``--latency-ms``), CHORDS K=8 (K=4 where the
pool says so), N=50, stopped at the fastest core (``core-index:1``), runs ``--repeats`` times after
one warm-up request (the broker learns each worker's speed), under the broker's placement by
earliest finish time (``eft``) and, for comparison, the older FIFO placement (``--placement
fifo``). Reported per pool:

- the median time to the returned hit;
- the same pool in ``chords_mq.broker.simulate`` (the real BrokerCore on simulated workers),
  whose every EVAL also costs the transport's round trip, measured first on one worker whose
  forward takes no time (a sequential request: wall time / steps);
- FIFO simulated in 16 orders in which the workers register: which worker is idle first decides
  FIFO, and in a real pool that is timing. Its simulated median and range, and whether every real
  FIFO run lies in that range, give or take 15%;
- the barrier-synchronous time (every round waits for the slowest worker);
- the lower bound ``max(critical path on the fastest worker, total work / total speed)`` of the
  bare forward times, and the same bound where every EVAL also costs the transport's round trip
  (the simulator's, as it is run next to the real pool; ``benchmarks/placement_optimum.py``
  computes the optimum itself);
- whether every run's hits are bitwise those of the uniform pool of the same K.

A last pool holds a worker whose every forward hangs while it heartbeats (``--fault hang``): every
request must finish, and the broker's log says after how long that worker was found late, against
its expected forward time.

Prints a table and writes benchmarks/results/mixed_pool.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.broker.simulate import simulate
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_pool.json"
SPEC = RequestSpec(model="synthetic", steps=50, cores=8, stop="core-index:1", seed=11)
HANG = "7 fast + 1 that hangs"
# name -> (forward time of each worker in ms, K); the first pool of each K is its reference
POOLS: dict[str, tuple[list[float], int]] = {
    "8 fast (30 ms)": ([30.0] * 8, 8),
    "7 fast": ([30.0] * 7, 8),
    "7 fast + 1 slow (150 ms)": ([30.0] * 7 + [150.0], 8),
    "4 fast + 4 slow (90 ms)": ([30.0] * 4 + [90.0] * 4, 8),
    "8 slow (90 ms)": ([90.0] * 8, 8),
    "3 classes: 3x30 + 3x60 + 2x120 ms": ([30.0] * 3 + [60.0] * 3 + [120.0] * 2, 8),
    "7 x 20 ms": ([20.0] * 7, 8),
    "7 x 20 ms + 1 x 2000 ms": ([20.0] * 7 + [2000.0], 8),
    "K=4: 4 fast": ([30.0] * 4, 4),
    "K=4: 4 fast + 1 slow (150 ms)": ([30.0] * 4 + [150.0], 4),
    "K=4: 4 fast + 1 slow (90 ms)": ([30.0] * 4 + [90.0], 4),
}
# FIFO is simulated in this many registration orders (the identity order and ORDERS - 1 shuffles)
ORDERS = 16
# a real FIFO run agrees with the simulated spread if it lies within it, give or take this
SPREAD = 0.15
LATE = re.compile(r"is late: (\d+) ms on an EVAL it should finish in (\d+) ms")


@contextlib.contextmanager
def quiet_broker() -> Iterator[None]:
    """The simulated broker's log (slow workers found late) is not this benchmark's output."""
    logger = logging.getLogger("chords.broker")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def digests(hits: list[Any]) -> list[tuple[int, int, str]]:
    return [
        (h.core, h.round, hashlib.sha256(h.latent.contiguous().numpy().tobytes()).hexdigest())
        for h in hits
    ]


async def timed(address: str, spec: RequestSpec) -> tuple[float, list[Any]]:
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        hits = [hit async for hit in client.submit(spec, timeout=300)]
        return time.perf_counter() - started, hits


def run_pool(
    latencies: list[float],
    spec: RequestSpec,
    placement: str,
    repeats: int,
    log_dir: Path,
    hang: int = 0,
) -> dict[str, Any]:
    """``repeats`` timed runs of ``spec`` on the pool, plus ``hang`` workers that hang."""
    cluster = LocalCluster(
        workers=0,
        log_dir=log_dir,
        extra_broker_args=["--placement", placement],
    )
    cluster.start_broker()
    try:
        for latency in latencies:
            cluster.start_worker(latency_ms=latency)
        for _ in range(hang):
            cluster.start_worker(latency_ms=latencies[0], extra_args=["--fault", "hang"])
        cluster.wait_for_workers(len(latencies) + hang, timeout=120)
        warm = RequestSpec(model="synthetic", steps=20, cores=len(latencies) + hang, seed=1)
        asyncio.run(timed(cluster.client_address, warm))  # the broker learns every speed
        times, runs = [], []
        for _ in range(repeats):
            seconds, hits = asyncio.run(timed(cluster.client_address, spec))
            times.append(seconds)
            runs.append(digests(hits))
        states = [w["state"] for w in asyncio.run(status(cluster.client_address))["workers"]]
        return {
            "times_s": times,
            "median_s": statistics.median(times),
            "digests": runs,
            "states": sorted(states),
        }
    finally:
        cluster.stop()


async def status(address: str) -> dict[str, Any]:
    async with AsyncClient(address) as client:
        return await client.status()


def transport_overhead(log_dir: Path, steps: int = 50) -> float:
    """Seconds per EVAL that are not the forward: a sequential request on one worker whose
    forward takes no time (after a warm-up), median of 3, divided by its steps."""
    cluster = LocalCluster(workers=0, log_dir=log_dir)
    cluster.start_broker()
    try:
        cluster.start_worker(latency_ms=0.0)
        cluster.wait_for_workers(1, timeout=120)
        spec = RequestSpec(model="synthetic", method="sequential", steps=steps, seed=1)
        asyncio.run(timed(cluster.client_address, spec))
        runs = [asyncio.run(timed(cluster.client_address, spec))[0] for _ in range(3)]
        return statistics.median(runs) / steps
    finally:
        cluster.stop()


def hang_pool(repeats: int, log_dir: Path) -> dict[str, Any]:
    """7 fast workers and one whose forwards hang: times, states, and how late it was found."""
    measured = run_pool([30.0] * 7, SPEC, "eft", repeats, log_dir, hang=1)
    lines = (log_dir / "broker.log").read_text(errors="replace")
    late = [(int(a), int(b)) for a, b in LATE.findall(lines)]
    measured["late_ms"] = late  # (in flight when found late, its expected forward time)
    measured["late_factor"] = max((a / b for a, b in late if b), default=None)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pools", nargs="*", default=None, help="names of POOLS to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.pools if args.pools is not None else list(POOLS)
    rows: dict[str, Any] = {}
    references: dict[int, list[tuple[int, int, str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        overhead = transport_overhead(Path(tmp) / "overhead")
        print(f"transport round trip per EVAL: {overhead * 1000:.2f} ms", flush=True)
        for name in names:
            latencies, cores = POOLS[name]
            spec = replace(SPEC, cores=cores)
            seconds = [ms / 1000 for ms in latencies]
            with warnings.catch_warnings(), quiet_broker():
                warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
                sim = simulate(seconds, spec, "eft", overhead_s=overhead)
                # FIFO's outcome depends on who registers (is idle, is asked) first: its
                # spread over ORDERS registration orders, the identity order first
                fifo_runs = [
                    simulate(seconds, spec, "fifo", overhead_s=overhead, seed=seed).done_s
                    for seed in range(ORDERS)
                ]
                bare = simulate(seconds, spec, "eft")
            row: dict[str, Any] = {
                "latencies_ms": latencies,
                "cores": cores,
                "sim_eft_s": round(sim.done_s, 4),
                "sim_fifo_s": round(statistics.median(fifo_runs), 4),
                "sim_fifo_range_s": [round(min(fifo_runs), 4), round(max(fifo_runs), 4)],
                "sim_eft_bare_s": round(bare.done_s, 4),
                "barrier_s": round(bare.barrier_s, 4),
                "lower_bound_s": round(bare.lower_bound_s, 4),
                # the same bound in the simulator that counts the transport's round trip
                "lower_bound_transport_s": round(sim.lower_bound_s, 4),
            }
            for placement in ("eft", "fifo"):
                measured = run_pool(latencies, spec, placement, args.repeats, Path(tmp) / name[:8])
                reference = references.setdefault(cores, measured["digests"][0])
                row[placement] = {
                    "median_s": round(measured["median_s"], 4),
                    "times_s": [round(t, 4) for t in measured["times_s"]],
                    "bitwise_uniform": all(d == reference for d in measured["digests"]),
                }
            row["eft_vs_sim"] = round(row["eft"]["median_s"] / sim.done_s, 3)
            row["fifo_vs_sim"] = round(row["fifo"]["median_s"] / row["sim_fifo_s"], 3)
            low, high = row["sim_fifo_range_s"]
            row["fifo_in_sim_range"] = all(
                low * (1 - SPREAD) <= t <= high * (1 + SPREAD) for t in row["fifo"]["times_s"]
            )
            row["eft_vs_bound"] = round(row["eft"]["median_s"] / bare.lower_bound_s, 3)
            row["eft_vs_bound_transport"] = round(row["eft"]["median_s"] / sim.lower_bound_s, 3)
            rows[name] = row
            print(
                f"{name:36s} eft {row['eft']['median_s']:.3f} s (sim {row['sim_eft_s']:.3f})  "
                f"fifo {row['fifo']['median_s']:.3f} s (sim {low:.3f} to {high:.3f})  "
                f"barrier {row['barrier_s']:.3f}  bound {row['lower_bound_s']:.3f}  "
                f"bitwise {row['eft']['bitwise_uniform'] and row['fifo']['bitwise_uniform']}",
                flush=True,
            )
        hung = hang_pool(args.repeats, Path(tmp) / "hang")
        reference = references.get(8)
        rows[HANG] = {
            "latencies_ms": [30.0] * 7 + ["hang"],
            "cores": 8,
            "eft": {
                "median_s": round(hung["median_s"], 4),
                "times_s": [round(t, 4) for t in hung["times_s"]],
                "bitwise_uniform": reference is not None
                and all(d == reference for d in hung["digests"]),
            },
            "states": hung["states"],
            "late_ms": hung["late_ms"],
            "late_factor": None if hung["late_factor"] is None else round(hung["late_factor"], 3),
        }
        print(
            f"{HANG:36s} eft {hung['median_s']:.3f} s  states {hung['states']}  found late at "
            f"{hung['late_factor']}x its expected forward  {hung['late_ms']}",
            flush=True,
        )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "spec": SPEC.to_dict(),
        "repeats": args.repeats,
        "transport_overhead_ms": round(overhead * 1000, 3),
        "pools": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
