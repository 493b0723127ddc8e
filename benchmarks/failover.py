"""How fast the broker notices a dead worker: SIGKILL (TCP disconnect) and SIGSTOP (hung).

Starts a local cluster of 3 synthetic workers (50 ms per forward), runs a request, kills or
freezes one worker mid-request and polls STATUS until the broker drops it. Prints the delays and
writes benchmarks/results/failover.json. Not a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient

RESULTS = Path(__file__).resolve().parent / "results" / "failover.json"


async def detection_ms(cluster: LocalCluster, client: AsyncClient, victim: int, sig: int) -> float:
    stream = client.generate("synthetic", cores=2, steps=400, seed=1).__aiter__()
    await stream.__anext__()  # the request is running
    await asyncio.sleep(0.3)
    before = len((await client.status())["workers"])
    started = time.perf_counter()
    os.kill(cluster.workers[victim].pid, sig)
    while len((await client.status())["workers"]) == before:
        await asyncio.sleep(0.002)
    elapsed = (time.perf_counter() - started) * 1000
    await stream.aclose()
    return elapsed


async def main() -> None:
    cluster = LocalCluster(workers=3, latency_ms=50.0).start()
    try:
        async with AsyncClient(cluster.client_address) as client:
            killed = await detection_ms(cluster, client, 0, signal.SIGKILL)
            frozen = await detection_ms(cluster, client, 1, signal.SIGSTOP)
        os.kill(cluster.workers[1].pid, signal.SIGKILL)
    finally:
        cluster.stop()
    print(f"{'failure':<22} {'detected after ms':>18}")
    print(f"{'SIGKILL (disconnect)':<22} {killed:>18.0f}")
    print(f"{'SIGSTOP (hung)':<22} {frozen:>18.0f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "sigkill_ms": round(killed, 1),
                "sigstop_ms": round(frozen, 1),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
