"""A worker that accepts PREPAREs and never answers them while it heartbeats (``chords-worker
--fault silent-prepare``), beside honest workers: how much longer each request takes than on the
honest workers alone (issue 26: "every request finishes within 3x its honest time").

For each pool, the same CHORDS requests run one after another on a fresh broker, first with the
honest workers alone, then with the silent worker registered first (so the first request asks
it for the initial latent, before anything about PREPAREs is learnt). Pools: one honest worker
(``--verify off``: verification needs a second honest worker) and two honest workers (the
default verification). Every output is checked bitwise against the honest run.

    python -m benchmarks.silent_prepare

Prints a table and writes benchmarks/results/silent_prepare.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "silent_prepare.json"
POOLS = {
    "1 honest, --verify off": (1, ["--verify", "off"]),
    "2 honest, default verify": (2, ["--verify", "sample"]),
}


async def timed(address: str, specs: list[RequestSpec]) -> list[tuple[float, list[Any]]]:
    out = []
    async with AsyncClient(address) as client:
        for spec in specs:
            started = time.perf_counter()
            hits = [hit async for hit in client.submit(spec, timeout=120)]
            out.append((time.perf_counter() - started, hits))
    return out


def pool_run(
    honest: int,
    broker_args: list[str],
    silent: bool,
    specs: list[RequestSpec],
    latency_ms: float,
    logs: Path,
) -> list[tuple[float, list[Any]]]:
    cluster = LocalCluster(
        workers=0, latency_ms=latency_ms, log_dir=logs, extra_broker_args=broker_args
    )
    cluster.start()
    try:
        if silent:  # registered first: the first request asks it for x0
            cluster.start_worker(extra_args=["--fault", "silent-prepare"])
            cluster.wait_for_workers(1, timeout=60)
        for _ in range(honest):
            cluster.start_worker()
        cluster.wait_for_workers(honest + silent, timeout=60)
        return asyncio.run(timed(cluster.client_address, specs))
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    specs = [
        RequestSpec("synthetic", steps=args.steps, cores=args.cores, seed=seed)
        for seed in range(args.requests)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (honest, broker_args) in POOLS.items():
            logs = Path(scratch) / str(honest)
            base = pool_run(honest, broker_args, False, specs, args.latency_ms, logs / "honest")
            with_silent = pool_run(
                honest, broker_args, True, specs, args.latency_ms, logs / "silent"
            )
            ratios = [s / b for (s, _), (b, _) in zip(with_silent, base)]
            bitwise = all(
                len(s) == len(b) and all(torch.equal(x.latent, y.latent) for x, y in zip(s, b))
                for (_, s), (_, b) in zip(with_silent, base)
            )
            rows.append(
                {
                    "pool": name,
                    "honest_s": [round(b, 3) for b, _ in base],
                    "with_silent_s": [round(s, 3) for s, _ in with_silent],
                    "ratio_max": round(max(ratios), 2),
                    "ratio_median": round(sorted(ratios)[len(ratios) // 2], 2),
                    "bitwise": bitwise,
                }
            )
            print(rows[-1], flush=True)
    print(
        f"\nCHORDS K={args.cores}, {args.steps} steps, {args.latency_ms:g} ms forwards, "
        f"{args.requests} requests one after another"
    )
    print(f"{'pool':>26} {'first honest':>13} {'first silent':>13} {'max x':>6} {'median x':>9}")
    for row in rows:
        print(
            f"{row['pool']:>26} {row['honest_s'][0]:>13.2f} {row['with_silent_s'][0]:>13.2f} "
            f"{row['ratio_max']:>6.2f} {row['ratio_median']:>9.2f}"
        )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
