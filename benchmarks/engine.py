"""Engine benchmark: (a) the engine's per-task overhead against raw ZeroMQ in the same run,
(b) wall-clock speedup of CHORDS on synthetic workers.

(a) Sequential requests on one synthetic worker (latency 0) for 64 KiB, 1 MiB and 16 MiB
    float32 latents. One task's time is measured differentially, ``(wall(N2) - wall(N1)) /
    (N2 - N1)``, so the request's fixed costs (submit, prepare, done) cancel. *Overhead* is that
    time minus the worker's reported compute (model forward and solver step) per task. It is
    compared with a raw DEALER -> ROUTER -> DEALER echo of the same payload between two fresh
    processes started with the same environment as the daemons (``GLIBC_TUNABLES``), measured
    in the same run. Broker and worker CPU per task come from ``/proc`` (all threads, in
    nanoseconds: ``process_cpu_seconds``), differentially too.
(b) The synthetic adapter at ``--latency-ms`` per forward (sleeping, so it costs no CPU), N =
    50, the paper's init sequences for K = 4, 6, 8 on 8 workers, and K = 8 at 10 ms. Measured
    speedup = sequential wall time / time of the fastest core's hit; ratio = measured / round
    speedup.

Prints tables and writes benchmarks/results/engine.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from chords_mq.apps.bench import machine_info, process_cpu_seconds
from chords_mq.apps.cluster import LocalCluster, free_port
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from chords_mq.transport import dealer, router

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
SIZES = {"64 KiB": [16, 32, 32], "1 MiB": [4, 256, 256], "16 MiB": [16, 512, 512]}
# (N1, N2) per size: enough tasks that the difference dominates the noise
LENGTHS = {"64 KiB": (20, 220), "1 MiB": (20, 120), "16 MiB": (5, 25)}
PAPER = {4: [0, 8, 16, 32], 6: [0, 3, 6, 12, 24, 36], 8: [0, 2, 4, 8, 16, 24, 32, 40]}


# -- the raw transport --------------------------------------------------------------------------


def echo_server(endpoint: str, tuned: bool) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    if tuned:
        sock = router(ctx, endpoint)
    else:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    ctx.destroy(linger=0)


def echo_client(endpoint: str, nbytes: int, repeats: int, tuned: bool, fresh: bool) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    if tuned:
        sock = dealer(ctx, endpoint, b"echo-client")
    else:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
    payload = memoryview(torch.randn(nbytes // 4).numpy())
    times = []
    for _ in range(repeats + 3):
        if fresh:  # newly written memory each time, as a worker's results are (not timed)
            payload = memoryview(torch.randn(nbytes // 4).numpy())
        started = time.perf_counter()
        sock.send_multipart([b"h", payload], copy=False)
        sock.recv_multipart(copy=False)
        times.append(time.perf_counter() - started)
    sock.send_multipart([b"stop"])
    ctx.destroy(linger=0)
    print(json.dumps({"rtt_ms": statistics.median(times[3:]) * 1000}))


def raw_round_trip_ms(
    nbytes: int, repeats: int, env: dict[str, str], tuned: bool = False, fresh: bool = False
) -> float:
    """Median echo round trip of one frame between two fresh processes (ms): plain pyzmq
    sockets sending one buffer again and again (the baseline), or with the engine's own socket
    options (``tuned``), or sending newly written memory each time (``fresh``)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    me = [sys.executable, str(Path(__file__).resolve())]
    flag = ["--tuned"] if tuned else []
    flag += ["--fresh"] if fresh else []
    server = subprocess.Popen([*me, "--echo-server", endpoint, *flag[:1]], env=env)
    try:
        client = subprocess.run(
            [
                *me,
                "--echo-client",
                endpoint,
                "--bytes",
                str(nbytes),
                "--repeats",
                str(repeats),
                *flag,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    finally:
        server.wait(30)
    return float(json.loads(client.stdout)["rtt_ms"])


# -- the engine ---------------------------------------------------------------------------------


async def timed(address: str, spec: RequestSpec) -> dict[str, Any]:
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        stream = client.submit(spec, timeout=600)
        arrivals = [(hit.core, hit.round, time.perf_counter() - started) async for hit in stream]
    assert stream.stats is not None
    return {"hits": arrivals, "stats": stream.stats, "wall_s": time.perf_counter() - started}


def measured(cluster: LocalCluster, spec: RequestSpec) -> tuple[float, float, float, float]:
    """Wall time, worker compute, broker CPU and worker CPU of one request (seconds)."""
    assert cluster.broker is not None
    broker0 = process_cpu_seconds(cluster.broker.pid)
    worker0 = sum(process_cpu_seconds(w.pid) for w in cluster.workers)
    run = asyncio.run(timed(cluster.client_address, spec))
    broker_cpu = process_cpu_seconds(cluster.broker.pid) - broker0
    worker_cpu = sum(process_cpu_seconds(w.pid) for w in cluster.workers) - worker0
    return run["wall_s"], run["stats"]["compute_s"], broker_cpu, worker_cpu


def bench_round_trips(repeats: int) -> list[dict[str, Any]]:
    rows = []
    with LocalCluster(workers=1, latency_ms=0.0) as cluster:
        for label, shape in SIZES.items():
            nbytes = 4 * int(torch.tensor(shape).prod())
            params = {"shape": shape, "dtype": "float32"}
            short, long = LENGTHS[label]

            def spec(steps: int, params: dict[str, Any] = params) -> RequestSpec:
                return RequestSpec("synthetic", method="sequential", steps=steps, params=params)

            measured(cluster, spec(3))  # warm up
            count = 200 if nbytes < 1 << 22 else 20
            # The machine is shared and noisy: alternate the engine and the raw echoes, so
            # drift hits both alike, and take medians.
            samples, raws, tuneds, freshes = [], [], [], []
            for _ in range(repeats):
                a, b = measured(cluster, spec(short)), measured(cluster, spec(long))
                samples.append([(y - x) / (long - short) * 1000 for x, y in zip(a, b)])
                raws.append(raw_round_trip_ms(nbytes, count, cluster.env))
                tuneds.append(raw_round_trip_ms(nbytes, count, cluster.env, tuned=True))
                freshes.append(raw_round_trip_ms(nbytes, count, cluster.env, fresh=True))
            per_task, compute, broker_cpu, worker_cpu = (
                statistics.median(sample[i] for sample in samples) for i in range(4)
            )
            raw, tuned, fresh = map(statistics.median, (raws, tuneds, freshes))
            overhead = per_task - compute
            rows.append(
                {
                    "latent": label,
                    "bytes": nbytes,
                    "per_task_ms": round(per_task, 3),
                    "worker_compute_ms": round(compute, 3),
                    "overhead_ms": round(overhead, 3),
                    "raw_rtt_ms": round(raw, 3),
                    "overhead_over_raw": round(overhead / raw, 3),
                    "raw_rtt_engine_sockets_ms": round(tuned, 3),
                    "overhead_over_raw_engine_sockets": round(overhead / tuned, 3),
                    "raw_rtt_fresh_buffer_ms": round(fresh, 3),
                    "overhead_over_raw_fresh_buffer": round(overhead / fresh, 3),
                    "broker_cpu_ms": round(broker_cpu, 3),
                    "worker_cpu_ms": round(worker_cpu, 3),
                }
            )
    return rows


def bench_speedup(latency_ms: float, steps: int, sequences: dict[int, list[int]]) -> list[Any]:
    rows = []
    with LocalCluster(workers=8, latency_ms=latency_ms) as cluster:
        base = {"model": "synthetic", "steps": steps, "seed": 0}
        sequential = asyncio.run(
            timed(cluster.client_address, RequestSpec(method="sequential", **base))
        )
        t_seq = sequential["hits"][-1][2]
        for cores, sequence in sequences.items():
            spec = RequestSpec(init_sequence=tuple(sequence), stop="core-index:1", **base)
            broker0 = process_cpu_seconds(cluster.broker.pid) if cluster.broker else 0.0
            run = asyncio.run(timed(cluster.client_address, spec))
            broker_cpu = (
                process_cpu_seconds(cluster.broker.pid) if cluster.broker else 0.0
            ) - broker0
            core, round_, t_fast = run["hits"][-1]
            measured_speedup, ideal = t_seq / t_fast, steps / round_
            evaluations = run["stats"]["evaluations"]
            rows.append(
                {
                    "latency_ms": latency_ms,
                    "K": cores,
                    "init_sequence": sequence,
                    "fastest_core": core,
                    "round": round_,
                    "round_speedup": round(ideal, 3),
                    "sequential_s": round(t_seq, 3),
                    "chords_s": round(t_fast, 3),
                    "measured_speedup": round(measured_speedup, 3),
                    "ratio": round(measured_speedup / ideal, 3),
                    "evaluations": evaluations,
                    "broker_cpu_per_eval_ms": round(broker_cpu / evaluations * 1000, 3),
                }
            )
            time.sleep(0.5)  # forwards still in flight after the stop finish on idle workers
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--echo-server", help=argparse.SUPPRESS)
    parser.add_argument("--echo-client", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server, args.tuned)
    if args.echo_client:
        return echo_client(args.echo_client, args.bytes, args.repeats, args.tuned, args.fresh)

    trips = bench_round_trips(args.repeats)
    print("(a) per-task cost, sequential request on one worker (medians; ms)")
    print(
        f"{'latent':>8} {'per task':>9} {'compute':>8} {'overhead':>9} {'raw rtt':>8} "
        f"{'ratio':>6} {'raw, engine socks':>18} {'ratio':>6} {'broker cpu':>11} "
        f"{'worker cpu':>11}"
    )
    for row in trips:
        print(
            f"{row['latent']:>8} {row['per_task_ms']:>9.3f} {row['worker_compute_ms']:>8.3f} "
            f"{row['overhead_ms']:>9.3f} {row['raw_rtt_ms']:>8.3f} "
            f"{row['overhead_over_raw']:>6.2f} {row['raw_rtt_engine_sockets_ms']:>18.3f} "
            f"{row['overhead_over_raw_engine_sockets']:>6.2f} {row['broker_cpu_ms']:>11.3f} "
            f"{row['worker_cpu_ms']:>11.3f}"
        )
    print("raw echo of newly written memory each time (ms, overhead ratio):")
    for row in trips:
        print(
            f"{row['latent']:>8} {row['raw_rtt_fresh_buffer_ms']:>9.3f} "
            f"{row['overhead_over_raw_fresh_buffer']:>6.2f}"
        )

    speedups = bench_speedup(args.latency_ms, args.steps, PAPER)
    speedups += bench_speedup(10.0, args.steps, {8: PAPER[8]})
    print(f"\n(b) wall-clock speedup, synthetic workers, N={args.steps}, 8 workers")
    print(
        f"{'ms/fwd':>7} {'K':>3} {'round':>6} {'round x':>8} {'seq s':>7} {'chords s':>9} "
        f"{'measured x':>11} {'ratio':>6} {'broker ms/eval':>15}"
    )
    for row in speedups:
        print(
            f"{row['latency_ms']:>7g} {row['K']:>3} {row['round']:>6} {row['round_speedup']:>8.3f} "
            f"{row['sequential_s']:>7.3f} {row['chords_s']:>9.3f} "
            f"{row['measured_speedup']:>11.3f} {row['ratio']:>6.3f} "
            f"{row['broker_cpu_per_eval_ms']:>15.3f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(),
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
