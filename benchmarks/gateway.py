"""chords-gateway's cost per request: a digits request (K = 4, N = 50) through HTTP against the
same request through ``AsyncClient`` directly, in the same run, and requests per second with 50
in flight.

A real broker, ``--workers`` digits workers (default 2: one per CPU here) and chords-gateway in
front of the broker, with an API key and a per-key limit (64) that lets 50 requests run at once.
The HTTP client is a plain kept-alive HTTP/1.1 connection (tests/integration/gateway_probes.py),
so what is measured is the gateway, not a client library; the direct path is one AsyncClient
that follows every hit of the request to its end, with the very RequestSpec the gateway makes
of the same body (``parse_image_request``).

Latency: 3 warm-up pairs, then ``--reps`` (60) pairs; each pair runs one request (its own seed, the
same in both) through the gateway (``POST /v1/images/generations``, ``b64_json``: the returned
hit's PNG in JSON) and directly, in alternating order. Then the same for the stream (``stream:
true``, ``partial_images: 4``): time to the first partial image and to the completed event,
against the first and the last hit directly. Reported: median and p90 of each, the gateway's
added time (median of the pairs' differences; min against min too) and the target, 5 ms + 5 %
of the direct median.

Throughput: ``--requests`` requests (default 200, seeds all different) with 50 in flight at a
time, through the gateway (50 kept-alive connections) and directly (one AsyncClient, 50 streams),
alternating, ``--passes`` (3) times each. Reported: requests per second, the time per request
(1 / rate) and what the gateway adds to it against the same target, and the gateway process's
CPU seconds per request (it shares the CPUs with the workers).

Prints a table and writes benchmarks/results/gateway.json. Not a test: nothing here asserts.

    deploy/dev.sh python -m benchmarks.gateway          # about 6 minutes on 2 CPUs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.local_gateway import LocalGateway
from chords_mq.client import AsyncClient
from chords_mq.gateway.apikeys import create_key
from chords_mq.gateway.images import parse_image_request
from chords_mq.request import RequestSpec
from tests.integration.gateway_probes import Connection, image_body

RESULTS = Path(__file__).resolve().parent / "results" / "gateway.json"
STEPS, CORES = 50, 4
CONCURRENCY = 50
TIMEOUT_S = 300.0  # every request's bound: a hang is an outcome, not a wait forever
TARGET_MS, TARGET_FRACTION = 5.0, 0.05


def spec_of(body: bytes) -> RequestSpec:
    """The RequestSpec the gateway submits for ``body``."""
    return parse_image_request(json.loads(body), max_n=8, max_prompt_chars=4000).specs[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(values) * 1000, 2),
        "p90_ms": round(quantile(values, 0.9) * 1000, 2),
        "mean_ms": round(statistics.fmean(values) * 1000, 2),
        "min_ms": round(min(values) * 1000, 2),
        "n": len(values),
    }


class Paths:
    """The two ways to run one request: through the gateway, and with AsyncClient directly."""

    def __init__(self, url: str, key: str, client: AsyncClient) -> None:
        self.url = url
        self.key = key
        self.client = client
        self.connection = Connection(url)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    async def gateway(self, body: bytes, connection: Connection | None = None) -> float:
        started = time.perf_counter()
        answer = await asyncio.wait_for(
            (connection or self.connection).request(
                "POST", "/v1/images/generations", body=body, headers=self.headers
            ),
            TIMEOUT_S,
        )
        took = time.perf_counter() - started
        if answer.status != 200 or not answer.json()["data"][0]["b64_json"]:
            raise RuntimeError(f"gateway answered {answer.status}: {answer.body[:200]!r}")
        return took

    async def gateway_stream(self, body: bytes) -> tuple[float, float]:
        """Seconds to the first partial image and to the end of the stream."""
        started = time.perf_counter()
        first: list[float] = []

        def seen(chunk: bytes) -> None:
            if not first and b"image_generation.partial_image" in chunk:
                first.append(time.perf_counter() - started)

        answer = await asyncio.wait_for(
            self.connection.request(
                "POST", "/v1/images/generations", body=body, headers=self.headers, on_chunk=seen
            ),
            TIMEOUT_S,
        )
        took = time.perf_counter() - started
        if answer.status != 200 or b"image_generation.completed" not in answer.body or not first:
            raise RuntimeError(f"gateway stream answered {answer.status}: {answer.body[:200]!r}")
        return first[0], took

    async def direct(self, body: bytes, all_cores: bool = True) -> tuple[float, float]:
        """Seconds to the first hit and to the end of the request, every hit followed;
        ``all_cores``: check it had every core's hit (not under load: the broker's adaptive
        policy then grants a request fewer cores, through the gateway or not)."""
        spec = spec_of(body)
        started = time.perf_counter()
        first: float | None = None
        hits = 0

        async def follow() -> None:
            nonlocal first, hits
            stream = self.client.submit(
                spec, timeout=TIMEOUT_S, request_id=f"bench.{uuid.uuid4().hex}"
            )
            async for hit in stream:
                hits += 1
                if first is None:
                    first = time.perf_counter() - started
                if hit.media is None:
                    raise RuntimeError("a hit came without its picture")

        await asyncio.wait_for(follow(), TIMEOUT_S)
        took = time.perf_counter() - started
        if first is None or (all_cores and hits != CORES + 1):
            raise RuntimeError(f"direct request gave {hits} hits")
        return first, took


async def latency(paths: Paths, reps: int) -> dict[str, Any]:
    plain_gw: list[float] = []
    plain_direct: list[float] = []
    stream_first: list[float] = []
    stream_end: list[float] = []
    direct_first: list[float] = []
    direct_end: list[float] = []
    for rep in range(-3, reps):  # negative: warm-up
        body = image_body(seed=1000 + rep, steps=STEPS, cores=CORES)
        streamed = image_body(
            seed=2000 + rep, steps=STEPS, cores=CORES, stream=True, partial_images=CORES
        )
        runs: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("gateway", lambda body=body: paths.gateway(body)),
            ("direct", lambda body=body: paths.direct(body)),
        ]
        streams: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("gateway", lambda body=streamed: paths.gateway_stream(body)),
            ("direct", lambda body=streamed: paths.direct(body)),
        ]
        if rep % 2:  # alternate which goes first
            runs.reverse()
            streams.reverse()
        found: dict[str, Any] = {}
        for name, run in runs:
            found[name] = await run()
        for name, run in streams:
            found["stream_" + name] = await run()
        if rep < 0:
            continue
        plain_gw.append(found["gateway"])
        plain_direct.append(found["direct"][1])
        stream_first.append(found["stream_gateway"][0])
        stream_end.append(found["stream_gateway"][1])
        direct_first.append(found["stream_direct"][0])
        direct_end.append(found["stream_direct"][1])
    added = [g - d for g, d in zip(plain_gw, plain_direct, strict=True)]
    added_first = [g - d for g, d in zip(stream_first, direct_first, strict=True)]
    added_end = [g - d for g, d in zip(stream_end, direct_end, strict=True)]
    direct_median = statistics.median(plain_direct)
    target_s = TARGET_MS / 1000 + TARGET_FRACTION * direct_median
    return {
        "gateway": summary(plain_gw),
        "direct": summary(plain_direct),
        "added_median_ms": round(statistics.median(added) * 1000, 2),
        "added_p90_ms": round(quantile(added, 0.9) * 1000, 2),
        "added_min_to_min_ms": round((min(plain_gw) - min(plain_direct)) * 1000, 2),
        "target_ms": round(target_s * 1000, 2),
        "within_target": statistics.median(added) <= target_s,
        "stream": {
            "gateway_first_partial": summary(stream_first),
            "direct_first_hit": summary(direct_first),
            "added_first_median_ms": round(statistics.median(added_first) * 1000, 2),
            "gateway_completed": summary(stream_end),
            "direct_last_hit": summary(direct_end),
            "added_end_median_ms": round(statistics.median(added_end) * 1000, 2),
        },
    }


async def throughput_pass(
    run: Callable[[int, int], Awaitable[Any]], requests: int, seed0: int
) -> float:
    """Seconds for ``requests`` requests, CONCURRENCY in flight at a time."""
    next_index = 0

    async def lane(lane_id: int) -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            await run(lane_id, seed0 + index)

    started = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(CONCURRENCY)))
    return time.perf_counter() - started


async def throughput(paths: Paths, gateway_pid: int, requests: int, passes: int) -> dict[str, Any]:
    connections = [Connection(paths.url) for _ in range(CONCURRENCY)]

    async def through_gateway(lane: int, seed: int) -> None:
        await paths.gateway(image_body(seed=seed, steps=STEPS, cores=CORES), connections[lane])

    async def directly(lane: int, seed: int) -> None:
        await paths.direct(image_body(seed=seed, steps=STEPS, cores=CORES), all_cores=False)

    rates: dict[str, list[float]] = {"gateway": [], "direct": []}
    cpu_per_request: list[float] = []
    seed0 = 100_000
    for number in range(passes):
        order = [("gateway", through_gateway), ("direct", directly)]
        if number % 2:
            order.reverse()
        for name, run in order:
            cpu_before = cpu_seconds(gateway_pid)
            seconds = await throughput_pass(run, requests, seed0)
            seed0 += requests
            rates[name].append(requests / seconds)
            if name == "gateway":
                cpu_per_request.append((cpu_seconds(gateway_pid) - cpu_before) / requests)
            print(f"  pass {number + 1} {name}: {requests / seconds:.2f} requests/s", flush=True)
    for connection in connections:
        await connection.close()
    gateway_rate = statistics.median(rates["gateway"])
    direct_rate = statistics.median(rates["direct"])
    per_gateway, per_direct = 1 / gateway_rate, 1 / direct_rate
    target_s = TARGET_MS / 1000 + TARGET_FRACTION * per_direct
    return {
        "concurrency": CONCURRENCY,
        "requests_per_pass": requests,
        "passes": passes,
        "gateway_rps": [round(r, 3) for r in rates["gateway"]],
        "direct_rps": [round(r, 3) for r in rates["direct"]],
        "gateway_rps_median": round(gateway_rate, 3),
        "direct_rps_median": round(direct_rate, 3),
        "ms_per_request_gateway": round(per_gateway * 1000, 2),
        "ms_per_request_direct": round(per_direct * 1000, 2),
        "added_ms_per_request": round((per_gateway - per_direct) * 1000, 2),
        "target_ms": round(target_s * 1000, 2),
        "within_target": per_gateway - per_direct <= target_s,
        "gateway_cpu_ms_per_request": round(statistics.median(cpu_per_request) * 1000, 2),
    }


async def measure(url: str, key: str, broker: str, pid: int, args: argparse.Namespace) -> Any:
    async with AsyncClient(broker) as client:
        paths = Paths(url, key, client)
        try:
            print("latency ...", flush=True)
            one = await latency(paths, args.reps)
            print("throughput ...", flush=True)
            many = await throughput(paths, pid, args.requests, args.passes)
        finally:
            await paths.connection.close()
    return one, many


def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chords-gateway-bench-") as tmp:
        root = Path(tmp)
        cluster = LocalCluster(workers=args.workers, model="digits", log_dir=root / "logs")
        cluster.launch()
        keys = root / "api-keys"
        key = create_key(keys, "bench")
        gateway = LocalGateway(
            cluster.client_address,
            ["--api-keys", str(keys), "--max-requests-per-key", str(CONCURRENCY + 14)],
            log_path=root / "logs" / "gateway.log",
        )
        try:
            gateway.start()
            status = cluster.wait_for_workers(args.workers, timeout=120)
            assert gateway.process is not None
            one, many = asyncio.run(
                measure(gateway.url, key, cluster.client_address, gateway.process.pid, args)
            )
        finally:
            gateway.stop()
            cluster.stop()
    return {
        "benchmark": "gateway",
        "model": "digits",
        "steps": STEPS,
        "cores": CORES,
        "workers": args.workers,
        "reps": args.reps,
        "target": f"the gateway adds at most {TARGET_MS:g} ms + {TARGET_FRACTION:.0%} per request",
        "latency": one,
        "throughput": many,
        "machine": machine_info(status),
    }


def print_table(result: dict[str, Any]) -> None:
    one, many = result["latency"], result["throughput"]
    stream = one["stream"]
    print()
    print(
        f"chords-gateway against AsyncClient directly: digits, N={result['steps']}, "
        f"K={result['cores']}, {result['workers']} workers, {one['gateway']['n']} pairs"
    )
    print(f"{'':38} {'median ms':>10} {'p90 ms':>10} {'min ms':>10}")
    rows = [
        ("one request, through the gateway", one["gateway"]),
        ("one request, AsyncClient directly", one["direct"]),
        ("stream: first partial image (gateway)", stream["gateway_first_partial"]),
        ("stream: first hit (directly)", stream["direct_first_hit"]),
        ("stream: completed event (gateway)", stream["gateway_completed"]),
        ("stream: last hit (directly)", stream["direct_last_hit"]),
    ]
    for label, row in rows:
        print(f"{label:38} {row['median_ms']:>10.2f} {row['p90_ms']:>10.2f} {row['min_ms']:>10.2f}")
    verdict = "within" if one["within_target"] else "OVER"
    print(
        f"added by the gateway: median {one['added_median_ms']:.2f} ms (p90 "
        f"{one['added_p90_ms']:.2f}, min against min {one['added_min_to_min_ms']:.2f}); "
        f"first partial {stream['added_first_median_ms']:.2f} ms, "
        f"completed {stream['added_end_median_ms']:.2f} ms; target {one['target_ms']:.2f} ms: "
        f"{verdict}"
    )
    print()
    print(f"{CONCURRENCY} in flight, {many['requests_per_pass']} requests a pass:")
    print(
        f"  gateway {many['gateway_rps_median']:.2f} requests/s "
        f"({many['ms_per_request_gateway']:.2f} ms each), "
        f"directly {many['direct_rps_median']:.2f} requests/s "
        f"({many['ms_per_request_direct']:.2f} ms each)"
    )
    verdict = "within" if many["within_target"] else "OVER"
    print(
        f"  added per request {many['added_ms_per_request']:.2f} ms; target "
        f"{many['target_ms']:.2f} ms: {verdict}; gateway CPU "
        f"{many['gateway_cpu_ms_per_request']:.2f} ms per request"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="digits workers (default 2)")
    parser.add_argument("--reps", type=int, default=60, help="latency pairs (default 60)")
    parser.add_argument(
        "--requests", type=int, default=200, help="requests per throughput pass (default 200)"
    )
    parser.add_argument("--passes", type=int, default=3, help="throughput passes per path (3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if min(args.workers, args.reps, args.requests, args.passes) < 1:
        parser.error("--workers, --reps, --requests and --passes must be at least 1")
    result = bench(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
