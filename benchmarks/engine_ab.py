"""The engine's per-task overhead, this checkout against an earlier commit, in one run.

Each side is ``benchmarks/engine.py``'s own ``bench_round_trips`` (a sequential request on one
synthetic worker; the per-task time measured differentially, minus the worker's compute),
run from that side's tree: the earlier commit is exported with ``git archive`` and every
process of it (the measuring client, the broker, the worker) imports that tree. The sides
alternate, ``--pairs`` times, so drift on a shared machine hits both alike; medians are
reported, with this checkout's overhead over the earlier one's.

    python -m benchmarks.engine_ab --before f9f595c

Writes benchmarks/results/engine_ab.json (quoted by docs/benchmarks.md). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "engine_ab.json"
SIZES = ("64 KiB", "1 MiB")

# Run in a child whose PYTHONPATH is the tree measured: the daemons start from that tree's
# modules (its broker is ``broker.server`` before the one-namespace change, after it
# ``chords_mq.broker.server``), never from the installed console scripts.
CHILD = """
import json, pathlib, sys
from chords_mq.apps import cluster
import benchmarks.engine as engine

def script(name):
    # the tree's own layout decides (the installed package's import hook would answer for
    # this checkout whatever tree runs)
    new = (pathlib.Path.cwd() / "chords_mq" / "broker").exists()
    module = {"chords-broker": "broker.server", "chords-worker": "workers.worker"}[name]
    module = "chords_mq." + module if new else module
    return [sys.executable, "-c", f"import {module} as m; m.main()"]

cluster._script = script
engine.SIZES = {k: v for k, v in engine.SIZES.items() if k in %r}
print(json.dumps(engine.bench_round_trips(%d)))
"""


def measure(tree: Path, repeats: int, sizes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD % (sizes, repeats)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {row["latent"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (a git revision)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help="of " + ", ".join(SIZES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    if not sizes or any(s not in SIZES for s in sizes):
        parser.error(f"--sizes: choose from {', '.join(SIZES)}")
    commit = subprocess.run(
        ["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    samples: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        before.mkdir()
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        for pair in range(args.pairs):
            for side, tree in (("before", before), ("after", ROOT)):
                rows = measure(tree, args.repeats, sizes)
                for size in sizes:
                    for key in ("overhead_ms", "broker_cpu_ms", "worker_cpu_ms"):
                        samples[side].setdefault(f"{size} {key}", []).append(rows[size][key])
                print(
                    f"pair {pair + 1}/{args.pairs} {side}: "
                    + ", ".join(f"{s} {rows[s]['overhead_ms']:.3f} ms" for s in sizes),
                    file=sys.stderr,
                )
    table = []
    print(f"{'latent':>8} {'per task (ms)':>18} {'before':>8} {'after':>8} {'after/before':>13}")
    for size in sizes:
        row: dict[str, Any] = {"latent": size}
        for key in ("overhead_ms", "broker_cpu_ms", "worker_cpu_ms"):
            old = statistics.median(samples["before"][f"{size} {key}"])
            new = statistics.median(samples["after"][f"{size} {key}"])
            name = key.removesuffix("_ms")
            row[f"before_{name}_ms"] = round(old, 4)
            row[f"after_{name}_ms"] = round(new, 4)
            row[f"{name}_ratio"] = round(new / old, 4)
            row[f"before_{name}_samples"] = samples["before"][f"{size} {key}"]
            row[f"after_{name}_samples"] = samples["after"][f"{size} {key}"]
            print(f"{size:>8} {name:>18} {old:>8.3f} {new:>8.3f} {new / old:>13.3f}")
        table.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "before": commit,
                "after": head,
                "pairs": args.pairs,
                "repeats": args.repeats,
                "rows": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
