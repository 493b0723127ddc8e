"""chords-gateway under abuse: a burst of concurrent requests from one key past its limit, and
a flood of malformed requests. Does every request get an answer, and does memory stay bounded?

A real broker, ``--workers`` digits workers (default 2) and chords-gateway in front of it, with
one API key and ``--max-requests-per-key 8`` (the default), all real processes on loopback. The
HTTP client is raw asyncio sockets (tests/integration/gateway_probes.py), so a request can be as
malformed as a hostile client makes it.

Burst: ``--burst`` (default 200) image requests (digits, K = 4, N = 50, seeds all different)
from the one key at the same moment, each on its own connection, each bounded by 300 s. Each
must get 200 (it ran) or 429 with Retry-After (past the key's 8), and none may hang. Then the
same burst again with every client retrying a 429 after its Retry-After (at most 60 tries), so
that all of them run through the 8 slots. Reported: counts by status, the time until all had
answered, the gateway's RSS before the burst, its peak during it and after.

Flood: ``--malformed`` (default 10,000) malformed requests over 16 connections, the corpus of
``malformed_corpus`` in turn: bad JSON (truncated, garbage, invalid UTF-8, 100,000-deep nesting,
empty), a body that is not an object, wrong types (steps, cores, prompt, model, n, stream, size,
seed), bad values, a missing prompt, a 50,000-character prompt, unknown fields, an unknown model,
2 MiB bodies (declared and chunked), a bad Content-Length, bad keys (wrong, missing, wrong
scheme), a wrong method, unknown paths and video ids, bad /v1/schedule queries. Each must be
answered 4xx (the one its kind expects). Reported: counts by kind and status, the unexpected
answers, the time, requests per second, the gateway's RSS before the first malformed request,
its peak and 2 s after (target: growth <= 10 MB). Then the same flood again (growth that repeats
would be a leak). Last, that the gateway is still alive and still serves a valid request.

Prints a table and writes benchmarks/results/gateway_abuse.json. Not a test: nothing here
asserts.

    deploy/dev.sh python -m benchmarks.gateway_abuse    # about 1 minute on 2 CPUs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import RssSampler, machine_info, reset_peak, status_bytes
from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.local_gateway import LocalGateway
from chords_mq.gateway.apikeys import create_key
from tests.integration.gateway_probes import (
    Connection,
    bearer,
    burst,
    flood,
    image_body,
    malformed_corpus,
)

RESULTS = Path(__file__).resolve().parent / "results" / "gateway_abuse.json"
MAX_PER_KEY = 8
TIMEOUT_S = 300.0
RSS_TARGET_MB = 10.0


def mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 2)


async def burst_with_retries(url: str, key: str, count: int) -> dict[str, Any]:
    """``count`` requests at once; a 429 is tried again after its Retry-After, up to 60 tries."""
    statuses: Counter[str] = Counter()
    tries: list[int] = []

    async def one(seed: int) -> None:
        connection = Connection(url)
        try:
            for attempt in range(1, 61):
                answer = await asyncio.wait_for(
                    connection.request(
                        "POST",
                        "/v1/images/generations",
                        body=image_body(seed),
                        headers={"Content-Type": "application/json", **bearer(key)},
                    ),
                    TIMEOUT_S,
                )
                statuses[str(answer.status)] += 1
                if answer.status != 429:
                    tries.append(attempt)
                    return
                await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
            tries.append(61)
        except asyncio.TimeoutError:
            statuses["hung"] += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(10_000 + seed) for seed in range(count)))
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "answers": dict(sorted(statuses.items())),
        "ran": len([t for t in tries if t <= 60]),
        "max_tries": max(tries, default=0),
    }


def valid_request_works(url: str, key: str) -> bool:
    request = urllib.request.Request(
        f"{url}/v1/images/generations",
        data=image_body(seed=5),
        headers={"Content-Type": "application/json", **bearer(key)},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
        return answer.status == 200 and bool(json.load(answer)["data"][0]["b64_json"])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chords-gateway-abuse-") as tmp:
        root = Path(tmp)
        cluster = LocalCluster(workers=args.workers, model="digits", log_dir=root / "logs")
        cluster.launch()
        keys = root / "api-keys"
        key = create_key(keys, "abuse")
        gateway = LocalGateway(
            cluster.client_address,
            ["--api-keys", str(keys), "--max-requests-per-key", str(MAX_PER_KEY)],
            log_path=root / "logs" / "gateway.log",
        )
        try:
            gateway.start()
            status = cluster.wait_for_workers(args.workers, timeout=120)
            assert gateway.process is not None
            pid, url = gateway.process.pid, gateway.url
            assert valid_request_works(url, key)  # warm: the first request's imports
            result = {"burst": run_burst(url, key, pid, args.burst)}
            result["flood"] = run_flood(url, key, pid, args.malformed)
            # the same again: growth that repeats is a leak, growth that does not is warm-up
            result["flood_again"] = run_flood(url, key, pid, args.malformed)
            alive = gateway.process.poll() is None
            result["alive_after"] = alive
            result["valid_request_after"] = alive and valid_request_works(url, key)
        finally:
            code = gateway.stop()
            cluster.stop()
        log = (root / "logs" / "gateway.log").read_bytes()
    result["gateway_exit_code"] = code
    result["gateway_log_bytes"] = len(log)
    return {
        "benchmark": "gateway_abuse",
        "workers": args.workers,
        "max_requests_per_key": MAX_PER_KEY,
        **result,
        "machine": machine_info(status),
    }


def run_burst(url: str, key: str, pid: int, count: int) -> dict[str, Any]:
    print(f"burst: {count} requests at once from one key ...", flush=True)
    before = status_bytes(pid, "VmRSS")
    reset_peak(pid)
    with RssSampler(pid) as sampler:
        once = asyncio.run(burst(url, key, count, timeout=TIMEOUT_S, steps=50, cores=4))
        after_once = status_bytes(pid, "VmRSS")
        print("  then again, retrying each 429 after its Retry-After ...", flush=True)
        retried = asyncio.run(burst_with_retries(url, key, count))
    time.sleep(2.0)
    after = status_bytes(pid, "VmRSS")
    counts = once.counts()
    return {
        "requests": count,
        "answers": counts,
        "only_200_or_429": set(counts) <= {"200", "429"},
        "hung": counts.get("hung", 0),
        "retry_after_values": dict(once.retry_after),
        "seconds_until_all_answered": round(once.seconds, 3),
        "with_retries": retried,
        "rss_before_mb": mb(before),
        "rss_after_burst_mb": mb(after_once),
        "rss_peak_mb": mb(max(sampler.peak, status_bytes(pid, "VmHWM") or 0)),
        "rss_after_mb": mb(after),
    }


def run_flood(url: str, key: str, pid: int, count: int) -> dict[str, Any]:
    corpus = malformed_corpus(key)
    print(f"flood: {count} malformed requests of {len(corpus)} kinds ...", flush=True)
    before = status_bytes(pid, "VmRSS")
    reset_peak(pid)
    with RssSampler(pid) as sampler:
        result = asyncio.run(flood(url, corpus, count, connections=16, timeout=60))
    time.sleep(2.0)
    after = status_bytes(pid, "VmRSS")
    statuses: Counter[str] = Counter()
    for counts in result.by_kind.values():
        statuses.update(counts)
    growth = None if before is None or after is None else (after - before) / 2**20
    peak = max(sampler.peak, status_bytes(pid, "VmHWM") or 0)
    return {
        "requests": result.sent,
        "kinds": len(corpus),
        "answers": dict(sorted(statuses.items())),
        "all_4xx": result.all_4xx(),
        "unexpected": result.unexpected,
        "by_kind": {kind: dict(counts) for kind, counts in result.by_kind.items()},
        "seconds": round(result.seconds, 2),
        "requests_per_s": round(result.sent / result.seconds, 1),
        "rss_before_mb": mb(before),
        "rss_peak_mb": mb(peak),
        "rss_after_mb": mb(after),
        "rss_growth_mb": None if growth is None else round(growth, 2),
        "rss_peak_growth_mb": None if before is None else mb(peak - before),
        "rss_target_mb": RSS_TARGET_MB,
        "within_target": growth is not None and growth <= RSS_TARGET_MB,
    }


def print_table(result: dict[str, Any]) -> None:
    one = result["burst"]
    print()
    print(
        f"chords-gateway, one key, --max-requests-per-key {result['max_requests_per_key']}, "
        f"{result['workers']} digits workers"
    )
    print(
        f"burst of {one['requests']} at once: {one['answers']} (only 200 or 429: "
        f"{one['only_200_or_429']}, hung: {one['hung']}), all answered in "
        f"{one['seconds_until_all_answered']:.2f} s; Retry-After {one['retry_after_values']}"
    )
    retried = one["with_retries"]
    print(
        f"  retrying each 429: {retried['ran']} of {one['requests']} ran in "
        f"{retried['seconds']:.2f} s ({retried['answers']}, at most {retried['max_tries']} tries)"
    )
    print(
        f"  gateway RSS {one['rss_before_mb']} MB before, {one['rss_after_burst_mb']} MB after "
        f"the burst, peak {one['rss_peak_mb']} MB, {one['rss_after_mb']} MB after the retries"
    )
    for name, label in (("flood", "flood"), ("flood_again", "again")):
        flood_ = result[name]
        print(
            f"{label}: {flood_['requests']} malformed requests ({flood_['kinds']} kinds): "
            f"{flood_['answers']}, all 4xx: {flood_['all_4xx']}, unexpected: "
            f"{len(flood_['unexpected'])}; {flood_['seconds']:.1f} s, "
            f"{flood_['requests_per_s']} /s"
        )
        verdict = "within" if flood_["within_target"] else "OVER"
        print(
            f"  gateway RSS {flood_['rss_before_mb']} MB before, peak {flood_['rss_peak_mb']} "
            f"MB, {flood_['rss_after_mb']} MB after: growth {flood_['rss_growth_mb']} MB "
            f"(target {flood_['rss_target_mb']:g} MB: {verdict})"
        )
    print(
        f"alive after: {result['alive_after']}; a valid request after: "
        f"{result['valid_request_after']}"
    )
    print(f"gateway exit code on SIGTERM: {result['gateway_exit_code']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="digits workers (default 2)")
    parser.add_argument("--burst", type=int, default=200, help="requests at once (default 200)")
    parser.add_argument(
        "--malformed", type=int, default=10_000, help="malformed requests (default 10,000)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if min(args.workers, args.burst, args.malformed) < 1:
        parser.error("--workers, --burst and --malformed must be at least 1")
    result = bench(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
