"""Video-sized latents through the engine: time, retries, bitwise core 1 and broker memory.

A real broker and 4 synthetic workers (no emulated latency: the synthetic field is computed
over the whole latent) run, for each latent size, a sequential request and then CHORDS K=4 of
the same request. Reported per size: wall time of each, retries (a worker falsely declared dead
would show here), whether CHORDS' core 1 is bitwise the sequential hit, the most latent bytes
the session held (its own accounting, sampled at every result), and the broker process's peak
RSS above its idle RSS (``/proc/PID/status`` VmHWM after resetting it through ``clear_refs``),
in latents. Last, a broker started with a small ``--max-request-bytes`` is sent a request that
does not fit, and the time to its ``too_large`` refusal is measured.

``--data-plane on|off`` is passed to both brokers, if chords-broker accepts the option (checked at
run time). ``--label NAME`` keeps the run under ``runs.NAME`` in the result file, next to the other
labels' runs and the unlabelled one (issue 25's "before" and "after"):

    python -m benchmarks.big_latents --sizes "64 MiB" --label before
    python -m benchmarks.big_latents --sizes "64 MiB" --label after --data-plane on

Prints a table and writes benchmarks/results/big_latents.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import outcome, plane_args
from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "big_latents.json"
MIB = 1 << 20
SIZES = {"64 MiB": ([16, 1024, 1024], 50), "256 MiB": ([64, 1024, 1024], 20)}


def status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


async def run(address: str, spec: RequestSpec) -> tuple[list[Any], dict[str, Any], float]:
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        stream = client.submit(spec, timeout=3600)
        hits = [hit async for hit in stream]
        assert stream.stats is not None
        return hits, stream.stats, time.perf_counter() - started


def bench_size(cluster: LocalCluster, label: str, shape: list[int], steps: int) -> dict[str, Any]:
    assert cluster.broker is not None
    pid = cluster.broker.pid
    latent = 4 * math.prod(shape)
    params = {"shape": shape, "dtype": "float32"}
    sequential = RequestSpec("synthetic", method="sequential", steps=steps, params=params)
    (seq_hit,), seq_stats, seq_s = asyncio.run(run(cluster.client_address, sequential))
    idle = status_bytes(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    chords = RequestSpec("synthetic", cores=4, steps=steps, params=params)
    hits, stats, chords_s = asyncio.run(run(cluster.client_address, chords))
    peak = status_bytes(pid, "VmHWM")
    core1 = next(hit for hit in hits if hit.core == 1)
    return {
        "latent": label,
        "bytes": latent,
        "steps": steps,
        "init_sequence": chords.resolved_init_sequence(),
        "sequential_s": round(seq_s, 2),
        "sequential_retries": seq_stats["retries"],
        "chords_s": round(chords_s, 2),
        "chords_evaluations": stats["evaluations"],
        "chords_retries": stats["retries"],
        "core1_bitwise_sequential": bool(torch.equal(core1.latent, seq_hit.latent)),
        "session_peak_latents": round(stats["peak_bytes"] / latent, 2),
        "broker_idle_rss_mib": round(idle / MIB, 1),
        "broker_peak_above_idle_latents": round((peak - idle) / latent, 2),
    }


def bench_refusal(log_dir: Path, broker_args: list[str]) -> dict[str, Any]:
    limit = "1GiB"
    shape = [64, 1024, 1024]  # 256 MiB: CHORDS K=4 holds about 18 of them
    with LocalCluster(
        workers=1, log_dir=log_dir, extra_broker_args=["--max-request-bytes", limit, *broker_args]
    ) as cluster:
        spec = RequestSpec(
            "synthetic", cores=4, steps=20, params={"shape": shape, "dtype": "float32"}
        )

        code, seconds = asyncio.run(outcome(cluster.client_address, spec))
    return {"max_request_bytes": limit, "latent_mib": 256, "code": code, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--data-plane", choices=["on", "off"], default=None)
    parser.add_argument("--label", default=None, help="keep the run under runs.LABEL")
    args = parser.parse_args()
    broker_args = plane_args(args.data_plane)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        logs = Path(scratch)
        with LocalCluster(workers=4, log_dir=logs, extra_broker_args=broker_args) as cluster:
            for label in args.sizes:
                shape, steps = SIZES[label]
                rows.append(bench_size(cluster, label, shape, steps))
                print(rows[-1])
        refusal = bench_refusal(logs, broker_args)
    print(
        f"\n{'latent':>8} {'N':>3} {'seq s':>7} {'chords s':>9} {'retries':>8} "
        f"{'core1 = seq':>11} {'held':>6} {'RSS above idle':>15}"
    )
    for row in rows:
        print(
            f"{row['latent']:>8} {row['steps']:>3} {row['sequential_s']:>7.1f} "
            f"{row['chords_s']:>9.1f} {row['chords_retries']:>8} "
            f"{row['core1_bitwise_sequential']!s:>11} {row['session_peak_latents']:>6.1f} "
            f"{row['broker_peak_above_idle_latents']:>15.1f}"
        )
    print(
        f"\nover --max-request-bytes {refusal['max_request_bytes']}: {refusal['code']} after "
        f"{refusal['seconds']:.2f} s"
    )
    result: dict[str, Any] = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data_plane": args.data_plane or "default (no --data-plane given)",
        "rows": rows,
        "refusal": refusal,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.label is not None:  # the other runs stay: labelled ones, and the unlabelled one
        kept.setdefault("runs", {})[args.label] = result
        result = kept
    elif "runs" in kept:
        result["runs"] = kept["runs"]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}" + ("" if args.label is None else f" (runs.{args.label})"))


if __name__ == "__main__":
    main()
