"""Pushes between real processes (issue 25): a ``chords-broker`` on the data plane and two
synthetic ``chords-worker`` processes whose data endpoints are bound to different loopback
addresses (127.0.0.2 and 127.0.0.3: Linux routes all of 127/8 to this host), so the broker
takes them for two hosts and asks each producer to push the results the other worker's cores
read (while the request runs clean and the two workers are one speed class, so its cores are
bound to them: ``FairDispatcher._bound``; equal synthetic latencies). The hits are bit for bit
those of the same request computed in-process, and those of the same request with
``--no-push`` (each reader pulls instead); the request's stats count the pushes asked and the
pushed inputs read with push on, and none with it off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.keys import pool_keys
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

SHAPE = [1, 4, 16, 16]  # 4 KiB of float32
SPEC = RequestSpec(model="synthetic", steps=20, cores=4, seed=5, params={"shape": SHAPE})
HOSTS = ("127.0.0.2", "127.0.0.3")
WORKER_KEYS = ("worker", "other")  # a CURVE pool: each worker its own key


def _two_hosts(log_dir: Path, push: bool, curve: Path | None = None) -> LocalCluster:
    """A broker and two workers, each worker's data endpoint on its own loopback address (with
    ``curve``: a CURVE pool, each worker with its own key)."""
    cluster = LocalCluster(
        workers=0,
        latency_ms=20.0,  # (a sleep well above the noise: one speed class, cores bound)
        log_dir=log_dir,
        extra_broker_args=["--data-plane", "--push" if push else "--no-push"],
        worker_timeout_s=3.0,
        extra_worker_args=["--log-level", "debug"],  # each input read from a pushed copy
        curve=curve,
    )
    cluster.launch()
    try:
        for host, name in zip(HOSTS, WORKER_KEYS):
            own = (
                []
                if curve is None
                else ["--curve-secret", str(curve / "private" / f"{name}.key_secret")]
            )
            cluster.start_worker(extra_args=["--data-bind", f"tcp://{host}:0", *own])
        status = cluster.wait_for_workers(len(HOSTS))
    except BaseException:
        cluster.stop()
        raise
    print("workers:", status["workers"])
    return cluster


@dataclasses.dataclass
class Run:
    hits: list
    stats: dict
    copies_read: int  # inputs the workers read from a pushed copy (their debug log says so)
    refused_copies: int  # pushed copies a worker did not trust (not a holder's): pulled


def _logged(log_dir: Path, text: str) -> int:
    logs = sorted(log_dir.glob("worker*.log"))
    assert len(logs) == len(HOSTS)
    return sum(path.read_text().count(text) for path in logs)


async def _submit(cluster: LocalCluster) -> tuple[list, dict]:
    async with AsyncClient(cluster.client_address, **cluster.client_keys()) as client:
        stream = client.submit(SPEC, timeout=90)
        hits = [hit async for hit in stream]
        assert stream.stats is not None
        return hits, stream.stats


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """SPEC's hits and stats with push on, off, and on in a CURVE pool."""
    done: dict[str, Run] = {}
    for mode in ("on", "off", "curve"):
        root = tmp_path_factory.mktemp(f"push-{mode}")
        curve = pool_keys(root / "keys", workers=WORKER_KEYS) if mode == "curve" else None
        cluster = _two_hosts(root / "logs", mode != "off", curve)
        try:
            hits, stats = asyncio.run(_submit(cluster))
        finally:
            cluster.stop()  # (the logs are complete once the workers are gone)
        read = _logged(root / "logs", ": the pushed copy")
        refused = _logged(root / "logs", "fetched instead")
        done[mode] = Run(hits, stats, read, refused)
        print(f"push {mode}:", stats, "copies read:", read, "refused:", refused)
    yield done


def test_with_push_on_the_hits_are_bitwise_and_pushed_copies_are_read(runs):
    run = runs["on"]
    assert_same_hits(run.hits, local_hits(SPEC))
    assert run.stats["latent_bytes"] == 4 * math.prod(SHAPE)
    assert run.stats["pushes"] > 0  # the broker asked producers to push across the two hosts
    assert run.stats["pushed_inputs"] > 0  # and readers' EVALs named pushed inputs
    # and readers took them from their inbox (one that came late would be pulled instead)
    assert 0 < run.copies_read <= run.stats["pushed_inputs"]
    assert run.refused_copies == 0


def test_with_push_off_the_hits_are_the_same_bits_and_nothing_is_pushed(runs):
    run = runs["off"]
    assert_same_hits(run.hits, runs["on"].hits)
    assert run.stats["pushes"] == 0 and run.stats["pushed_inputs"] == 0
    assert run.copies_read == 0


def test_in_a_curve_pool_a_copy_pushed_by_its_producer_is_trusted_and_read(runs):
    """Each worker its own key: the reader takes a pushed copy only from a holder of it (the
    sender's CURVE key, as its data server saw it, among the holders' keys the broker named),
    so a copy read here proves the producer's key reached the reader as the broker names it."""
    run = runs["curve"]
    assert_same_hits(run.hits, runs["on"].hits)
    assert run.stats["pushes"] > 0 and run.stats["pushed_inputs"] > 0
    assert 0 < run.copies_read <= run.stats["pushed_inputs"]
    assert run.refused_copies == 0
