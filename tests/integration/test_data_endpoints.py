"""The workers' data endpoints with real processes: a chords-worker announces its endpoint in
HELLO (an admin's STATUS shows it), and in a CURVE pool it admits exactly the pool's worker keys
the broker hands out: a pool member's fetch gets a typed refusal, a process with an unlisted key
or with no key gets nothing, and a key SIGHUP adds or removes reaches the worker. Off loopback
without CURVE a worker needs --insecure, as the broker does."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chords_mq.algorithms.base import Ref
from chords_mq.apps.cluster import LocalCluster, _script
from chords_mq.client import AsyncClient
from chords_mq.keys import keygen, load_public, load_secret, pool_keys
from chords_mq.wire.data import RefusalReason
from chords_mq.workers.dataplane import DataClient, FetchRefused, PeerTimeout

WAIT_S = 2.0  # the bounded wait a fetch that gets nothing ends at

# One fetch from a separate process, for a request nobody holds: prints "refused:<reason>" or
# "timeout". argv: endpoint, the worker's public key, and a key pair file or "-" for none.
FETCH = """
import sys
from chords_mq.algorithms.base import Ref
from chords_mq.keys import load_secret
from chords_mq.workers.dataplane import DataClient, FetchRefused, PeerTimeout
endpoint, server_key, secret, wait = sys.argv[1:5]
pair = None if secret == "-" else load_secret(secret)
with DataClient(key_pair=pair, timeout_s=float(wait)) as client:
    try:
        client.fetch(endpoint, "no-such-request", [Ref(0, 1)],
                     server_key=server_key.encode() if pair else None)
        print("data")
    except FetchRefused as exc:
        print(f"refused:{exc.reason.value}")
    except PeerTimeout:
        print("timeout")
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("keys")
    pool_keys(root, workers=("worker", "peer"), clients=("client",), admins=("ops",))
    keygen(root / "strangers", "stranger")  # a valid key pair the broker does not list
    cluster = LocalCluster(workers=1, log_dir=root / "logs", curve=root)
    cluster.start()
    yield cluster
    cluster.stop()


def data_endpoint(cluster: LocalCluster) -> str:
    async def ask() -> dict:
        async with AsyncClient(cluster.client_address, **cluster.client_keys("ops")) as client:
            return await client.status(timeout=5)

    (worker,) = asyncio.run(ask())["workers"]
    endpoint: str = worker["data"]
    return endpoint


def test_a_worker_announces_its_data_endpoint_and_in_a_curve_pool_only_pool_keys_get_an_answer(
    pool,
):
    """Three separate processes fetch at once: a pool worker's key gets the typed refusal for
    a request the worker does not hold, an unlisted key and no key get nothing."""
    root = pool.curve
    assert root is not None
    endpoint = data_endpoint(pool)
    assert endpoint.startswith("tcp://127.0.0.1:")  # the default: where it reaches the broker
    server_key = load_public(root / "workers" / "worker.key").decode()
    secrets = {
        "pool member": str(root / "private" / "peer.key_secret"),
        "unlisted key": str(root / "strangers" / "stranger.key_secret"),
        "no key": "-",
    }
    fetchers = {
        who: subprocess.Popen(
            [sys.executable, "-c", FETCH, endpoint, server_key, secret, str(WAIT_S)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for who, secret in secrets.items()
    }
    outcomes = {}
    for who, process in fetchers.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        outcomes[who] = out.strip()
    assert outcomes == {
        "pool member": f"refused:{RefusalReason.UNKNOWN_REQUEST.value}",
        "unlisted key": "timeout",
        "no key": "timeout",
    }


def fetch_outcome(client: DataClient, endpoint: str, server_key: bytes) -> str:
    try:
        client.fetch(endpoint, "no-such-request", [Ref(0, 1)], server_key=server_key)
    except FetchRefused as exc:
        return exc.reason.value
    except PeerTimeout:
        return "timeout"
    return "data"


def until(outcome: str, client: DataClient, endpoint: str, key: bytes, bound_s: float) -> str:
    deadline = time.monotonic() + bound_s
    got = fetch_outcome(client, endpoint, key)
    while got != outcome and time.monotonic() < deadline:
        got = fetch_outcome(client, endpoint, key)
    return got


def test_a_worker_key_added_or_removed_on_sighup_reaches_the_workers_data_endpoint(pool):
    root = pool.curve
    assert root is not None and pool.broker is not None
    endpoint = data_endpoint(pool)
    server_key = load_public(root / "workers" / "worker.key")
    public, _ = keygen(root / "private", "late")
    listed = root / "workers" / public.name
    with DataClient(key_pair=load_secret(root / "private" / "late.key_secret"), timeout_s=0.5) as c:
        assert fetch_outcome(c, endpoint, server_key) == "timeout"  # not in the pool yet
        public.rename(listed)
        pool.broker.send_signal(signal.SIGHUP)
        assert until("unknown_request", c, endpoint, server_key, 10.0) == "unknown_request"
        listed.unlink()
        pool.broker.send_signal(signal.SIGHUP)
        assert until("timeout", c, endpoint, server_key, 10.0) == "timeout"  # its open link too


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:0", "tcp://*:0"])
def test_a_data_endpoint_off_loopback_without_curve_or_insecure_exits_with_one_line(bind):
    result = subprocess.run(
        [*_script("chords-worker"), "--broker", "tcp://127.0.0.1:1", "--data-bind", bind],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert bind in lines[0] and "--curve-secret" in lines[0] and "--insecure" in lines[0]


def test_chords_status_shows_an_admin_each_workers_data_endpoint_and_the_log_names_it(pool):
    root = pool.curve
    assert root is not None
    endpoint = data_endpoint(pool)
    chords = str(Path(sys.executable).parent / "chords")
    keys = ["--curve-secret", str(root / "private" / "ops.key_secret")]
    keys += ["--broker-key", str(root / "broker.key")]
    text = subprocess.run(
        [chords, "status", "--broker", pool.client_address, *keys],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (line,) = [line for line in text.splitlines() if "synthetic" in line]
    assert line.endswith(f"data: {endpoint}"), text
    log = Path(pool.log_dir or "", "worker0.log").read_text()
    assert f"data endpoint on {endpoint} (CURVE: True)" in log
