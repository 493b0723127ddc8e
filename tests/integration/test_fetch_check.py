"""A fetcher checks what it fetched, with real processes on loopback: a fast worker that keeps and
reports honest results but serves zeros on its data endpoint (``--fault serve:zeros``), beside
three honest ones. Its results are honest, so replicas agree with them: only the fetchers' digest
check can catch it (``--verify sample``: with ``off`` results carry no digest, nothing is checked).
One fetcher's claim is no strike (it could lie): once two honest workers, two principals, have
caught it, the third probes the liar's copy (a COMPARE without results of its own), sees zeros
too, and only then is the liar struck."""

from __future__ import annotations

import asyncio
from pathlib import Path

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits
from tests.integration.test_verify import SPECS, all_hits


def test_a_worker_serving_other_bytes_than_it_reported_changes_no_bit_and_is_struck(
    tmp_path: Path,
):
    """Every hit of 2 CHORDS requests is the honest pool's, bit for bit; the workers that
    fetched from the liar answered FAILED corrupt_input and the liar, not they, got strikes
    (up to 4 more requests while it has none: a strike needs two honest workers' claims and
    the third's probe)."""
    cluster = LocalCluster(workers=3, latency_ms=5.0, log_dir=tmp_path / "logs", verify="sample")
    cluster.start()  # (the data plane on)
    try:
        liar = ["--fault", "serve:zeros", "--worker-name", "liar"]
        cluster.start_worker(latency_ms=0.0, extra_args=liar)
        cluster.wait_for_workers(4, timeout=60)
        got = asyncio.run(all_hits(cluster.client_address))
        for engine, spec in zip(got, SPECS, strict=True):
            assert_same_hits(engine, local_hits(spec))
        status = cluster.wait_for_workers(4, timeout=10)
        for seed in range(2, 6):  # bounded: more fetches from the liar, by the honest workers
            if any(w["bad_results"] for w in status["workers"]):
                break
            spec = RequestSpec(model="synthetic", steps=12, cores=3, seed=seed)
            assert_same_hits(asyncio.run(one(cluster.client_address, spec)), local_hits(spec))
            status = cluster.wait_for_workers(4, timeout=10)
        struck = [w for w in status["workers"] if w["bad_results"]]
        assert len(struck) == 1, status["workers"]
        log = (tmp_path / "logs" / "broker.log").read_text()
        assert "worker liar served corrupt data, confirmed" in log
        assert "served corrupt data" not in log.replace("worker liar served corrupt data", "")
        assert "refuted" not in log
    finally:
        cluster.stop()


async def one(address: str, spec: RequestSpec) -> list:
    async with AsyncClient(address) as client:
        return [hit async for hit in client.submit(spec, timeout=60)]
