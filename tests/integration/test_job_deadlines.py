"""A deadline on every job kind, with real processes: a worker that accepts PREPAREs and never
answers them while it heartbeats (``--fault silent-prepare``) beside an honest one. Every
request finishes with the honest pool's hits, bit for bit, and the silent worker is found late."""

from __future__ import annotations

import asyncio

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits


def test_a_worker_that_never_answers_prepare_stalls_no_request(tmp_path):
    # Forwards of 50 ms: each request runs past the silent PREPARE's deadline (0.5 s at
    # least), whichever worker was asked for the initial latent.
    # Two honest workers: the default verification checks a new worker's results on another.
    cluster = LocalCluster(workers=2, latency_ms=50.0, log_dir=tmp_path / "logs")
    cluster.launch()  # every worker starts at once
    try:
        cluster.start_worker(extra_args=["--fault", "silent-prepare"])
        cluster.wait_for_workers(3, timeout=60)
        specs = [RequestSpec(model="synthetic", steps=12, cores=2, seed=s) for s in range(3)]

        async def all_hits() -> list[list]:
            got = []
            async with AsyncClient(cluster.client_address) as client:
                for spec in specs:
                    got.append([h async for h in client.submit(spec, timeout=60)])
            return got

        for got, spec in zip(asyncio.run(all_hits()), specs):
            assert_same_hits(got, local_hits(spec))
        status = cluster.wait_for_workers(3, timeout=10)
        states = sorted(w["state"] for w in status["workers"])
        assert states == ["quarantined", "ready", "ready"], states  # late until it answers
        log = (tmp_path / "logs" / "broker.log").read_text()
        assert "on a PREPARE; it runs on another worker" in log
    finally:
        cluster.stop()
