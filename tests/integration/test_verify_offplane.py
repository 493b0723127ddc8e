"""Verification off the data plane with real processes on loopback (``--no-data-plane``: the
results come through the broker, which digests and compares them itself): a fast worker whose
results are zeros, beside two honest ones, under the broker's default verification."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from tests.integration.conftest import assert_same_hits, local_hits
from tests.integration.test_verify import SPECS, assert_one_outvoted_and_quarantined


async def hits_of(address: str) -> list:
    async with AsyncClient(address) as client:
        return [hit async for hit in client.submit(SPECS[0], timeout=60)]


def test_off_the_data_plane_a_fast_worker_returning_zeros_changes_no_bit_and_is_quarantined(
    tmp_path: Path,
):
    """2 honest workers (5 ms a forward) and 1 that answers at once with zeros, latents through
    the broker: every hit of a CHORDS request is the honest one, bit for bit (each sampled
    result is held at the broker until a replica on another worker agrees, which none of the
    faulty one's does), and it ends quarantined (at its first strike here, to keep to one
    request; tests/integration/test_verify.py shows two requests' strikes on the data plane)."""
    cluster = LocalCluster(
        workers=2,
        latency_ms=5.0,
        log_dir=tmp_path / "logs",
        extra_broker_args=["--verify", "sample", "--no-data-plane", "--quarantine-after", "1"],
    )
    try:
        cluster.launch()  # the three start together
        cluster.start_worker(latency_ms=0.0, extra_args=["--fault", "zeros"])
        cluster.wait_for_workers(3, timeout=60)
        assert_same_hits(asyncio.run(hits_of(cluster.client_address)), local_hits(SPECS[0]))
        assert_one_outvoted_and_quarantined(cluster, tmp_path / "logs", strikes=1)
    finally:
        cluster.stop()
