"""Issue 25's loopback item: CHORDS K=8 at 10 ms per forward, with the data plane off and on.

The same measurement as ``benchmarks/engine.py``'s last speedup row (the 0.938 that
docs/benchmarks.md quotes): 8 synthetic workers on loopback (``LocalCluster``), the synthetic
adapter sleeping ``--latency-ms`` per forward, N = 50, the paper's K = 8 init sequence
``[0, 2, 4, 8, 16, 24, 32, 40]`` and ``core-index:1``. Measured speedup = sequential wall time /
time to the fastest core's hit; ratio = measured / round-speedup.

One sample is a sequential request then a CHORDS request on the same pool (0.2 to 0.6 s each,
so one sample is noisy on a shared 2-core machine). Per ``--rounds``, each setting of the
broker's ``--data-plane`` gets a fresh pool and ``--samples`` samples, the settings alternating
(off, on, off, on, ...) so that load from elsewhere falls on both. Reports every sample's
ratio, CHORDS' time over its ideal (round x latency: free of the sequential sample's noise) and
the broker's CPU per evaluation, and per setting their medians; the load average at start and
end is recorded (the machine is shared).

    python -m benchmarks.loopback_plane --label after

Writes benchmarks/results/loopback_plane.json (keyed by ``--label``). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PLANE_ARGS, save_labelled
from benchmarks.engine import PAPER, timed
from chords_mq.apps.bench import machine_info, process_cpu_seconds
from chords_mq.apps.cluster import LocalCluster
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "loopback_plane.json"
# The settings a run may compare (``--planes``): the data plane off or on (the broker's default
# --chain, a core's steps in one EVAL), and on with chains of another length (1: none).
SETTINGS = {
    **PLANE_ARGS,
    **{f"chain{n}": ["--data-plane", "--chain", str(n)] for n in (1, 2, 4, 8, 16)},
    # on, with results pushed to their readers across hosts only (--push-local is the default)
    "no-push-local": ["--data-plane", "--no-push-local"],
}


def samples(plane: str, count: int, latency_ms: float, steps: int) -> list[dict[str, Any]]:
    rows = []
    broker_args = list(SETTINGS[plane])
    with LocalCluster(workers=8, latency_ms=latency_ms, extra_broker_args=broker_args) as pool:
        base: dict[str, Any] = {"model": "synthetic", "steps": steps, "seed": 0}
        chords = RequestSpec(init_sequence=tuple(PAPER[8]), stop="core-index:1", **base)
        asyncio.run(timed(pool.client_address, chords))  # warm-up, not counted
        time.sleep(0.5)
        for _ in range(count):
            sequential = asyncio.run(
                timed(pool.client_address, RequestSpec(method="sequential", **base))
            )
            assert pool.broker is not None
            broker0 = process_cpu_seconds(pool.broker.pid)
            run = asyncio.run(timed(pool.client_address, chords))
            broker_cpu = process_cpu_seconds(pool.broker.pid) - broker0
            t_seq = sequential["hits"][-1][2]
            core, round_, t_fast = run["hits"][-1]
            round_speedup = steps / round_
            rows.append(
                {
                    "data_plane": plane,
                    "sequential_s": round(t_seq, 4),
                    "chords_s": round(t_fast, 4),
                    "round": round_,
                    "fastest_core": core,
                    "round_speedup": round(round_speedup, 3),
                    "measured_speedup": round(t_seq / t_fast, 3),
                    "ratio": round(t_seq / t_fast / round_speedup, 3),
                    "chords_over_ideal": round(t_fast / (round_ * latency_ms / 1000), 3),
                    "evaluations": run["stats"]["evaluations"],
                    "broker_cpu_per_eval_ms": round(
                        broker_cpu / run["stats"]["evaluations"] * 1000, 3
                    ),
                }
            )
            print(
                f"data plane {plane:>3}: seq {t_seq:.3f} s  chords {t_fast:.3f} s  "
                f"ratio {rows[-1]['ratio']:.3f}  "
                f"chords / ideal {rows[-1]['chords_over_ideal']:.3f}  "
                f"broker {rows[-1]['broker_cpu_per_eval_ms']:.2f} ms CPU/eval",
                flush=True,
            )
            time.sleep(0.5)  # forwards still in flight after the stop finish on idle workers
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="the run's name in the result file")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5, help="per setting and round")
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--planes", default="off,on", help="the order within a round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    planes = [p for p in args.planes.split(",") if p]
    if any(p not in SETTINGS for p in planes):
        parser.error(f"--planes: choose from {list(SETTINGS)}")

    load_at_start = os.getloadavg()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for plane in planes:
            rows += samples(plane, args.samples, args.latency_ms, args.steps)
    summary = {}
    for plane in planes:
        mine = [r for r in rows if r["data_plane"] == plane]
        summary[plane] = {
            "samples": len(mine),
            "median_ratio": round(statistics.median(r["ratio"] for r in mine), 3),
            "min_ratio": min(r["ratio"] for r in mine),
            "max_ratio": max(r["ratio"] for r in mine),
            "median_sequential_s": round(statistics.median(r["sequential_s"] for r in mine), 4),
            "median_chords_s": round(statistics.median(r["chords_s"] for r in mine), 4),
            "median_chords_over_ideal": round(
                statistics.median(r["chords_over_ideal"] for r in mine), 3
            ),
            "median_broker_cpu_per_eval_ms": round(
                statistics.median(r["broker_cpu_per_eval_ms"] for r in mine), 3
            ),
        }
        print(f"data plane {plane}: {summary[plane]}")
    result = {
        "machine": machine_info(),
        "commit": os.popen("git rev-parse --short HEAD").read().strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {
            "latency_ms": args.latency_ms,
            "steps": args.steps,
            "K": 8,
            "init_sequence": PAPER[8],
            "rounds": args.rounds,
            "samples": args.samples,
        },
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "summary": summary,
        "samples": rows,
    }
    save_labelled(args.out, args.label, result)


if __name__ == "__main__":
    main()
