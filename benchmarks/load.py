"""Many requests at once: the broker's cores policy under load, on real daemons.

A pool of synthetic workers (``--workers``, each ``--latency-ms`` per forward) serves CHORDS
requests of N=``--steps`` run to completion (every core's hit). Three ways to serve them:

- ``fixed K=8``: the broker grants what is asked (``--cores-policy fixed``), requests ask K=8;
- ``fixed K=1``: the same broker, requests ask K=1 (the sequential solve);
- ``adaptive``: the default broker (``--cores-policy adaptive``), requests ask K=8 and get about
  workers / requests while others share the pool.

Measured per way, all in the same run, as two latencies per request from its submission: to its
first core's hit (the fastest core: what CHORDS speeds up) and to DONE (every core's hit; core 1,
the sequential solve, comes last):

- a lone request on the idle pool (median of 3);
- a burst: ``--burst`` requests submitted at once (mean and p95);
- open-loop arrivals (Poisson, seeded) at 25%, 50%, 100% and 150% of the pool's sequential
  capacity, ``workers / (steps x latency)`` requests per second, ``--requests`` per level.

Prints a table and writes benchmarks/results/load.json (quoted by docs/benchmarks.md). Not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
WAYS = {  # name -> (broker cores policy, the K requests ask for)
    "fixed K=8": ("fixed", 8),
    "fixed K=1": ("fixed", 1),
    "adaptive": ("adaptive", 8),
}
LEVELS = (0.25, 0.5, 1.0, 1.5)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def one(client: AsyncClient, spec: RequestSpec, delay: float) -> tuple[float, float, int]:
    """Submit ``spec`` after ``delay`` seconds; (seconds to its first core's hit, to DONE,
    the cores granted)."""
    await asyncio.sleep(delay)
    started = time.perf_counter()
    first = None
    stream = client.submit(spec, timeout=600)
    async for hit in stream:
        if first is None and hit.core != 0:  # the zero-th hit is a coarse jump, not a core
            first = time.perf_counter() - started
    done = time.perf_counter() - started
    granted = (stream.accepted or {}).get("cores", spec.resolved_cores())
    return done if first is None else first, done, int(granted)


async def arrivals(address: str, specs: list[RequestSpec], delays: list[float]) -> dict[str, Any]:
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(one(client, s, d) for s, d in zip(specs, delays)))
        makespan = time.perf_counter() - started
    firsts = [first for first, _, _ in done]
    latencies = [seconds for _, seconds, _ in done]
    return {
        "mean_s": round(statistics.mean(latencies), 4),
        "p95_s": round(p95(latencies), 4),
        "first_hit_mean_s": round(statistics.mean(firsts), 4),
        "first_hit_p95_s": round(p95(firsts), 4),
        "makespan_s": round(makespan, 4),
        "granted_cores": [cores for _, _, cores in done],
    }


def serve(args: argparse.Namespace, policy: str, cores: int, log_dir: Path) -> dict[str, Any]:
    cluster = LocalCluster(
        workers=args.workers,
        latency_ms=args.latency_ms,
        log_dir=log_dir,
        extra_broker_args=["--cores-policy", policy],
    )
    cluster.start()
    try:
        address = cluster.client_address

        def spec(seed: int) -> RequestSpec:
            return RequestSpec(model="synthetic", steps=args.steps, cores=cores, seed=seed)

        asyncio.run(arrivals(address, [spec(0)], [0.0]))  # warm-up: the broker learns speeds
        lone = [asyncio.run(arrivals(address, [spec(1)], [0.0])) for _ in range(3)]
        row: dict[str, Any] = {
            "lone": {
                key: statistics.median(run[key] for run in lone)
                for key in ("mean_s", "first_hit_mean_s")
            }
        }
        burst = [spec(100 + i) for i in range(args.burst)]
        row["burst"] = asyncio.run(arrivals(address, burst, [0.0] * args.burst))
        capacity = args.workers / (args.steps * args.latency_ms / 1000)  # requests per second
        rng = random.Random(7)
        for level in LEVELS:
            rate = level * capacity
            gaps = [rng.expovariate(rate) for _ in range(args.requests)]
            delays = [sum(gaps[:i]) for i in range(args.requests)]
            specs = [spec(1000 + i) for i in range(args.requests)]
            measured = asyncio.run(arrivals(address, specs, delays))
            row[f"{round(level * 100)}%"] = {**measured, "rate_per_s": round(rate, 3)}
        return row
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--requests", type=int, default=24, help="requests per load level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (policy, cores) in WAYS.items():
            row = rows[name] = serve(args, policy, cores, Path(tmp) / policy)
            levels = "  ".join(
                f"{key} {row[key]['mean_s']:.2f}/{row[key]['p95_s']:.2f}"
                f" (first {row[key]['first_hit_mean_s']:.2f})"
                for key in [f"{round(level * 100)}%" for level in LEVELS]
            )
            print(
                f"{name:10s} lone {row['lone']['mean_s']:.3f} s (first hit "
                f"{row['lone']['first_hit_mean_s']:.3f})  burst of {args.burst}: mean "
                f"{row['burst']['mean_s']:.2f} s p95 {row['burst']['p95_s']:.2f} s (first hit "
                f"{row['burst']['first_hit_mean_s']:.2f})  open loop done mean/p95 s: {levels}",
                flush=True,
            )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "workers": args.workers,
        "latency_ms": args.latency_ms,
        "steps": args.steps,
        "burst": args.burst,
        "requests_per_level": args.requests,
        "ways": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
