"""The gateway's Prometheus metrics: HTTP requests by route and status, their latency, the
requests running now and the hits streamed. Its own registry (one per app), served at
``/metrics``. Route labels are the app's route templates, so label sets stay bounded."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chords_gateway_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "chords_gateway_request_seconds",
            "Seconds from a request's arrival to the end of its answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "chords_gateway_requests_in_flight",
            "HTTP requests being answered now.",
            registry=self.registry,
        )
        self.hits = Counter(
            "chords_gateway_hits_streamed",
            "Partial images sent in event streams.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


FIXED_ROUTES = frozenset(
    {"/", "/healthz", "/metrics", "/v1/models", "/v1/images/generations", "/v1/videos"}
)
FIXED_ROUTES |= {"/v1/schedule"}


def route_of(path: str) -> str:
    """The route template a path matches (``/v1/videos/{id}``), else ``other``: a bounded
    label set whatever paths clients send."""
    if path in FIXED_ROUTES:
        return path
    if path.startswith("/v1/videos/"):
        return "/v1/videos/{id}/content" if path.endswith("/content") else "/v1/videos/{id}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


class Metered:
    """ASGI middleware counting each HTTP request by route and status, and timing it."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        route = route_of(scope.get("path", ""))
        status = {"code": 500}
        started = time.monotonic()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)
