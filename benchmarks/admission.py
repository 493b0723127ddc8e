"""Admission under a burst: many requests at once, each finishes or is refused with a code.

A real broker and 4 synthetic workers (2 ms per forward) run. One AsyncClient submits
``--requests`` small CHORDS requests (N = 20, K = 2) at the same moment, each under its own
100-character request id, and follows every stream to its end. Each request's outcome is
"done" (its DONE arrived), the ``RequestFailed`` code the broker answered with (such as a
"busy" refusal, with its retry hint when the client exposes one), "timeout" when the stream
raised its own timeout at ``--deadline`` seconds, "hung" when it had not even done that 10 s
later (or never got an outcome), or "broker_died" if the broker process exited. A second client
asks for STATUS every second meanwhile. Every wait, the client's included, has a bound.

Reported: the time from the burst to each outcome (max, p50), counts per outcome, STATUS
answers, the broker's RSS peak during the burst and its RSS after (polled for up to 15 s after
the last outcome) against its idle RSS, and whether every request got an outcome in time.
Targets: every request completes or gets a typed refusal within 240 s, none hangs, the
broker's RSS returns to within 20 MB of idle.

Prints a table and writes benchmarks/results/admission.json. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import RssSampler, machine_info, reset_peak, run_bounded, status_bytes
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, RequestFailed, RequestTimeout
from chords_mq.request import RequestSpec

RESULTS = Path(__file__).resolve().parent / "results" / "admission.json"
MB = 1e6
STEPS, CORES = 20, 2
ID_LENGTH = 100
TARGET_DEADLINE_S = 240.0
TARGET_RSS_MB = 20.0
SETTLE_S = 15.0  # how long RSS is polled after the last outcome
# outcomes that are neither a result nor a typed refusal
NOT_ANSWERED = ("timeout", "hung", "broker_died")


def request_id(token: str, index: int) -> str:
    """A distinct id of exactly ``ID_LENGTH`` characters from [A-Za-z0-9_.:/-]."""
    base = f"admission/{token}/{index:06d}:"
    filler = "abcdefghijklmnopqrstuvwxyz0123456789_.-" * 3
    return base + filler[: ID_LENGTH - len(base)]


async def one_request(
    client: AsyncClient,
    token: str,
    index: int,
    deadline: float,
    started: float,
    alive: Callable[[], bool],
    records: dict[int, dict[str, Any]],
) -> None:
    """Follow one request to its outcome and store its record in ``records[index]``.

    The stream's own timeout is the deadline ("timeout"); a stream that ignores it by 10 s
    "hung", and one whose broker process is gone ends at once as "broker_died". Neither of
    these waits for the stream's clean-up.
    """
    spec = RequestSpec("synthetic", method="chords", steps=STEPS, cores=CORES, seed=index)
    stream = client.submit(spec, timeout=deadline, request_id=request_id(token, index))
    record: dict[str, Any] = {"index": index, "hits": 0, "first_hit_s": None}

    async def follow() -> None:
        async for _ in stream:
            if record["first_hit_s"] is None:
                record["first_hit_s"] = round(time.perf_counter() - started, 4)
            record["hits"] += 1

    task = asyncio.ensure_future(follow())
    give_up = time.monotonic() + deadline + 10.0
    outcome: str | None = None
    while outcome is None:
        await asyncio.wait({task}, timeout=0.25)
        if task.done():
            error = None if task.cancelled() else task.exception()
            if error is None:
                outcome = "done"
            elif isinstance(error, RequestFailed):
                outcome = error.code
                record["message"] = error.message[:200]
                retry = getattr(error, "retry_after_s", None)
                if retry is not None:
                    record["retry_after_s"] = retry
            elif isinstance(error, RequestTimeout):
                outcome = "timeout"
            else:  # a benchmark records, it does not stop
                outcome = f"error:{type(error).__name__}"
                record["message"] = str(error)[:200]
        elif not alive():
            outcome = "broker_died"
            task.cancel()
        elif time.monotonic() > give_up:
            outcome = "hung"
            task.cancel()
    record["outcome"] = outcome
    record["seconds"] = round(time.perf_counter() - started, 4)
    record["accepted"] = stream.accepted is not None
    if stream.accepted is not None:
        record["expected_hits"] = len(stream.accepted.get("hit_rounds", []))
    records[index] = record


async def poll_status(
    address: str,
    stop: asyncio.Event,
    alive: Callable[[], bool],
    latencies: list[float | None],
    limit: int = 1000,
) -> None:
    """STATUS every second until ``stop`` or the broker is gone; each latency in seconds,
    None for a timeout (5 s)."""
    async with AsyncClient(address) as client:
        for _ in range(limit):
            if stop.is_set() or not alive():
                break
            begun = time.perf_counter()
            try:
                await client.status(timeout=5.0)
                latencies.append(time.perf_counter() - begun)
            except RequestTimeout:
                latencies.append(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def burst(
    address: str,
    requests: int,
    deadline: float,
    alive: Callable[[], bool],
    records: dict[int, dict[str, Any]],
    latencies: list[float | None],
    clock: dict[str, float],
) -> None:
    """Submit every request at once and follow each to its outcome (into ``records``)."""
    token = uuid.uuid4().hex[:8]
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_status(address, stop, alive, latencies))
    try:
        # the client's "no ACCEPTED" timeout must not cut in before the deadline
        async with AsyncClient(address, accept_timeout_s=deadline) as client:
            started = time.perf_counter()
            clock["started"] = started
            tasks = [
                asyncio.create_task(
                    one_request(client, token, index, deadline, started, alive, records)
                )
                for index in range(requests)
            ]
            await asyncio.wait(tasks, timeout=deadline + 30.0)
            clock["ended"] = time.perf_counter()
    finally:
        stop.set()
        await asyncio.wait({poller}, timeout=10.0)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench(requests: int, deadline: float, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chords-admission-") as scratch:
        cluster = LocalCluster(workers=workers, latency_ms=2.0, log_dir=scratch)
        try:
            cluster.start()
            broker = cluster.broker
            assert broker is not None
            pid = broker.pid

            def is_alive() -> bool:
                return broker.poll() is None

            time.sleep(0.5)
            idle_rss = status_bytes(pid, "VmRSS") or 0
            hwm_reset = reset_peak(pid)
            found: dict[int, dict[str, Any]] = {}
            status_latencies: list[float | None] = []
            clock: dict[str, float] = {}
            with RssSampler(pid) as sampler:
                finished = run_bounded(
                    lambda: burst(
                        cluster.client_address,
                        requests,
                        deadline,
                        is_alive,
                        found,
                        status_latencies,
                        clock,
                    ),
                    deadline + 90.0,
                )
                if not finished:
                    print("the burst did not wind down in time", file=sys.stderr)
                settle_started = time.monotonic()
                after_rss = status_bytes(pid, "VmRSS")
                lowest = after_rss
                while after_rss is not None and time.monotonic() - settle_started < SETTLE_S:
                    time.sleep(0.5)
                    after_rss = status_bytes(pid, "VmRSS")
                    if after_rss is None:
                        break
                    lowest = after_rss if lowest is None else min(lowest, after_rss)
                    within = after_rss - idle_rss <= TARGET_RSS_MB * MB
                    if within and time.monotonic() - settle_started >= 2.0:
                        break
                settle_s = time.monotonic() - settle_started
            hwm = status_bytes(pid, "VmHWM") if hwm_reset else None
            peak_rss = max(sampler.peak, hwm or 0)
            alive = is_alive()
            sessions_after = workers_after = None
            if alive:
                with contextlib.suppress(Exception):
                    status = cluster.wait_for_workers(workers, timeout=10)
                    sessions_after = len(status.get("sessions", []))
                    workers_after = len(status["workers"])
            log_tail = (Path(scratch) / "broker.log").read_bytes()[-3000:]
            returncode = broker.returncode
        finally:
            cluster.stop()

    # a request with no record never reached an outcome: it hung
    records = [
        found.get(index, {"index": index, "outcome": "hung", "seconds": deadline + 30.0})
        for index in range(requests)
    ]
    elapsed = clock.get("ended", time.perf_counter()) - clock.get("started", 0.0)

    outcomes = Counter(record["outcome"] for record in records)
    seconds = [record["seconds"] for record in records]
    answered = [s for s in status_latencies if s is not None]
    unanswered = sum(outcomes[name] for name in NOT_ANSWERED)
    errors = sum(count for name, count in outcomes.items() if name.startswith("error:"))
    in_time = all(record["seconds"] <= deadline for record in records)
    every_outcome = unanswered == 0 and errors == 0 and in_time and len(records) == requests
    rss_after = None if after_rss is None else (after_rss - idle_rss) / MB
    done = [r for r in records if r["outcome"] == "done"]
    retries = [r["retry_after_s"] for r in records if "retry_after_s" in r]
    return {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {
            "requests": requests,
            "deadline_s": deadline,
            "workers": workers,
            "latency_ms": 2.0,
            "request": {"model": "synthetic", "method": "chords", "steps": STEPS, "cores": CORES},
            "request_id_length": ID_LENGTH,
        },
        "targets": {
            "deadline_s": TARGET_DEADLINE_S,
            "hung": 0,
            "rss_after_mb": TARGET_RSS_MB,
        },
        "outcomes": dict(sorted(outcomes.items())),
        "done_with_every_expected_hit": sum(
            1
            for r in done
            if r.get("expected_hits") is not None and r["hits"] >= r["expected_hits"]
        ),
        "retry_after_s": {
            "count": len(retries),
            "min": min(retries) if retries else None,
            "max": max(retries) if retries else None,
        },
        "refusal_messages": sorted(
            {f"{r['outcome']}: {r['message']}" for r in records if "message" in r}
        )[:10],
        "time_to_outcome_s": {
            "max": max(seconds) if seconds else None,
            "p50": percentile(seconds, 0.5),
            "p90": percentile(seconds, 0.9),
            "burst_s": round(elapsed, 3),
        },
        "time_to_outcome_s_by_outcome": {
            name: {
                "max": max(r["seconds"] for r in records if r["outcome"] == name),
                "p50": percentile([r["seconds"] for r in records if r["outcome"] == name], 0.5),
            }
            for name in sorted(outcomes)
        },
        "status": {
            "calls": len(status_latencies),
            "timeouts": len(status_latencies) - len(answered),
            "max_ms": round(max(answered) * 1000, 2) if answered else None,
            "median_ms": round(statistics.median(answered) * 1000, 2) if answered else None,
        },
        "broker": {
            "idle_rss_mb": round(idle_rss / MB, 2),
            "peak_rss_growth_mb": round((peak_rss - idle_rss) / MB, 2),
            "rss_after_mb": None if rss_after is None else round(rss_after, 2),
            "lowest_after_mb": None if lowest is None else round((lowest - idle_rss) / MB, 2),
            "settle_s": round(settle_s, 1),
            "alive": alive,
            "returncode": returncode,  # None while alive
            "workers_after": workers_after,
            "sessions_after": sessions_after,
            "log_tail": log_tail.decode(errors="replace").splitlines()[-6:],
        },
        "verdict": {
            "every_request_has_outcome_in_time": every_outcome,
            "within_target_deadline": all(s <= TARGET_DEADLINE_S for s in seconds),
            "none_hung": unanswered == 0,
            "rss_returned": rss_after is not None and rss_after <= TARGET_RSS_MB,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    def fmt(value: Any, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    by_outcome = result["time_to_outcome_s_by_outcome"]
    print(f"\n{'outcome':<22} {'requests':>9} {'max s':>8} {'p50 s':>8}")
    for name, count in result["outcomes"].items():
        times = by_outcome[name]
        print(f"{name:<22} {count:>9} {fmt(times['max']):>8} {fmt(times['p50']):>8}")
    timing, broker, verdict = result["time_to_outcome_s"], result["broker"], result["verdict"]
    status = result["status"]
    rows = [
        ("requests", str(result["config"]["requests"]), "", None),
        (
            "time to outcome max / p50, s",
            f"{fmt(timing['max'])} / {fmt(timing['p50'])}",
            f"<= {TARGET_DEADLINE_S:g}",
            verdict["within_target_deadline"],
        ),
        (
            "every request has an outcome",
            str(verdict["every_request_has_outcome_in_time"]),
            "True",
            verdict["every_request_has_outcome_in_time"],
        ),
        (
            "timeout / hung / broker died",
            str(sum(result["outcomes"].get(n, 0) for n in NOT_ANSWERED)),
            "0",
            verdict["none_hung"],
        ),
        (
            "broker RSS after - idle, MB",
            fmt(broker["rss_after_mb"]),
            f"<= {TARGET_RSS_MB:g}",
            verdict["rss_returned"],
        ),
        ("broker RSS peak - idle, MB", fmt(broker["peak_rss_growth_mb"]), "", None),
        (
            "STATUS max / median ms (timeouts)",
            f"{fmt(status['max_ms'], '.1f')} / {fmt(status['median_ms'], '.1f')} "
            f"({status['timeouts']}/{status['calls']})",
            "",
            None,
        ),
        (
            "broker alive (workers, sessions)",
            f"{broker['alive']} ({broker['workers_after']}, {broker['sessions_after']})"
            if broker["alive"]
            else f"False (exit {broker['returncode']})",
            "",
            None,
        ),
    ]
    print(f"\n{'figure':<34} {'value':>22} {'target':>10} {'met':>5}")
    for name, value, target, met in rows:
        print(f"{name:<34} {value:>22} {target:>10} {'' if met is None else str(met):>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=800, help="requests submitted at once (default 800)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=TARGET_DEADLINE_S,
        help="seconds a request may take to an outcome (default 240)",
    )
    parser.add_argument("--workers", type=int, default=4, help="synthetic workers (default 4)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.requests < 1 or args.deadline <= 0 or args.workers < 1:
        parser.error("--requests and --workers must be at least 1, --deadline positive")
    result = bench(args.requests, args.deadline, args.workers)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
