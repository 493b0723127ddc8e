"""What verification by redundancy costs on an honest pool, and what it catches on a faulty one.

Honest pool: K=4 CHORDS requests on 4 synthetic workers with a forward latency, one request at
a time, first on a broker with ``--verify off``, then on one with the default verification
(``sample``) after a warm-up that builds the workers' clean records (every task is replicated
until ``--verify-trusted-after`` results agreed, then the rate halves down to the floor): the
extra evaluations (replicas / plan evaluations, from each request's DONE stats) and the wall
time of the measured requests, both from the same run.

Faulty pools: 2 honest workers plus 1 fast faulty one (``chords-worker --fault KIND``, a forward
of 1 ms), default verification from a fresh broker, 10 requests each: how many outputs are the
honest pool's bit for bit (every hit of the request), and whether the faulty worker ends
quarantined. Prints a table and writes benchmarks/results/verify.json. Not a test.

    python -m benchmarks.verify [--latency-ms 20] [--requests 10] [--faults zeros,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "verify.json"
FAULTS = ("zeros", "scale:1.001", "cast:float16", "bitflip:0.01")


def spec(seed: int, steps: int) -> RequestSpec:
    return RequestSpec(model="synthetic", steps=steps, cores=4, seed=seed)


async def run_requests(address: str, specs: list[RequestSpec]) -> list[dict[str, Any]]:
    """Each request alone (at once, the cores policy would grant fewer cores): hits, stats,
    client-side wall time."""
    runs = []
    async with AsyncClient(address) as client:
        for one in specs:
            started = time.perf_counter()
            stream = client.submit(one, timeout=300)
            hits = [hit async for hit in stream]
            wall = time.perf_counter() - started
            runs.append({"hits": hits, "stats": stream.stats or {}, "wall_s": wall})
    return runs


async def worker_states(address: str) -> list[dict[str, Any]]:
    async with AsyncClient(address) as client:
        return list((await client.status(timeout=10))["workers"])


def same(a: list[Any], b: list[Any]) -> bool:
    return [(h.core, h.round) for h in a] == [(h.core, h.round) for h in b] and all(
        x.latent.dtype == y.latent.dtype and torch.equal(x.latent, y.latent)
        for x, y in zip(a, b, strict=True)
    )


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    evaluations = sum(r["stats"].get("evaluations", 0) for r in runs)
    replicas = sum(r["stats"].get("verify_evaluations", 0) for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return {
        "requests": len(runs),
        "evaluations": evaluations,
        "replicas": replicas,
        "extra_evaluations": round(replicas / max(evaluations, 1), 4),
        "wall_s": round(wall, 3),
        "wall_per_request_s": round(wall / max(len(runs), 1), 4),
    }


def honest(args: argparse.Namespace, verify: str, warmup: int) -> tuple[dict[str, Any], list]:
    cluster = LocalCluster(
        workers=4, latency_ms=args.latency_ms, extra_broker_args=["--verify", verify]
    ).start()
    try:
        cluster.wait_for_workers(4, timeout=60)
        warm: list[dict[str, Any]] = []
        seed = 1000
        while len(warm) < warmup:  # until the workers' sampling reached its floor
            warm += asyncio.run(run_requests(cluster.client_address, [spec(seed, args.steps)]))
            seed += 1
            last = summary(warm[-1:])["extra_evaluations"]
            if verify != "off" and len(warm) >= 3 and last <= args.settled:
                break
        specs = [spec(s, args.steps) for s in range(args.requests)]
        measured = asyncio.run(run_requests(cluster.client_address, specs))
    finally:
        cluster.stop()
    result = summary(measured)
    result["warmup_requests"] = len(warm)
    result["warmup"] = summary(warm) if warm else None
    return result, [r["hits"] for r in measured]


def faulty(args: argparse.Namespace, fault: str, reference: list) -> dict[str, Any]:
    cluster = LocalCluster(
        workers=2, latency_ms=args.latency_ms, extra_broker_args=["--verify", "sample"]
    ).start()
    try:
        cluster.start_worker(latency_ms=1.0, extra_args=["--fault", fault])
        cluster.wait_for_workers(3, timeout=60)
        started = time.perf_counter()
        specs = [spec(s, args.steps) for s in range(args.requests)]
        runs = asyncio.run(run_requests(cluster.client_address, specs))
        wall = time.perf_counter() - started
        states = asyncio.run(worker_states(cluster.client_address))
    finally:
        cluster.stop()
    bitwise = sum(same(r["hits"], want) for r, want in zip(runs, reference, strict=True))
    quarantined = [w for w in states if w.get("state") == "quarantined"]
    result = summary(runs)
    result.update(
        {
            "fault": fault,
            "bitwise": bitwise,
            "quarantined": len(quarantined),
            "faulty_strikes": max((w.get("bad_results", 0) for w in states), default=0),
            "total_wall_s": round(wall, 3),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=80, help="most warm-up requests")
    parser.add_argument(
        "--settled", type=float, default=0.08, help="warm-up ends once a request's replicas are"
    )
    parser.add_argument("--faults", default=",".join(FAULTS))
    args = parser.parse_args()

    off, reference = honest(args, "off", 0)
    default, got = honest(args, "sample", args.warmup)
    default["bitwise"] = sum(same(a, b) for a, b in zip(got, reference, strict=True))
    pools = [faulty(args, fault, reference) for fault in args.faults.split(",") if fault]

    extra = default["extra_evaluations"]
    wall_ratio = default["wall_s"] / off["wall_s"]
    print(f"honest pool, K=4, 4 workers at {args.latency_ms:g} ms, {args.requests} requests each")
    print(f"{'verify':<10} {'evals':>7} {'replicas':>9} {'extra':>7} {'wall s':>8} {'warm-up':>8}")
    for name, row in (("off", off), ("sample", default)):
        print(
            f"{name:<10} {row['evaluations']:>7} {row['replicas']:>9} "
            f"{row['extra_evaluations']:>7.1%} {row['wall_s']:>8.2f} {row['warmup_requests']:>8}"
        )
    print(f"extra evaluations {extra:.1%} (target <= 15%), wall x{wall_ratio:.3f} (<= 1.10)")
    print()
    print(f"{'faulty worker':<14} {'bitwise':>8} {'quarantined':>12} {'strikes':>8} {'extra':>7}")
    for row in pools:
        print(
            f"{row['fault']:<14} {row['bitwise']:>5}/{row['requests']:<2} "
            f"{'yes' if row['quarantined'] == 1 else 'no':>12} {row['faulty_strikes']:>8} "
            f"{row['extra_evaluations']:>7.1%}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": "2 shared CPU cores; synthetic workers sleep their latency",
                "config": vars(args),
                "honest": {
                    "off": off,
                    "sample": default,
                    "extra_evaluations": extra,
                    "wall_ratio": round(wall_ratio, 4),
                },
                "faulty": pools,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
