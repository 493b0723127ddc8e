"""Where a barrier round's time goes: ParaDIGMS (and CHORDS for comparison) on the synthetic model.

The broker runs in its own process (this script with ``--serve-broker``): a ``BrokerServer``
whose core writes a time stamp for every EVAL it sends and every RESULT it receives to a file.
The workers are real ``chords-worker`` processes sleeping ``--latency-ms`` per forward. For each
ParaDIGMS request, the sends are grouped into rounds (bursts more than 50 ms apart) and the
script reports, averaged over rounds:

* ``period``: first send of a round to the first send of the next;
* ``send_spread``: first to last EVAL send of a round (the broker's loop, one after another);
* ``first_result``: first send to first result (one forward plus the engine's path);
* ``result_spread``: first to last result of a round;
* ``slide_gap``: last result of a round to the first send of the next (plan update + dispatch);
* ``fixed``: wall time minus rounds x period (submission, PREPARE on every worker, DONE).

Every row also gives the CPU time spent per network evaluation by the broker process alone (all
its threads, libzmq's I/O thread included) and by all worker processes together, read from
``/proc/PID/task/*/schedstat`` around the request (``process_cpu_seconds``): on a machine
with fewer cores than processes, that CPU is what a barrier round queues for.
``broker_cpu_ms_per_eval_above_idle`` subtracts what the idle pool costs the broker (heartbeats
with every worker, ticks), measured over one second just before the request.

Prints a table and writes benchmarks/results/round_timeline.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info, process_cpu_seconds, wait_until_idle
from chords_mq.apps.cluster import LocalCluster, _script, free_port
from chords_mq.client import AsyncClient, RequestTimeout

RESULTS = Path(__file__).resolve().parent / "results" / "round_timeline.json"


def bursts(stamps: list[float], gap_s: float = 0.05) -> list[list[float]]:
    groups: list[list[float]] = []
    for stamp in stamps:
        if groups and stamp - groups[-1][-1] <= gap_s:
            groups[-1].append(stamp)
        else:
            groups.append([stamp])
    return groups


def serve_broker(client_bind: str, worker_bind: str, stamps: str) -> None:
    """The broker process: a BrokerServer whose core stamps EVAL sends and RESULT arrivals."""
    from chords_mq.broker.core import BrokerCore, Send
    from chords_mq.broker.server import BrokerServer
    from chords_mq.wire import Message

    log = open(stamps, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    class StampingCore(BrokerCore):
        def worker_message(
            self, identity: bytes, message: Message, principal: str | None = None
        ) -> list[Send]:
            if message.kind == "RESULT":
                log.write(f"RESULT {time.monotonic()} {message.request}\n")
            sends = super().worker_message(identity, message, principal)
            for send in sends:
                if send.message.kind == "EVAL":
                    log.write(f"EVAL {time.monotonic()} {send.message.request}\n")
            return sends

    server = BrokerServer(StampingCore(), client_bind, worker_bind)

    async def run() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.drain)
        await server.run()

    asyncio.run(run())


def read_stamps(path: Path, request: str) -> tuple[list[float], list[float]]:
    sends, results = [], []
    for line in path.read_text().splitlines():
        kind, stamp, owner = line.split()
        if owner == request:
            (sends if kind == "EVAL" else results).append(float(stamp))
    return sends, results


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    client_port, worker_port = free_port(), free_port()
    stamps = Path(args.out).with_suffix(".stamps.tmp")
    stamps.unlink(missing_ok=True)
    env = LocalCluster().env
    broker = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-broker",
            f"tcp://127.0.0.1:{client_port}",
            f"tcp://127.0.0.1:{worker_port}",
            str(stamps),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    command = [*_script("chords-worker"), "--broker", f"tcp://127.0.0.1:{worker_port}"]
    command += ["--model", "synthetic", "--latency-ms", str(args.latency_ms), "--device", "cpu"]
    command += ["--threads", "1"]
    workers = [
        subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL) for _ in range(args.workers)
    ]
    rows: list[dict[str, Any]] = []
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{client_port}") as client:
            deadline = time.monotonic() + 180  # 9 processes importing torch on 2 cores
            while True:
                try:
                    if len((await client.status(timeout=5.0))["workers"]) >= args.workers:
                        break
                except RequestTimeout:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the broker and workers did not come up in 180 s")
                await asyncio.sleep(0.2)
            plan = [("sequential", 1)] + [
                (method, k) for k in args.cores for method in ("paradigms", "chords")
            ]
            for method, cores in plan:
                for _ in range(args.repeats):
                    # an early-stopping request leaves forwards in flight: let them finish first
                    await wait_until_idle(client)
                    # the idle pool's own cost (heartbeats, ticks) over one second, to subtract
                    idle_cpu = process_cpu_seconds(broker.pid)
                    await asyncio.sleep(1.0)
                    idle_rate = process_cpu_seconds(broker.pid) - idle_cpu
                    own_cpu = process_cpu_seconds(broker.pid)
                    worker_cpu = sum(process_cpu_seconds(worker.pid) for worker in workers)
                    started = time.perf_counter()
                    stream = client.generate(
                        "synthetic",
                        method=method,
                        steps=args.steps,
                        cores=None if method == "sequential" else cores,
                        stop="core-index:1" if method == "chords" else None,
                    )
                    async for _ in stream:
                        pass
                    wall = time.perf_counter() - started
                    own_cpu = process_cpu_seconds(broker.pid) - own_cpu
                    worker_cpu = (
                        sum(process_cpu_seconds(worker.pid) for worker in workers) - worker_cpu
                    )
                    assert stream.stats is not None
                    sends, results = read_stamps(stamps, stream.id)
                    rounds = stream.stats["returned"]["round"]
                    evaluations = stream.stats["evaluations"]
                    row: dict[str, Any] = {
                        "method": method,
                        "cores": cores,
                        "round": rounds,
                        "wall_ms": round(wall * 1000, 2),
                        "ms_per_round": round(wall * 1000 / rounds, 2),
                        "evaluations": evaluations,
                        "broker_cpu_ms_per_eval": round(own_cpu * 1000 / evaluations, 3),
                        "broker_idle_cpu_ms_per_s": round(idle_rate * 1000, 3),
                        "broker_cpu_ms_per_eval_above_idle": round(
                            (own_cpu - idle_rate * wall) * 1000 / evaluations, 3
                        ),
                        "worker_cpu_ms_per_eval": round(worker_cpu * 1000 / evaluations, 3),
                    }
                    if method == "paradigms":
                        out, back = bursts(sends), bursts(results)
                        n = min(len(out), len(back))
                        ms = 1000.0
                        period = statistics.fmean(
                            (out[i + 1][0] - out[i][0]) * ms for i in range(len(out) - 1)
                        )
                        row |= {
                            "period_ms": round(period, 2),
                            "send_spread_ms": round(
                                statistics.fmean((b[-1] - b[0]) * ms for b in out), 2
                            ),
                            "first_result_ms": round(
                                statistics.fmean((back[i][0] - out[i][0]) * ms for i in range(n)),
                                2,
                            ),
                            "result_spread_ms": round(
                                statistics.fmean((b[-1] - b[0]) * ms for b in back), 2
                            ),
                            "slide_gap_ms": round(
                                statistics.fmean(
                                    (out[i + 1][0] - back[i][-1]) * ms for i in range(len(out) - 1)
                                ),
                                2,
                            ),
                            "fixed_ms": round(wall * ms - rounds * period, 1),
                        }
                    rows.append(row)
                    print(row)
    finally:
        for worker in workers:
            worker.kill()
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        stamps.unlink(missing_ok=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cores", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve-broker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_broker:
        return serve_broker(*args.serve_broker)
    rows = asyncio.run(measure(args))
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "serve_broker"
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
