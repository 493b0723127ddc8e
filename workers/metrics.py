"""A worker's Prometheus metrics (``chords-worker --metrics-bind HOST:PORT``): forward times,
tasks served, and the device's memory where torch can tell. Served by ``prometheus_client``'s
own HTTP server on a thread, from a registry of this worker only; its metric objects are
thread-safe, and the device memory is read at scrape time."""

from __future__ import annotations

from typing import Any

import torch

FORWARD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, device: str, model: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.forward = Histogram(
            "chords_worker_forward_seconds",
            "One EVAL's model forward and solver steps on this worker",
            registry=self.registry,
            buckets=FORWARD_BUCKETS,
        )
        self.tasks = Counter(
            "chords_worker_tasks", "Tasks this worker evaluated", registry=self.registry
        )
        self.failures = Counter(
            "chords_worker_failures", "EVALs this worker could not run", registry=self.registry
        )
        info = Gauge(
            "chords_worker_info",
            "This worker's model and device (always 1)",
            ["model", "device"],
            registry=self.registry,
        )
        info.labels(model=model, device=device).set(1)
        self.device = torch.device(device)
        memory = Gauge(
            "chords_worker_device_memory_bytes",
            "Device memory allocated by torch on this worker's device (CUDA only)",
            ["kind"],
            registry=self.registry,
        )
        if self.device.type == "cuda":
            memory.labels(kind="allocated").set_function(self._allocated)
            memory.labels(kind="peak").set_function(self._peak)

    def _allocated(self) -> float:
        return float(torch.cuda.memory_allocated(self.device))

    def _peak(self) -> float:
        return float(torch.cuda.max_memory_allocated(self.device))

    def serve(self, host: str, port: int) -> Any:
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
