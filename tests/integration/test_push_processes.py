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
from chords_mq.broker.config import BrokerConfig
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, hits_and_stats, local_hits

SHAPE = [1, 4, 16, 16]  # 4 KiB of float32
SPEC = RequestSpec(model="synthetic", steps=20, cores=4, seed=5, params={"shape": SHAPE})
HOSTS = ("127.0.0.2", "127.0.0.3")


def _has_no_push() -> bool:
    """Does this broker know ``--no-push`` (``BrokerConfig.push``)?"""
    return "push" in {option.name for option in dataclasses.fields(BrokerConfig)}


def _two_hosts(log_dir: Path, push: bool) -> LocalCluster:
    """A broker and two workers, each worker's data endpoint on its own loopback address."""
    cluster = LocalCluster(
        workers=0,
        latency_ms=20.0,  # (a sleep well above the noise: one speed class, cores bound)
        log_dir=log_dir,
        extra_broker_args=["--data-plane", "--push" if push else "--no-push"],
        worker_timeout_s=3.0,
        extra_worker_args=["--log-level", "debug"],  # each input read from a pushed copy
    )
    cluster.launch()
    try:
        for host in HOSTS:
            cluster.start_worker(extra_args=["--data-bind", f"tcp://{host}:0"])
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


def _copies_read(log_dir: Path) -> int:
    logs = sorted(log_dir.glob("worker*.log"))
    assert len(logs) == len(HOSTS)
    return sum(path.read_text().count(": the pushed copy") for path in logs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, Run]]:
    """SPEC's hits and stats with push on and (where the broker has ``--no-push``) off."""
    modes = [True, False] if _has_no_push() else [True]
    done: dict[bool, Run] = {}
    for push in modes:
        log_dir = tmp_path_factory.mktemp("push-on" if push else "push-off") / "logs"
        cluster = _two_hosts(log_dir, push)
        try:
            hits, stats = asyncio.run(hits_and_stats(cluster.client_address, SPEC, timeout=90))
        finally:
            cluster.stop()  # (the logs are complete once the workers are gone)
        done[push] = Run(hits, stats, _copies_read(log_dir))
        print(f"push {'on' if push else 'off'}:", stats, "copies read:", done[push].copies_read)
    yield done


def test_with_push_on_the_hits_are_bitwise_and_pushed_copies_are_read(runs):
    run = runs[True]
    assert_same_hits(run.hits, local_hits(SPEC))
    assert run.stats["latent_bytes"] == 4 * math.prod(SHAPE)
    assert run.stats["pushes"] > 0  # the broker asked producers to push across the two hosts
    assert run.stats["pushed_inputs"] > 0  # and readers' EVALs named pushed inputs
    # and readers took them from their inbox (one that came late would be pulled instead)
    assert 0 < run.copies_read <= run.stats["pushed_inputs"]


def test_with_push_off_the_hits_are_the_same_bits_and_nothing_is_pushed(runs):
    if False not in runs:
        pytest.skip("this chords-broker has no --no-push (BrokerConfig.push) yet")
    run = runs[False]
    assert_same_hits(run.hits, runs[True].hits)
    assert run.stats["pushes"] == 0 and run.stats["pushed_inputs"] == 0
    assert run.copies_read == 0
