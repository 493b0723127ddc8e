"""Mixed pools: real daemons with per-worker forward times, against the simulator.

For each pool (synthetic workers, each with its own ``--latency-ms``), CHORDS K=8, N=50, stopped
at the fastest core (``core-index:1``), runs ``--repeats`` times after one warm-up request (the
broker learns each worker's speed), under the broker's placement by earliest finish time
(``eft``) and, for comparison, the older FIFO placement (``--placement fifo``). Reported per pool:
the median time to the returned hit, the same pool in ``broker.simulate`` (the real BrokerCore on
simulated workers), the barrier-synchronous time (every round waits for the slowest worker) and
the lower bound ``max(critical path on the fastest worker, total work / total speed)``, and
whether every run's hits are bitwise those of the uniform pool.

Prints a table and writes benchmarks/results/mixed_pool.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from broker.simulate import simulate
from chords_mq.bench import machine_info
from chords_mq.client import AsyncClient
from chords_mq.cluster import LocalCluster
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_pool.json"
SPEC = RequestSpec(model="synthetic", steps=50, cores=8, stop="core-index:1", seed=11)
POOLS: dict[str, list[float]] = {
    "8 fast (30 ms)": [30.0] * 8,
    "7 fast": [30.0] * 7,
    "7 fast + 1 slow (150 ms)": [30.0] * 7 + [150.0],
    "4 fast + 4 slow (90 ms)": [30.0] * 4 + [90.0] * 4,
    "8 slow (90 ms)": [90.0] * 8,
    "3 classes: 3x30 + 3x60 + 2x120 ms": [30.0] * 3 + [60.0] * 3 + [120.0] * 2,
    "7 x 20 ms": [20.0] * 7,
    "7 x 20 ms + 1 x 2000 ms": [20.0] * 7 + [2000.0],
}


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


def run_pool(latencies: list[float], placement: str, repeats: int, log_dir: Path) -> dict[str, Any]:
    cluster = LocalCluster(
        workers=0,
        log_dir=log_dir,
        extra_broker_args=["--placement", placement],
    )
    cluster.start_broker()
    try:
        for latency in latencies:
            cluster.start_worker(latency_ms=latency)
        cluster.wait_for_workers(len(latencies), timeout=120)
        warm = RequestSpec(model="synthetic", steps=20, cores=len(latencies), seed=1)
        asyncio.run(timed(cluster.client_address, warm))  # the broker learns every speed
        times, runs = [], []
        for _ in range(repeats):
            seconds, hits = asyncio.run(timed(cluster.client_address, SPEC))
            times.append(seconds)
            runs.append(digests(hits))
        return {"times_s": times, "median_s": statistics.median(times), "digests": runs}
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pools", nargs="*", default=None, help="names of POOLS to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.pools or list(POOLS)
    rows: dict[str, Any] = {}
    reference: list[tuple[int, int, str]] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            latencies = POOLS[name]
            seconds = [ms / 1000 for ms in latencies]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
                sim = simulate(seconds, SPEC, "eft")
                sim_fifo = simulate(seconds, SPEC, "fifo")
            row: dict[str, Any] = {
                "latencies_ms": latencies,
                "sim_eft_s": round(sim.done_s, 4),
                "sim_fifo_s": round(sim_fifo.done_s, 4),
                "barrier_s": round(sim.barrier_s, 4),
                "lower_bound_s": round(sim.lower_bound_s, 4),
            }
            for placement in ("eft", "fifo"):
                measured = run_pool(latencies, placement, args.repeats, Path(tmp) / name[:8])
                if reference is None:
                    reference = measured["digests"][0]
                row[placement] = {
                    "median_s": round(measured["median_s"], 4),
                    "times_s": [round(t, 4) for t in measured["times_s"]],
                    "bitwise_uniform": all(d == reference for d in measured["digests"]),
                }
            rows[name] = row
            print(
                f"{name:36s} eft {row['eft']['median_s']:.3f} s (sim {row['sim_eft_s']:.3f})  "
                f"fifo {row['fifo']['median_s']:.3f} s (sim {row['sim_fifo_s']:.3f})  "
                f"barrier {row['barrier_s']:.3f}  bound {row['lower_bound_s']:.3f}  "
                f"bitwise {row['eft']['bitwise_uniform'] and row['fifo']['bitwise_uniform']}",
                flush=True,
            )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "spec": SPEC.to_dict(),
        "repeats": args.repeats,
        "pools": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
