"""Prometheus metrics of a broker, and the small HTTP endpoint that serves them.

``CoreMetrics`` is plain data the pure ``BrokerCore`` updates as it decides (counters and
histogram buckets; no I/O, no locks: the core runs on one thread). ``render`` turns it, and the
core's current state (requests in flight, queued tasks, workers by state), into the Prometheus
text format with ``prometheus_client``'s own families and encoder, at scrape time, on the
broker's event loop. ``MetricsServer`` answers ``GET /metrics`` and ``GET /healthz`` over
asyncio: bounded request size and time, one connection at a time per client socket, loopback
unless told otherwise.

Label sets are bounded: ``method`` (5 methods), ``outcome`` (done, cancelled, or an error code),
``state`` (ready, busy, quarantined), ``reason`` (a fixed list), ``rank`` (1 .. 8, then 9+).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chords_mq.broker.core import BrokerCore

log = logging.getLogger("chords.broker")

TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HIT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
MAX_RANK_LABEL = 8  # ranks above are one label, "9+"
MAX_REQUEST_BYTES = 8192  # an HTTP request line and headers
REQUEST_TIMEOUT_S = 5.0


@dataclass
class Histogram:
    """Cumulative-ready bucket counts, a sum and a count: what a Prometheus histogram holds."""

    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out


def rank_label(rank: int) -> str:
    return str(rank) if rank <= MAX_RANK_LABEL else f"{MAX_RANK_LABEL + 1}+"


@dataclass
class CoreMetrics:
    """What the core counts. Evaluations and retries of running requests live in their
    sessions; those of finished requests are added here when they finish."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, outcome)
    failures: Counter[str] = field(default_factory=Counter)  # worker failures by reason
    finished_evaluations: int = 0
    finished_retries: int = 0
    latent_bytes: int = 0  # latent bytes through the broker, to and from workers
    task_seconds: Histogram = field(default_factory=lambda: Histogram(TASK_BUCKETS))
    hit_seconds: dict[str, Histogram] = field(default_factory=dict)  # by core rank

    def hit(self, rank: int, seconds: float) -> None:
        label = rank_label(rank)
        histogram = self.hit_seconds.get(label)
        if histogram is None:
            histogram = self.hit_seconds[label] = Histogram(HIT_BUCKETS)
        histogram.observe(seconds)


def _families(core: BrokerCore) -> Iterator[Any]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    metrics = core.metrics
    now = core.clock()
    requests = CounterMetricFamily(
        "chords_requests", "Requests finished, by method and outcome", labels=["method", "outcome"]
    )
    for (method, outcome), count in sorted(metrics.requests.items()):
        requests.add_metric([method, outcome], count)
    yield requests
    yield GaugeMetricFamily(
        "chords_requests_in_flight", "Requests accepted and not finished", value=len(core.sessions)
    )
    yield GaugeMetricFamily(
        "chords_queue_tasks",
        "Tasks ready and waiting for a worker",
        value=sum(s.queued for s in core.sessions.values()),
    )
    states = Counter(w.state(now) for w in core.registry.workers.values())
    workers = GaugeMetricFamily("chords_workers", "Registered workers by state", labels=["state"])
    for state in ("ready", "busy", "quarantined"):
        workers.add_metric([state], states.get(state, 0))
    yield workers
    live = list(core.sessions.values())
    yield CounterMetricFamily(
        "chords_evaluations",
        "Model evaluations whose results a plan accepted",
        value=metrics.finished_evaluations + sum(s.evaluations for s in live),
    )
    yield CounterMetricFamily(
        "chords_retries",
        "Tasks run again (a lost, failed, late or bad attempt)",
        value=metrics.finished_retries + sum(s.retries for s in live),
    )
    yield CounterMetricFamily(
        "chords_broker_latent_bytes",
        "Latent bytes through the broker, to and from workers (on the data plane: each hit's)",
        value=metrics.latent_bytes,
    )
    failures = CounterMetricFamily(
        "chords_worker_failures", "Worker failures by reason", labels=["reason"]
    )
    for reason, count in sorted(metrics.failures.items()):
        failures.add_metric([reason], count)
    yield failures
    verify = CounterMetricFamily(
        "chords_verify",
        "Verification by redundancy: replicas queued, checks agreed, mismatches, workers "
        "outvoted, results that could not be verified; across device classes COMPAREs sent "
        "(compares), pairs within the tolerance (compared_agree) or not (compared_differ), "
        "pairs that could not be compared (uncompared), and replicas' answers set aside "
        "unjudged because their worker left (abstained)",
        labels=["outcome"],
    )
    for outcome, count in sorted(core.verification.counts.items()):
        verify.add_metric([outcome], count)
    yield verify
    probes = CounterMetricFamily(
        "chords_probes",
        "Probes of a holder's copy that fetchers of two principals said was corrupt: sent, "
        "confirmed (other bytes: a strike), refuted (the claimants are suspects), no_verdict "
        "(an error or no answer), no_prober (no worker of a third principal), bounded",
        labels=["outcome"],
    )
    for outcome, count in sorted(core.probes.counts.items()):
        probes.add_metric([outcome], count)
    yield probes
    tasks = HistogramMetricFamily(
        "chords_task_seconds", "One EVAL's time as the broker sees it (compute and wire)"
    )
    tasks.add_metric([], metrics.task_seconds.cumulative(), metrics.task_seconds.total)
    yield tasks
    hits = HistogramMetricFamily(
        "chords_hit_seconds",
        "Time from a request's submission to each hit, by the hit's rank (1 = the fastest core)",
        labels=["rank"],
    )
    for label, histogram in sorted(metrics.hit_seconds.items()):
        hits.add_metric([label], histogram.cumulative(), histogram.total)
    yield hits


class _Collector:
    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Any]:
        return _families(self.core)


def render(core: BrokerCore) -> bytes:
    """The Prometheus text exposition of ``core``'s metrics, now."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(core))
    return bytes(generate_latest(registry))


def health(core: BrokerCore) -> dict[str, Any]:
    now = core.clock()
    states = Counter(w.state(now) for w in core.registry.workers.values())
    return {
        "status": "draining" if core.draining else "ok",
        "epoch": core.epoch,
        "workers": dict(states),
        "requests": len(core.sessions),
    }


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON) on ``host:port``."""

    def __init__(self, core: BrokerCore, host: str, port: int) -> None:
        self.core, self.host, self.port = core, host, port
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES
        )
        bound = self.server.sockets[0].getsockname()
        self.port = int(bound[1])
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1]) if len(parts) == 3 else (b"", b"")
            status, kind, body = self._answer(method, path.split(b"?", 1)[0])
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, kind, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        header = (
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, method: bytes, path: bytes) -> tuple[str, str, bytes]:
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return "200 OK", CONTENT_TYPE_LATEST, render(self.core)
        if path == b"/healthz":
            report = health(self.core)
            status = "200 OK" if report["status"] == "ok" else "503 Service Unavailable"
            return status, "application/json", json.dumps(report).encode() + b"\n"
        return "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
