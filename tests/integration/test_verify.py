"""Verification by redundancy with real processes on loopback: a fast worker whose results are
wrong but finite, beside two honest ones, under the broker's default verification."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

SPECS = [RequestSpec(model="synthetic", steps=12, cores=3, seed=s) for s in range(2)]


def assert_one_outvoted_and_quarantined(cluster: LocalCluster, logs: Path, strikes: int) -> None:
    """Of the pool's 3 workers exactly one ends quarantined, with at least ``strikes`` bad
    results, and the broker's log says it was outvoted and quarantined."""
    status = cluster.wait_for_workers(3, timeout=10)
    states = sorted(w["state"] for w in status["workers"])
    assert states.count("quarantined") == 1, states
    (bad,) = [w for w in status["workers"] if w["state"] == "quarantined"]
    assert bad["bad_results"] >= strikes
    log = (logs / "broker.log").read_text()
    assert "outvoted" in log and "quarantined for" in log


async def all_hits(address: str) -> list[list]:
    """One request after the other (at once, the cores policy would give each fewer cores)."""
    hits = []
    async with AsyncClient(address) as client:
        for spec in SPECS:
            hits.append([hit async for hit in client.submit(spec, timeout=60)])
    return hits


def test_a_fast_worker_returning_zeros_changes_no_bit_and_is_quarantined(tmp_path: Path):
    """2 honest workers (5 ms a forward) and 1 that answers at once with zeros: every hit of 2
    CHORDS requests is the honest one, bit for bit (its results are held until a replica on
    another worker agrees, which none does), and it ends quarantined (2 strikes)."""
    cluster = LocalCluster(
        workers=2,
        latency_ms=5.0,
        log_dir=tmp_path / "logs",
        extra_broker_args=["--verify", "sample"],  # the default, said (whatever CHORDS_VERIFY)
    )
    cluster.start()
    try:
        cluster.start_worker(latency_ms=0.0, extra_args=["--fault", "zeros"])
        cluster.wait_for_workers(3, timeout=60)
        got = asyncio.run(all_hits(cluster.client_address))
        for engine, spec in zip(got, SPECS, strict=True):
            assert_same_hits(engine, local_hits(spec))
        assert_one_outvoted_and_quarantined(cluster, tmp_path / "logs", strikes=2)
    finally:
        cluster.stop()
