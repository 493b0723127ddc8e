"""Where a barrier round's time goes: ParaDIGMS (and CHORDS for comparison) on the synthetic model.

A broker runs in this process, so its EVAL sends and RESULT arrivals can be time-stamped; the
workers are real ``chords-worker`` processes sleeping ``--latency-ms`` per forward. For each
ParaDIGMS request, the sends are grouped into rounds (bursts more than 50 ms apart) and the
script reports, averaged over rounds:

* ``period``: first send of a round to the first send of the next;
* ``send_spread``: first to last EVAL send of a round (the broker's loop, one after another);
* ``first_result``: first send to first result (one forward plus the engine's path);
* ``result_spread``: first to last result of a round;
* ``slide_gap``: last result of a round to the first send of the next (plan update + dispatch);
* ``fixed``: wall time minus rounds x period (submission, PREPARE on every worker, DONE).

Every row also gives the CPU time spent per network evaluation by the broker (this process,
client included) and by all worker processes together, read from ``/proc`` around the request:
on a machine with fewer cores than processes, that CPU is what a barrier round queues for.

Prints a table and writes benchmarks/results/round_timeline.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import broker.broker as broker_module
from chords_mq.bench import wait_until_idle
from chords_mq.client import AsyncClient
from chords_mq.cluster import _script, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "round_timeline.json"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bursts(stamps: list[float], gap_s: float = 0.05) -> list[list[float]]:
    groups: list[list[float]] = []
    for stamp in stamps:
        if groups and stamp - groups[-1][-1] <= gap_s:
            groups[-1].append(stamp)
        else:
            groups.append([stamp])
    return groups


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    client_port, worker_port = free_port(), free_port()
    sends: list[float] = []
    results: list[float] = []
    plain_send = broker_module.send_now

    def stamped_send(sock: Any, message: Any, identity: Any = None, *rest: Any) -> None:
        if message.kind == "EVAL":
            sends.append(time.perf_counter())
        plain_send(sock, message, identity, *rest)

    broker_module.send_now = stamped_send  # type: ignore[assignment]
    broker = broker_module.Broker(
        f"tcp://127.0.0.1:{client_port}", f"tcp://127.0.0.1:{worker_port}"
    )
    handle_result = broker.RESULT

    async def stamped_result(identity: bytes, message: Any) -> None:
        results.append(time.perf_counter())
        await handle_result(identity, message)

    broker.worker_handlers["RESULT"] = stamped_result
    serving = asyncio.create_task(broker.run())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*_script("chords-worker"), "--broker", f"tcp://127.0.0.1:{worker_port}"]
    command += ["--model", "synthetic", "--latency-ms", str(args.latency_ms), "--device", "cpu"]
    workers = [
        subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL) for _ in range(args.workers)
    ]
    rows: list[dict[str, Any]] = []
    try:
        async with AsyncClient(f"tcp://127.0.0.1:{client_port}") as client:
            while len((await client.status())["workers"]) < args.workers:
                await asyncio.sleep(0.2)
            plan = [("sequential", 1)] + [
                (method, k) for k in args.cores for method in ("paradigms", "chords")
            ]
            for method, cores in plan:
                for _ in range(args.repeats):
                    # an early-stopping request leaves forwards in flight: let them finish first
                    await wait_until_idle(client)
                    sends.clear()
                    results.clear()
                    own_cpu = time.process_time()
                    worker_cpu = sum(cpu_seconds(worker.pid) for worker in workers)
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
                    own_cpu = time.process_time() - own_cpu
                    worker_cpu = sum(cpu_seconds(worker.pid) for worker in workers) - worker_cpu
                    assert stream.stats is not None
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
        broker.stop.set()
        await serving
        broker_module.send_now = plain_send
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--cores", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = asyncio.run(measure(args))
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
