"""The data plane with real processes (``chords-broker --data-plane``, synthetic workers on
loopback): latents stay on the workers, and the hits are bit for bit those of the same request
computed in-process (which today's path also equals). A killed worker's results are recomputed
from their lineage; a request fails only when no worker is left (typed).
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import Iterator

import pytest

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, RequestFailed
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

SHAPE = [1, 4, 16, 16]  # 4 KiB of float32
LATENT_BYTES = 4 * math.prod(SHAPE)
SPEC = RequestSpec(model="synthetic", steps=30, cores=4, seed=3, params={"shape": SHAPE})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for the module; each test starts with 4 workers alive (``refill``), one per
    core, so every worker holds a core's results mid-request."""
    with LocalCluster(
        workers=4,
        latency_ms=30.0,
        log_dir=tmp_path_factory.mktemp("data-plane") / "logs",
        extra_broker_args=["--data-plane"],
        worker_timeout_s=3.0,
    ) as made:
        made.wait_for_workers(4)
        yield made


def refill(cluster: LocalCluster) -> None:
    """Start workers until 4 are alive, and wait until the broker lists exactly them."""
    for _ in range(4 - len(cluster.alive_workers())):
        cluster.start_worker()
    cluster.wait_for_workers(4)


async def _run(cluster: LocalCluster, kill: int = 0, after_hits: int = 1) -> tuple[list, dict]:
    """Every hit of SPEC and the DONE stats; ``kill`` workers SIGKILLed at once after
    ``after_hits`` hits (the zero-th hit comes early: the cores' chains are mid-way)."""
    refill(cluster)
    hits = []
    async with AsyncClient(cluster.client_address) as client:
        stream = client.submit(SPEC, timeout=60)
        async for hit in stream:
            hits.append(hit)
            if kill and len(hits) == after_hits:  # mid-request, every worker holds results
                for process in cluster.alive_workers()[:kill]:
                    process.send_signal(signal.SIGKILL)
        assert stream.stats is not None
        return hits, stream.stats


def test_hits_are_bitwise_and_only_the_hits_cross_the_broker(cluster):
    hits, stats = asyncio.run(_run(cluster))
    assert_same_hits(hits, local_hits(SPEC))
    assert stats["latent_bytes"] == LATENT_BYTES
    # each hit's latent once from its decoder; x0 stays on the workers (PREPARED declares it)
    assert stats["broker_latent_bytes"] <= len(hits) * LATENT_BYTES
    assert stats["replays"] == 0
    # (--verify off, LocalCluster's default): a core's steps went out in chains (--chain 4)
    assert 0 < stats["chained"] < stats["evaluations"]
    print("undisturbed:", stats)


def test_killing_a_worker_holding_a_chain_mid_request_is_bitwise(cluster):
    hits, stats = asyncio.run(_run(cluster, kill=1))
    assert_same_hits(hits, local_hits(SPEC))
    print("kill 1:", stats)  # (replays: how many of its results were recomputed)


def test_killing_two_workers_at_once_is_bitwise(cluster):
    hits, stats = asyncio.run(_run(cluster, kill=2))
    assert_same_hits(hits, local_hits(SPEC))
    print("kill 2:", stats)  # (what they held when killed may all be consumed already)


def test_with_every_worker_killed_the_request_fails_no_worker(cluster):
    with pytest.raises(RequestFailed) as failed:
        asyncio.run(_run(cluster, kill=4))  # every one left
    assert failed.value.code == "no_worker"
