"""Prometheus endpoints of real broker and worker processes: scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from chords_mq.apps.cluster import LocalCluster, free_port
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec

NAMES = {
    "chords_requests",
    "chords_requests_in_flight",
    "chords_queue_tasks",
    "chords_workers",
    "chords_evaluations",
    "chords_task_seconds",
    "chords_hit_seconds",
    "chords_worker_failures",
    "chords_retries",
}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def two_requests(address: str) -> None:
    async with AsyncClient(address) as client:
        for seed in (1, 2):
            spec = RequestSpec(model="synthetic", steps=12, cores=2, seed=seed)
            assert [h async for h in client.submit(spec, timeout=60)]


def test_metrics_and_health_of_a_broker_and_a_worker_after_two_requests(tmp_path):
    broker_port, worker_port = free_port(), free_port()
    cluster = LocalCluster(
        workers=1,
        latency_ms=1.0,
        log_dir=tmp_path / "logs",
        extra_broker_args=["--metrics-bind", f"127.0.0.1:{broker_port}"],
    )
    cluster.start()
    try:
        cluster.start_worker(extra_args=["--metrics-bind", f"127.0.0.1:{worker_port}"])
        cluster.wait_for_workers(2, timeout=60)
        asyncio.run(two_requests(cluster.client_address))
        status, text = get(f"http://127.0.0.1:{broker_port}/metrics")
        assert status == 200
        families = {family.name for family in text_string_to_metric_families(text)}
        assert families >= NAMES, NAMES - families
        found = samples(text)
        assert found[("chords_requests_total", (("method", "chords"), ("outcome", "done")))] == 2
        assert found[("chords_workers", (("state", "ready"),))] == 2
        assert found[("chords_evaluations_total", ())] > 0
        assert found[("chords_hit_seconds_count", (("rank", "1"),))] == 2
        status, body = get(f"http://127.0.0.1:{broker_port}/healthz")
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ok" and health["workers"] == {"ready": 2}
        assert get(f"http://127.0.0.1:{broker_port}/nothing")[0] == 404
        with socket.create_connection(("127.0.0.1", broker_port), timeout=10) as raw:
            raw.sendall(b"garbage\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 405")
        status, text = get(f"http://127.0.0.1:{worker_port}/metrics")
        assert status == 200
        worker = samples(text)
        assert worker[("chords_worker_forward_seconds_count", ())] > 0
        assert worker[("chords_worker_tasks_total", ())] > 0
        assert worker[("chords_worker_info", (("device", "cpu"), ("model", "synthetic")))] == 1
    finally:
        cluster.stop()
