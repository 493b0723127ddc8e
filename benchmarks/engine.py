"""Engine benchmark: (a) per-task round trip against raw ZeroMQ loopback, (b) wall-clock speedup.

(a) A sequential request of N steps on one synthetic worker (latency 0) for 64 KiB, 1 MiB and
    16 MiB float32 latents. Per task: wall / N. Engine cost beyond the wire: per-task wall minus
    the worker's own model time (reported by the worker) minus a raw DEALER/ROUTER echo round
    trip of the same payload between two processes.
(b) The synthetic adapter at --latency-ms 100, N = 50, the paper's init sequences for K = 4, 6,
    8 on a cluster of 8 workers (a K-core request uses at most K of them). Measured speedup =
    sequential wall time / time of the fastest core's hit; ratio = measured / round-speedup.

Prints a table and writes benchmarks/results/engine.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from chords_mq.client import AsyncClient
from chords_mq.cluster import LocalCluster, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
SIZES = {"64 KiB": [16, 32, 32], "1 MiB": [4, 256, 256], "16 MiB": [16, 512, 512]}


def _echo_server(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close()
    ctx.term()


def raw_round_trip_ms(nbytes: int, repeats: int) -> float:
    """Median DEALER -> ROUTER -> DEALER echo of one frame between two processes (ms)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(endpoint,))
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    payload = memoryview(torch.randn(nbytes // 4).numpy())
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        sock.send_multipart([b"h", payload], copy=False)
        sock.recv_multipart(copy=False)
        times.append(time.perf_counter() - started)
    sock.send_multipart([b"stop"])
    server.join(10)
    sock.close()
    ctx.term()
    return statistics.median(times[2:]) * 1000


async def timed_request(address: str, **kwargs: Any) -> dict[str, Any]:
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        stream = client.generate(timeout=600, **kwargs)
        arrivals = [(hit.core, hit.round, time.perf_counter() - started) async for hit in stream]
    return {"hits": arrivals, "stats": stream.stats, "wall_s": time.perf_counter() - started}


def bench_round_trips(steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with LocalCluster(workers=1, latency_ms=0.0) as cluster:
        for label, shape in SIZES.items():
            nbytes = 4 * int(torch.tensor(shape).prod())
            params = {"shape": shape, "dtype": "float32"}
            asyncio.run(
                timed_request(
                    cluster.client_address,
                    model="synthetic",
                    method="sequential",
                    steps=3,
                    params=params,
                )
            )  # warm up
            runs = [
                asyncio.run(
                    timed_request(
                        cluster.client_address,
                        model="synthetic",
                        method="sequential",
                        steps=steps,
                        params=params,
                    )
                )
                for _ in range(repeats)
            ]
            best = min(runs, key=lambda run: run["wall_s"])
            per_task = best["wall_s"] / steps * 1000
            compute = best["stats"]["compute_s"] / steps * 1000
            raw = raw_round_trip_ms(nbytes, repeats=20)
            rows.append(
                {
                    "latent": label,
                    "bytes": nbytes,
                    "per_task_ms": round(per_task, 3),
                    "worker_compute_ms": round(compute, 3),
                    "raw_rtt_ms": round(raw, 3),
                    "engine_cost_ms": round(per_task - compute - raw, 3),
                }
            )
    return rows


PAPER = {4: [0, 8, 16, 32], 6: [0, 3, 6, 12, 24, 36], 8: [0, 2, 4, 8, 16, 24, 32, 40]}


def bench_speedup(latency_ms: float, steps: int) -> list[dict[str, Any]]:
    rows = []
    with LocalCluster(workers=8, latency_ms=latency_ms) as cluster:
        address = cluster.client_address
        base = {"model": "synthetic", "steps": steps, "seed": 0}
        sequential = asyncio.run(timed_request(address, method="sequential", **base))
        t_seq = sequential["hits"][-1][2]
        for cores, sequence in PAPER.items():
            run = asyncio.run(
                timed_request(address, init_sequence=sequence, stop="core-index:1", **base)
            )
            core, round_, t_fast = run["hits"][-1]
            measured, ideal = t_seq / t_fast, steps / round_
            rows.append(
                {
                    "K": cores,
                    "init_sequence": sequence,
                    "fastest_core": core,
                    "round": round_,
                    "round_speedup": round(ideal, 3),
                    "sequential_s": round(t_seq, 3),
                    "chords_s": round(t_fast, 3),
                    "measured_speedup": round(measured, 3),
                    "ratio": round(measured / ideal, 3),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    trips = bench_round_trips(args.steps, args.repeats)
    print("(a) per-task round trip, sequential request on one worker (medians, best of runs)")
    print(f"{'latent':>8} {'per task ms':>12} {'model ms':>9} {'raw rtt ms':>11} {'engine ms':>10}")
    for row in trips:
        print(
            f"{row['latent']:>8} {row['per_task_ms']:>12.3f} {row['worker_compute_ms']:>9.3f} "
            f"{row['raw_rtt_ms']:>11.3f} {row['engine_cost_ms']:>10.3f}"
        )

    speedups = bench_speedup(args.latency_ms, args.steps)
    print(f"\n(b) wall-clock speedup, synthetic at {args.latency_ms:g} ms/forward, N={args.steps}")
    print(
        f"{'K':>3} {'round':>6} {'round x':>8} {'seq s':>7} {'chords s':>9} "
        f"{'measured x':>11} {'ratio':>6}"
    )
    for row in speedups:
        print(
            f"{row['K']:>3} {row['round']:>6} {row['round_speedup']:>8.3f} "
            f"{row['sequential_s']:>7.3f} {row['chords_s']:>9.3f} "
            f"{row['measured_speedup']:>11.3f} {row['ratio']:>6.3f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": multiprocessing.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "args": {
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "latency_ms": args.latency_ms,
                },
                "round_trips": trips,
                "speedups": speedups,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
