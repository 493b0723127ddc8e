"""Integration fixtures: real chords-broker and chords-worker processes on loopback TCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import in_process
from chords_mq.workers.models.synthetic import SyntheticAdapter


@pytest.fixture(scope="session")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, LocalCluster]]:
    """Shared clusters of 1, 2 and 4 synthetic workers, started on first use."""
    started: dict[int, LocalCluster] = {}

    class Pool(dict):  # type: ignore[type-arg]
        def __missing__(self, count: int) -> LocalCluster:
            log_dir = tmp_path_factory.mktemp(f"cluster{count}")
            cluster = LocalCluster(
                workers=count, latency_ms=2.0, log_dir=log_dir, worker_timeout_s=1.0
            )
            started[count] = cluster
            self[count] = cluster.start()
            return cluster

    yield Pool()
    for cluster in started.values():
        cluster.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[object]:
    """A factory for a private cluster (for tests that kill things); stopped afterwards."""
    made: list[LocalCluster] = []

    def make(workers: int, latency_ms: float) -> LocalCluster:
        cluster = LocalCluster(workers=workers, latency_ms=latency_ms, log_dir=tmp_path / "logs")
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()


def local_hits(spec: RequestSpec) -> list:
    """The same request simulated in-process with the same adapter: the engine must match it."""
    adapter = SyntheticAdapter()
    prepared = adapter.prepare(spec)
    plan = spec.build_plan(prepared.x0, prepared.solver)
    return run_tasks(plan, in_process(adapter, prepared)).hits


async def hits_and_stats(
    address: str, spec: RequestSpec, timeout: float = 120
) -> tuple[list, dict]:
    """Every hit of ``spec`` through the engine, and the DONE stats."""
    async with AsyncClient(address) as client:
        stream = client.submit(spec, timeout=timeout)
        hits = [hit async for hit in stream]
        assert stream.stats is not None
        return hits, stream.stats


def assert_same_hits(engine_hits: list, expected: list) -> None:
    assert [(h.core, h.round) for h in engine_hits] == [(h.core, h.round) for h in expected]
    for got, want in zip(engine_hits, expected):
        assert got.latent.dtype == want.latent.dtype
        assert torch.equal(got.latent, want.latent), f"core {got.core} differs"
