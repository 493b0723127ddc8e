"""What the worker's result digest costs (issue 26): ``tensor_digest`` (SHA-256/128 over dtype,
shape and bytes) against the rest of ``Worker._keep`` (the store's put and the finiteness check)
for one result, and against the fetch check a worker makes of what it fetched (the same digest
of the received bytes). CPU only: on a GPU the digest adds a device-to-host copy of the result.

    python -m benchmarks.digest_cost [--mib 16] [--repeats 20]

Prints a table and writes benchmarks/results/digest_cost.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chords_mq.algorithms.base import Ref, all_finite
from chords_mq.apps.bench import machine_info
from chords_mq.wire.base import tensor_digest
from chords_mq.workers.store import LatentStore

RESULTS = Path(__file__).resolve().parent / "results" / "digest_cost.json"


def median_ms(run: Callable[[int], Any], repeats: int) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a worker's compute thread
    tensor = torch.randn(args.mib * (1 << 20) // 4, generator=torch.Generator().manual_seed(0))
    store = LatentStore("cpu")

    def put(i: int) -> None:
        store.put("r", Ref(i, 1), tensor)
        store.release("r")

    rows = {
        "store.put": median_ms(put, args.repeats),
        "all_finite": median_ms(lambda i: all_finite(tensor), args.repeats),
        "tensor_digest": median_ms(lambda i: tensor_digest(tensor), args.repeats),
    }
    rest = rows["store.put"] + rows["all_finite"]
    share = rows["tensor_digest"] / (rest + rows["tensor_digest"])
    print(f"one {args.mib} MiB float32 result, median of {args.repeats}, 1 thread")
    print(f"{'step':<16}{'ms':>10}")
    for name, ms in rows.items():
        print(f"{name:<16}{ms:>10.2f}")
    print(f"digest share of _keep: {100 * share:.0f} %")
    result = {
        "mib": args.mib,
        "repeats": args.repeats,
        "median_ms": {k: round(v, 3) for k, v in rows.items()},
        "digest_share_of_keep": round(share, 3),
        "machine": machine_info(),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
