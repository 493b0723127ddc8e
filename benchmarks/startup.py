"""Where ``chords run``'s time goes before its first hit, on the shipped demo model.

Each phase is timed in a fresh process (cold caches of this interpreter, warm disk), median of
``--repeats``:

- ``import``: ``import chords_mq.apps.cli`` (what every ``chords`` command pays);
- ``adapter + reference``: loading the demo model's adapter and computing the in-process
  sequential reference that ``chords run`` compares every hit against;
- ``daemons``: starting a broker and 4 workers until all 4 are registered;
- ``chords run``: the whole command, launch to its first hit row, to exit; once with the
  daemons started after the reference (``serial``) and once while it is computed
  (``overlap``, ``CHORDS_OVERLAP_START``), alternating which goes first. ``chords run`` itself
  overlaps only with a CPU for each daemon (``runner.overlap_start``).

Prints a table and writes benchmarks/results/startup.json (``--out``), under ``--label`` (e.g.
``before`` / ``after`` a change: both are kept in the file). Not a test.
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

from chords_mq.apps.bench import machine_info
from chords_mq.apps.runner import overlap_start

RESULTS = Path(__file__).resolve().parent / "results" / "startup.json"
BIN = Path(sys.executable).parent
RUN = ("started", "first_hit", "total")

IMPORT = """
import time
t = time.perf_counter()
import chords_mq.apps.cli
print(time.perf_counter() - t)
"""
REFERENCE = """
import time
t = time.perf_counter()
from chords_mq.request import RequestSpec
from chords_mq.apps.runner import sequential_reference
from chords_mq.workers.models import load_adapter
spec = RequestSpec(model="digits", steps=50, cores=4, params={"prompt": "a handwritten 7"})
adapter = load_adapter("digits", "cpu")
sequential_reference(adapter, spec)
print(time.perf_counter() - t)
"""
DAEMONS = """
import time
from chords_mq.apps.cluster import LocalCluster
t = time.perf_counter()
cluster = LocalCluster(workers=4, model="digits")
cluster.start()
print(time.perf_counter() - t)
cluster.stop()
"""


def seconds_of(code: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def chords_run(out_dir: Path, overlap: bool) -> tuple[float, float, float]:
    """(launch to the 'started' line, to the first hit row, to exit) of ``chords run``, its
    daemons started while the reference is computed (``overlap``) or after it."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN / "chords"), "run", "--out", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "CHORDS_OVERLAP_START": "1" if overlap else "0"},
    )
    assert process.stdout is not None
    up = first = None
    for line in process.stdout:
        now = time.perf_counter() - started
        words = line.split()
        if up is None and " on digits: " in line:
            up = now
        elif first is None and words and words[0].isdigit() and words[0] != "0":
            first = now
    process.wait(timeout=300)
    total = time.perf_counter() - started
    return up or total, first or total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {
        "import_s": [],
        "adapter_reference_s": [],
        "daemons_s": [],
        **{f"run_{what}_{how}_s": [] for how in ("serial", "overlap") for what in RUN},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            rows["import_s"].append(seconds_of(IMPORT))
            rows["adapter_reference_s"].append(seconds_of(REFERENCE))
            rows["daemons_s"].append(seconds_of(DAEMONS))
            ways = [False, True] if i % 2 == 0 else [True, False]  # alternate which goes first
            for overlap in ways:
                how = "overlap" if overlap else "serial"
                times = chords_run(Path(tmp) / f"run{i}{how}", overlap)
                for what, seconds in zip(RUN, times):
                    rows[f"run_{what}_{how}_s"].append(seconds)
    medians = {key: round(statistics.median(values), 3) for key, values in rows.items()}
    for key, value in medians.items():
        print(f"{key:22s} {value:7.3f} s  ({', '.join(f'{v:.2f}' for v in rows[key])})")
    previous: dict[str, Any] = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text()).get("runs", {})
    previous[args.label] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "medians_s": medians,
        "runs_s": {key: [round(v, 3) for v in values] for key, values in rows.items()},
    }
    previous[args.label]["default_overlaps"] = overlap_start(4)  # what chords run picks here
    result = {"machine": machine_info(), "repeats": args.repeats, "runs": previous}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
