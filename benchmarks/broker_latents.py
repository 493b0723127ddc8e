"""Latents through the broker per request (issue 25: "x0 never crosses the broker on the data
plane"): the request stats' ``broker_latent_bytes`` in units of the latent, for one sequential
and one CHORDS K=4 request, with the data plane on and off.

A real broker and 4 real ``chords-worker`` processes (``LocalCluster``) serve the synthetic model
with a 16 MiB float32 latent (params ``shape`` [4, 1024, 1024]), N=10, seed 0. On the data plane
a request should move only its hits' latents (1 for sequential, K+1 for CHORDS); off it, x0 and
every task's input and result.

    PYTHONPATH=. python -m benchmarks.broker_latents [--label after]

(``PYTHONPATH=.``: the broker and workers start from the installed console scripts, so a
checkout other than the installed one measures its own code only with it.)

Prints a table and writes benchmarks/results/broker_latents.json under the label (the commit
measured goes with it). Not a test: nothing asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import plane_args, save_labelled
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "broker_latents.json"
SHAPE = [4, 1024, 1024]  # float32: 16 MiB
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (("sequential", {}), ("chords", {"cores": 4}))


async def one(cluster: LocalCluster, spec: RequestSpec) -> tuple[int, dict[str, Any]]:
    """The request's hit count and its DONE stats."""
    async with AsyncClient(cluster.client_address) as client:
        stream = client.submit(spec, timeout=300)
        hits = [hit async for hit in stream]
        assert stream.stats is not None
        return len(hits), stream.stats


def measure(steps: int) -> list[dict[str, Any]]:
    rows = []
    for plane in ("on", "off"):
        with LocalCluster(workers=4, extra_broker_args=plane_args(plane)) as cluster:
            cluster.wait_for_workers(4)
            for method, extra in METHODS:
                params = {"shape": SHAPE}
                spec = RequestSpec(
                    model="synthetic", method=method, steps=steps, seed=0, params=params, **extra
                )
                hits, stats = asyncio.run(one(cluster, spec))
                through = stats["broker_latent_bytes"]
                rows.append(
                    {
                        "data_plane": plane,
                        "method": method,
                        "hits": hits,
                        "latent_bytes": stats["latent_bytes"],
                        "broker_latent_bytes": through,
                        "latents": through / stats["latent_bytes"],
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = measure(args.steps)
    print(f"{'data plane':>10} {'method':>10} {'hits':>4} {'latents through the broker':>26}")
    for row in rows:
        print(
            f"{row['data_plane']:>10} {row['method']:>10} {row['hits']:>4} {row['latents']:>26.2f}"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    save_labelled(args.out, args.label, {"commit": commit, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
