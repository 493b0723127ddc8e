"""Trust, with real processes on loopback: CURVE allow-lists and roles, the bind guard, faulty
workers, admission under one client's burst. (Across namespaces: tests/multihost/.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chords_mq.apps.cluster import LocalCluster, _script, free_port
from chords_mq.client import AsyncClient, RequestFailed, RequestTimeout
from chords_mq.keys import keygen, load_public, pool_keys
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

SPEC = RequestSpec(model="synthetic", steps=20, cores=3, seed=5)


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("keys")
    # "faulty": a worker with a key of its own (the NaN worker restarted under it)
    pool_keys(root, workers=("worker", "faulty"), clients=("client", "revoked"), admins=("ops",))
    keygen(root / "strangers", "stranger")  # a valid key pair the broker does not list
    cluster = LocalCluster(
        workers=2, latency_ms=1.0, log_dir=root / "logs", curve=root, worker_timeout_s=2.0
    )
    cluster.start()
    yield cluster
    cluster.stop()


async def run(address: str, spec: RequestSpec = SPEC, **keys: object) -> list:
    async with AsyncClient(address, accept_timeout_s=3.0, **keys) as client:  # type: ignore[arg-type]
        return [hit async for hit in client.submit(spec, timeout=60)]


def test_requests_over_curve_equal_the_in_process_run(curve_cluster):
    hits = asyncio.run(run(curve_cluster.client_address, **curve_cluster.client_keys()))
    assert_same_hits(hits, local_hits(SPEC))


@pytest.mark.parametrize("who", ["unlisted key", "no key", "worker key as client"])
def test_a_peer_without_a_client_key_gets_nothing(curve_cluster, who):
    root = curve_cluster.curve
    keys: dict[str, object] = {
        "unlisted key": {
            "curve_secret": root / "strangers" / "stranger.key_secret",
            "broker_key": root / "broker.key",
        },
        "no key": {},
        "worker key as client": curve_cluster.client_keys("worker"),
    }[who]
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        asyncio.run(run(curve_cluster.client_address, **keys))
    assert time.monotonic() - started < 30  # a clear timeout, not a hang
    if who == "unlisted key":
        log = (root / "logs" / "broker.log").read_text()
        assert "denied an unlisted CURVE key" in log


def test_each_denied_key_is_logged_once(curve_cluster):
    root = curve_cluster.curve
    keys = {
        "curve_secret": root / "strangers" / "stranger.key_secret",
        "broker_key": root / "broker.key",
    }
    for _ in range(2):
        with pytest.raises(RequestTimeout):
            asyncio.run(run(curve_cluster.client_address, **keys))
    log = (root / "logs" / "broker.log").read_text()
    public = (root / "strangers" / "stranger.key").read_text().split('public-key = "')[1][:40]
    assert sum(1 for line in log.splitlines() if public in line) == 1


def test_a_client_key_cannot_register_as_a_worker(curve_cluster):
    rogue = subprocess.Popen(
        [
            *_script("chords-worker"),
            "--broker",
            curve_cluster.worker_address,
            "--model",
            "synthetic",
            *curve_cluster.worker_keys("client"),  # the client's key pair, on a worker
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=curve_cluster.env,
    )
    try:
        time.sleep(3.0)  # every chance to register (a worker says HELLO within 0.3 s)
        assert rogue.poll() is None
        status = asyncio.run(admin_status(curve_cluster))
        assert len(status["workers"]) == 2
    finally:
        rogue.terminate()
        rogue.wait(10)


async def admin_status(cluster: LocalCluster) -> dict:
    async with AsyncClient(cluster.client_address, **cluster.client_keys("ops")) as client:
        return await client.status(timeout=5)


def test_status_shows_an_admin_everything_and_a_client_its_own(curve_cluster):
    async def both() -> tuple[dict, dict, list]:
        async with AsyncClient(
            curve_cluster.client_address, **curve_cluster.client_keys()
        ) as client:
            stream = client.submit(RequestSpec(model="synthetic", steps=400, cores=2), timeout=60)
            hits = []
            async for hit in stream:
                hits.append(hit)
                if len(hits) == 1:
                    mine = await client.status()
                    everything = await admin_status(curve_cluster)
                    return mine, everything, hits
        raise AssertionError("no hit")

    mine, everything, _ = asyncio.run(both())
    assert mine["role"] == "client" and everything["role"] == "admin"
    assert len(mine["sessions"]) == 1 and "owner" not in mine["sessions"][0]
    assert all(w["name"].startswith("worker-") for w in mine["workers"])
    assert all(w["name"].startswith("worker/") for w in everything["workers"])
    assert everything["sessions"] and everything["sessions"][0]["owner"].startswith("key:")


def test_a_key_removed_and_reloaded_on_sighup_loses_access(curve_cluster):
    root = curve_cluster.curve
    keys = curve_cluster.client_keys("revoked")
    assert len(asyncio.run(run(curve_cluster.client_address, **keys))) == len(local_hits(SPEC))
    (root / "clients" / "revoked.key").unlink()
    assert curve_cluster.broker is not None
    curve_cluster.broker.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    with pytest.raises(RequestTimeout):
        asyncio.run(run(curve_cluster.client_address, **keys))
    assert len(
        asyncio.run(run(curve_cluster.client_address, **curve_cluster.client_keys()))
    ) == len(local_hits(SPEC))


def test_a_faulty_worker_restarted_with_its_key_stays_quarantined(curve_cluster):
    """Strikes and quarantine follow a worker's CURVE key: a NaN worker quarantined beside
    honest ones, killed and started again 3 times with the same key file, is quarantined from
    its first HELLO each time."""
    cluster = curve_cluster
    faulty_args = ["--fault", "nan", *cluster.worker_keys("faulty")]  # its own key (last wins)
    public = load_public(cluster.curve / "workers" / "faulty.key").decode()

    def standing() -> dict:
        status = asyncio.run(admin_status(cluster))
        (shown,) = [w for w in status["workers"] if w.get("principal") == f"key:{public}"]
        return shown

    faulty = cluster.start_worker(extra_args=faulty_args)
    try:
        cluster.wait_for_workers(3, timeout=60)
        spec = RequestSpec(model="synthetic", steps=12, cores=3)
        for seed in range(20):  # until two of its results were confirmed bad
            request = replace(spec, seed=seed)
            hits = asyncio.run(run(cluster.client_address, request, **cluster.client_keys()))
            assert_same_hits(hits, local_hits(request))
            if standing()["state"] == "quarantined":
                break
        strikes = standing()["bad_results"]
        assert standing()["state"] == "quarantined" and strikes >= 2
        for _ in range(3):
            faulty.kill()
            faulty.wait(10)
            faulty = cluster.start_worker(extra_args=faulty_args)
            cluster.wait_for_workers(2, timeout=10)  # the killed one is gone
            cluster.wait_for_workers(3, timeout=60)
            again = standing()
            assert again["state"] == "quarantined" and again["bad_results"] == strikes
            assert again["completed"] == 0
    finally:
        faulty.kill()
        faulty.wait(10)
        cluster.wait_for_workers(2, timeout=10)  # the pool as the other tests know it


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://*:{port}"])
def test_a_non_loopback_bind_without_curve_or_insecure_exits_with_one_line(bind):
    endpoint = bind.format(port=free_port())
    result = subprocess.run(
        [*_script("chords-broker"), "--client-bind", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "--curve" in lines[0] and "--insecure" in lines[0]
    assert endpoint in lines[0]


def test_insecure_allows_a_non_loopback_bind_and_warns_loudly(tmp_path: Path):
    port = free_port()
    broker = subprocess.Popen(
        [
            *_script("chords-broker"),
            "--client-bind",
            f"tcp://0.0.0.0:{port}",
            "--worker-bind",  # never the default port: another broker may hold it
            f"tcp://127.0.0.1:{free_port()}",
            "--insecure",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:

        async def ask() -> dict:
            async with AsyncClient(f"tcp://127.0.0.1:{port}") as client:
                return await client.status(timeout=20)

        assert asyncio.run(ask())["workers"] == []
    finally:
        broker.terminate()
        _, stderr = broker.communicate(timeout=10)
    # impossible to miss: a warning at startup saying what is exposed and what it allows
    (warning,) = [line for line in stderr.decode().splitlines() if "INSECURE" in line]
    assert f"tcp://0.0.0.0:{port}" in warning and "--curve" in warning


# -- faulty workers --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_a_faulty_worker_beside_honest_ones_changes_no_bit_and_is_quarantined(
    clusters, tmp_path, fault
):
    """2 honest workers and 1 whose model returns NaN (or Inf): 4 CHORDS requests give the
    hits of the honest-only pool, bit for bit, and the faulty worker ends up quarantined.
    Each request keeps its 3 cores (``exact_cores``), so each wants every worker and the
    faulty one meets at least two of them: granted 1 core each by the adaptive policy, the
    requests that came second could all be served by the honest workers, leaving the faulty
    one a single bad result, short of the quarantine (seen once in CI)."""
    specs = [
        RequestSpec(model="synthetic", steps=30, cores=3, seed=s, exact_cores=True)
        for s in range(4)
    ]
    honest_pool = clusters[2]

    async def all_hits(address: str) -> list[list]:
        async with AsyncClient(address) as client:

            async def one(spec: RequestSpec) -> list:
                return [hit async for hit in client.submit(spec, timeout=120)]

            return list(await asyncio.gather(*(one(spec) for spec in specs)))

    expected = asyncio.run(all_hits(honest_pool.client_address))
    cluster = LocalCluster(workers=2, latency_ms=2.0, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        cluster.start_worker(extra_args=["--fault", fault])
        cluster.wait_for_workers(3, timeout=60)
        got = asyncio.run(all_hits(cluster.client_address))
        for engine, want in zip(got, expected):
            assert_same_hits(engine, want)
        status = cluster.wait_for_workers(3, timeout=10)
        states = sorted(w["state"] for w in status["workers"])
        assert states.count("quarantined") == 1, states
        (bad,) = [w for w in status["workers"] if w["state"] == "quarantined"]
        assert bad["bad_results"] >= 2 and bad["completed"] == 0
        log = (tmp_path / "logs" / "broker.log").read_text()
        assert "quarantined for" in log
    finally:
        cluster.stop()


def test_a_pool_of_only_nan_workers_fails_with_non_finite(tmp_path):
    cluster = LocalCluster(
        workers=1, latency_ms=1.0, log_dir=tmp_path / "logs", extra_worker_args=["--fault", "nan"]
    )
    cluster.start()
    try:
        with pytest.raises(RequestFailed) as failure:
            asyncio.run(run(cluster.client_address, RequestSpec(model="synthetic", steps=10)))
        assert failure.value.code == "non_finite"
    finally:
        cluster.stop()


# -- admission -------------------------------------------------------------------------------


def test_a_burst_from_one_client_completes_or_is_refused_busy_and_nothing_hangs(tmp_path):
    cluster = LocalCluster(
        workers=2,
        latency_ms=0.0,
        log_dir=tmp_path / "logs",
        extra_broker_args=["--max-client-requests", "8"],
    )
    cluster.start()
    expected = len(local_hits(RequestSpec(model="synthetic", steps=8, cores=2)))
    try:

        async def burst() -> list[str]:
            async with AsyncClient(cluster.client_address) as client:

                async def one(i: int) -> str:
                    spec = RequestSpec(
                        model="synthetic", steps=8, cores=2, seed=i, exact_cores=True
                    )
                    rid = f"{i:04d}-" + "x" * 95  # 100 characters
                    try:
                        hits = [h async for h in client.submit(spec, request_id=rid, timeout=90)]
                    except RequestFailed as exc:
                        assert exc.code != "busy" or (exc.retry_after_s or 0) > 0
                        return exc.code
                    return "done" if len(hits) == expected else "short"

                return list(await asyncio.gather(*(one(i) for i in range(120))))

        outcomes = asyncio.run(burst())
        assert set(outcomes) <= {"done", "busy"}, set(outcomes)
        assert outcomes.count("done") >= 8 and outcomes.count("busy") >= 1
        assert len(outcomes) == 120
    finally:
        cluster.stop()


def test_results_from_a_bf16_request_are_checked_in_its_own_dtype(clusters):
    spec = RequestSpec(model="synthetic", steps=12, cores=2, params={"dtype": "bfloat16"})
    hits = asyncio.run(run(clusters[2].client_address, spec))
    assert all(h.latent.dtype == torch.bfloat16 for h in hits)
    assert_same_hits(hits, local_hits(spec))


def test_a_worker_that_hangs_while_heartbeating_is_worked_around_and_quarantined(tmp_path):
    """A forward that never returns, on a worker whose heartbeats go on: its task is late at 2.5x
    the expected forward time and is copied elsewhere, every request finishes bitwise, and the
    worker shows as quarantined."""
    cluster = LocalCluster(workers=2, latency_ms=5.0, log_dir=tmp_path / "logs")
    cluster.start()
    try:
        cluster.start_worker(extra_args=["--fault", "hang"])
        cluster.wait_for_workers(3, timeout=60)
        specs = [RequestSpec(model="synthetic", steps=30, cores=3, seed=s) for s in range(3)]
        for spec in specs:
            hits = asyncio.run(run(cluster.client_address, spec))
            assert_same_hits(hits, local_hits(spec))
        status = cluster.wait_for_workers(3, timeout=10)
        states = sorted(w["state"] for w in status["workers"])
        assert states.count("quarantined") == 1, states
        log = (tmp_path / "logs" / "broker.log").read_text()
        assert "is late" in log
    finally:
        cluster.stop()
