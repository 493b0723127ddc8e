"""What a sequential step costs beyond its forward, on loopback: issue 25's "sequential N=50
within 1.1x of ideal" without the link.

``LocalCluster`` (broker ``--verify off``, the data plane on) with ``--workers`` synthetic workers
sleeping to ``--latency-ms`` per forward (the field's own time included), the ``linear`` field
on a float32 latent of ``--mib`` MiB (as ``benchmarks/crosshost.py``), and a sequential request
of ``--steps`` steps: ideal = steps x latency. Per request: wall time (submit to its hit) over
ideal, the overhead per step ((wall - ideal) / steps) and the workers' and the broker's CPU per
step.

``--trees LABEL=PATH,...`` runs the same on other checkouts side by side (their daemons import
``chords_mq`` from PATH: PYTHONPATH; ``LABEL=PATH@TUNABLES``: with that GLIBC_TUNABLES, e.g.
``glibc.malloc.hugetlb=1``, the default before ``cluster.WORKER_TUNABLES``), one cluster
each, all started first, the requests alternating (A, B, A, B, ...) so that load from elsewhere
falls on each; the default is this checkout alone. The load average at start and end is
recorded (the machine may be shared).

    python -m benchmarks.sequential_overhead --trees before=/tmp/old,after=. --label NAME

Writes benchmarks/results/sequential_overhead.json (keyed by ``--label``). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import save_labelled
from benchmarks.engine import measured, timed
from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import WORKER_TUNABLES, LocalCluster
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "sequential_overhead.json"


def trees(text: str) -> dict[str, tuple[Path, str | None]]:
    out = {}
    for part in text.split(","):
        label, _, spec = part.partition("=")
        path, _, tunables = spec.partition("@")
        if not label or not path or not (Path(path) / "chords_mq").is_dir():
            raise SystemExit(f"--trees: {part!r} is not LABEL=PATH[@TUNABLES] of a checkout")
        out[label] = (Path(path).resolve(), tunables or None)
    return out


def commit(tree: Path) -> str:
    """The checkout's commit, "+ changes" if its tracked files differ from it."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return head.stdout.strip() + (" + changes" if dirty else "") if head.returncode == 0 else "?"


def cluster(tree: Path, tunables: str | None, args: argparse.Namespace) -> LocalCluster:
    """A cluster whose daemons import ``chords_mq`` from ``tree`` (with ``tunables``)."""
    changes = {"PYTHONPATH": str(tree), "GLIBC_TUNABLES": tunables}
    previous = {name: os.environ.get(name) for name in changes}
    try:  # (LocalCluster copies the environment when made)
        for name, value in changes.items():
            if value is not None:
                os.environ[name] = value
        pool = LocalCluster(workers=args.workers, latency_ms=args.latency_ms, verify="off")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return pool


def one(pool: LocalCluster, spec: RequestSpec, ideal_s: float, steps: int) -> dict[str, Any]:
    wall, _, broker_cpu, workers_cpu = measured(pool, spec)
    return {
        "wall_s": round(wall, 3),
        "over_ideal": round(wall / ideal_s, 4),
        "overhead_ms_per_step": round(1000 * (wall - ideal_s) / steps, 2),
        "workers_cpu_ms_per_step": round(1000 * workers_cpu / steps, 2),
        "broker_cpu_ms_per_step": round(1000 * broker_cpu / steps, 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", default="this=.", help="LABEL=PATH,... (checkouts to compare)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per tree, alternating")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--mib", type=int, default=16, help="the float32 latent's size")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--field", default="linear", choices=["linear", "analytic"])
    parser.add_argument("--label", default="latest")
    args = parser.parse_args()
    checkouts = trees(args.trees)
    params = {"shape": [args.mib * (1 << 20) // 4], "dtype": "float32", "field": args.field}
    spec = RequestSpec("synthetic", method="sequential", steps=args.steps, params=params)
    ideal_s = args.steps * args.latency_ms / 1000
    load_start = os.getloadavg()
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in checkouts}
    with contextlib.ExitStack() as stack:
        pools = {
            label: stack.enter_context(cluster(path, tunables, args))
            for label, (path, tunables) in checkouts.items()
        }
        for pool in pools.values():
            asyncio.run(timed(pool.client_address, spec))  # warm-up, not counted
        for round_ in range(args.rounds):
            order = list(pools) if round_ % 2 == 0 else list(reversed(pools))
            for label in order:
                row = one(pools[label], spec, ideal_s, args.steps)
                rows[label].append(row)
                print(f"  {label:>8s} round {round_}: {row}")
    load_end = os.getloadavg()
    print(
        f"\nsequential N={args.steps}, {args.latency_ms:g} ms forwards, {args.mib} MiB float32 "
        f"({args.field}), {args.workers} worker(s), --verify off; ideal {ideal_s:.2f} s; "
        f"load {load_start[0]:.2f} -> {load_end[0]:.2f}"
    )
    print(
        "| tree | wall / ideal (median, each) | overhead per step, ms | worker CPU / step, ms "
        "| broker CPU / step, ms |"
    )
    print("|---|---|---|---|---|")
    summary = {}
    for label, got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0] if k != "loadavg_1min"}
        summary[label] = {k: round(v, 4) for k, v in med.items()}
        each = ", ".join(f"{r['over_ideal']:.3f}" for r in got)
        print(
            f"| {label} | {med['over_ideal']:.3f} ({each}) | {med['overhead_ms_per_step']:.1f} "
            f"| {med['workers_cpu_ms_per_step']:.1f} | {med['broker_cpu_ms_per_step']:.1f} |"
        )
    result = {
        "steps": args.steps,
        "latency_ms": args.latency_ms,
        "latent_mib": args.mib,
        "field": args.field,
        "workers": args.workers,
        "trees": {label: str(path) for label, (path, _) in checkouts.items()},
        "commits": {label: commit(path) for label, (path, _) in checkouts.items()},
        "glibc_tunables": {
            label: tunables or os.environ.get("GLIBC_TUNABLES", WORKER_TUNABLES)
            for label, (_, tunables) in checkouts.items()
        },
        "median": summary,
        "runs": rows,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
        "cpus": os.cpu_count(),
        "machine": machine_info(),
    }
    save_labelled(RESULTS, args.label, result)


if __name__ == "__main__":
    main()
