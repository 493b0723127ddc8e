"""Pools of mixed speeds change no bit: real broker and worker processes on loopback, synthetic
workers with different forward times (a slow one, a straggler), against a uniform pool and the
in-process run."""

from __future__ import annotations

import asyncio

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

SPECS = [  # at the K they ask for: they run at once (the adaptive cores policy has own tests)
    RequestSpec(model="synthetic", steps=20, cores=4, seed=3, exact_cores=True),
    RequestSpec(
        model="synthetic", steps=20, cores=4, seed=4, stop="core-index:1", exact_cores=True
    ),
    RequestSpec(model="synthetic", method="paradigms", steps=16, cores=4, seed=5),
]


async def all_hits(address: str) -> list[list]:
    async with AsyncClient(address) as client:

        async def one(spec: RequestSpec) -> list:
            return [hit async for hit in client.submit(spec, timeout=120)]

        return list(await asyncio.gather(*(one(spec) for spec in SPECS)))


def pool_hits(latencies: list[float], tmp_path, name: str) -> tuple[list[list], dict]:
    cluster = LocalCluster(workers=0, log_dir=tmp_path / name)
    cluster.start_broker()
    try:
        for latency in latencies:
            cluster.start_worker(latency_ms=latency)
        cluster.wait_for_workers(len(latencies), timeout=60)
        hits = asyncio.run(all_hits(cluster.client_address))
        return hits, cluster.wait_for_workers(len(latencies), timeout=10)
    finally:
        cluster.stop()


def test_a_mixed_pool_gives_the_uniform_pools_bits(tmp_path):
    uniform, _ = pool_hits([5.0] * 4, tmp_path, "uniform")
    # two fast, one 4x slower, one straggler 40x slower: placement, deadlines and copies all run
    mixed, status = pool_hits([5.0, 5.0, 20.0, 200.0], tmp_path, "mixed")
    for spec, got, want in zip(SPECS, mixed, uniform):
        assert_same_hits(got, want)
        assert_same_hits(got, local_hits(spec))
    # the broker learnt different speeds for them (the placement had something to go on)
    estimates = [min(w["expected_ms"].values()) for w in status["workers"] if w["expected_ms"]]
    assert len(estimates) >= 3 and max(estimates) > 3 * min(estimates), status["workers"]
