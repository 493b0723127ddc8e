"""What a new user runs into first, with real processes on loopback: a broker that dies under a
running request, a broker stopped while one runs, the wrong port, the last worker lost, a lone
worker past its deadline, how often a worker says it registered, and the exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chords_mq.apps.cluster import LocalCluster, _script, free_port
from chords_mq.client import AsyncClient, BrokerLost, RequestFailed, RequestTimeout
from chords_mq.options import ExitCode
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

BIN = Path(sys.executable).parent


def chords(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chords"), *args], capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


# -- 1. the broker is SIGKILLed after ACCEPTED -------------------------------------------------


async def test_a_client_whose_broker_is_killed_gets_broker_lost_within_its_bound(fresh_cluster):
    cluster = fresh_cluster(workers=1, latency_ms=50.0)
    killed_at: list[float] = []

    def kill_the_broker(_: dict) -> None:
        if not killed_at:
            cluster.broker.kill()
            killed_at.append(time.monotonic())
            cluster.broker.wait(10)

    async with AsyncClient(cluster.client_address, broker_lost_after_s=2.0) as client:
        stream = client.generate(
            "synthetic", method="sequential", steps=400, on_progress=kill_the_broker
        )
        with pytest.raises(BrokerLost) as caught:
            async for _ in stream:
                pass
    waited = time.monotonic() - killed_at[0]
    assert stream.accepted is not None
    assert caught.value.code == "broker_lost" and isinstance(caught.value, RequestFailed)
    assert cluster.client_address in str(caught.value)
    assert 1.0 <= waited < 3.0, waited  # the 2 s bound after the broker's last word
    assert AsyncClient(cluster.client_address).broker_lost_after_s == 60.0  # the default

    # Opting out (None) waits for the broker as long as the request may take: here its own
    # timeout ends it, as a RequestTimeout rather than BrokerLost.
    cluster.start_broker()
    cluster.wait_for_workers(1)
    killed_at.clear()
    async with AsyncClient(cluster.client_address, broker_lost_after_s=None) as client:
        stream = client.generate(
            "synthetic", method="sequential", steps=400, timeout=5.0, on_progress=kill_the_broker
        )
        with pytest.raises(RequestTimeout) as timed_out:
            async for _ in stream:
                pass
    assert not isinstance(timed_out.value, BrokerLost) and "timed out after 5.0s" in str(
        timed_out.value
    )


# -- 3. the wrong port -------------------------------------------------------------------------


def test_a_client_at_the_worker_port_is_told_within_5s_and_the_worker_at_the_client_port(
    clusters,
):
    cluster = clusters[1]

    async def submit_at_the_worker_port() -> RequestFailed:
        async with AsyncClient(cluster.worker_address) as client:
            with pytest.raises(RequestFailed) as caught:
                async for _ in client.generate("synthetic", steps=4):
                    pass
            return caught.value

    started = time.monotonic()
    refused = asyncio.run(submit_at_the_worker_port())
    assert time.monotonic() - started < 5.0  # the README's promise
    assert refused.code == "wrong_port" and cluster.client_address in refused.message

    started = time.monotonic()
    result = chords("generate", "--broker", cluster.worker_address, "--steps", "4")
    assert time.monotonic() - started < 5.0 + 4.0  # 5 s, plus the CLI's own start
    assert result.returncode == ExitCode.USAGE, result.stderr
    (line,) = error_lines(result.stderr)
    assert "worker port" in line and cluster.client_address in line, line
    status = chords("status", "--broker", cluster.worker_address)
    assert status.returncode == ExitCode.USAGE and cluster.client_address in status.stderr

    worker = subprocess.run(
        [*_script("chords-worker"), "--broker", cluster.client_address, "--model", "synthetic"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == ExitCode.USAGE, worker.stderr
    (line,) = error_lines(worker.stderr)
    assert "client port" in line and cluster.worker_address in line and "--broker" in line
    assert "Traceback" not in worker.stderr


# -- 4. the last worker of a model dies mid-request --------------------------------------------


async def test_losing_the_last_worker_tells_the_client_it_waits_then_fails_no_worker(tmp_path):
    cluster = LocalCluster(
        workers=1, latency_ms=30.0, log_dir=tmp_path / "logs", worker_timeout_s=3.0
    )
    cluster.start()
    progress: list[dict] = []

    def watch(body: dict) -> None:
        progress.append(body)
        if body["evaluations"] >= 3 and cluster.workers[0].poll() is None:
            cluster.workers[0].kill()

    try:
        async with AsyncClient(cluster.client_address) as client:
            stream = client.generate(
                "synthetic", method="sequential", steps=300, on_progress=watch, timeout=60
            )
            with pytest.raises(RequestFailed) as caught:
                async for _ in stream:
                    pass
    finally:
        cluster.stop()
    assert caught.value.code == "no_worker", caught.value
    notices = [body["waiting"] for body in progress if "waiting" in body]
    assert notices, progress[-3:]
    assert notices[0]["model"] == "synthetic" and notices[0]["fails_in_s"] == pytest.approx(3.0)
    assert stream.waiting is not None  # the last PROGRESS before the failure said so


# -- 6. one worker under a deadline ------------------------------------------------------------


async def test_a_lone_worker_past_its_deadline_is_not_copied_onto_itself(tmp_path):
    cluster = LocalCluster(workers=1, latency_ms=20.0, log_dir=tmp_path / "logs")
    cluster.start()
    spec = RequestSpec(model="synthetic", method="sequential", steps=120, seed=5)
    paused: list[int] = []

    def pause_the_worker(body: dict) -> None:
        # Stopped for 0.3 s: far past its deadline (2.5 forwards of 20 ms), within its
        # liveness (3 heartbeats of 250 ms). Twice, so one pause surely lands on an EVAL.
        if body["evaluations"] >= 20 * (len(paused) + 1) and len(paused) < 2:
            pid = cluster.workers[0].pid
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(pid, signal.SIGCONT)
            paused.append(body["evaluations"])

    try:
        async with AsyncClient(cluster.client_address) as client:
            stream = client.submit(spec, on_progress=pause_the_worker, timeout=120)
            hits = [hit async for hit in stream]
    finally:
        cluster.stop()
    log = (tmp_path / "logs" / "broker.log").read_text()
    assert len(paused) == 2
    assert "no other worker can take a copy" in log, log[-2000:]
    assert stream.stats is not None and stream.stats["retries"] == 0
    assert "copied to another worker" not in log
    assert_same_hits(hits, local_hits(spec))


# -- 7. one registration line ------------------------------------------------------------------


def connections_to(port: int) -> set[int]:
    """Local ports of the established loopback TCP connections to ``port`` (Linux)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_a_worker_whose_hellos_pile_up_says_registered_once(tmp_path):
    """A broker too busy to answer at once (here: stopped) gets several HELLOs in a burst and
    welcomes each: the worker logs one registration, not one per WELCOME."""
    cluster = LocalCluster(workers=0, log_dir=tmp_path / "logs")
    broker = cluster.start_broker()
    try:
        asyncio.run(_status(cluster.client_address))
        broker.send_signal(signal.SIGSTOP)
        cluster.start_worker()
        # The kernel accepts the worker's connection for the stopped broker; its HELLOs (one
        # per 250 ms heartbeat) wait in the socket until the broker reads them. A worker opens
        # a fresh socket after 2 s of silence, so wait for a new connection, then 1 s more.
        before = connections_to(cluster.worker_port)
        deadline = time.monotonic() + 60
        while not connections_to(cluster.worker_port) - before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert connections_to(cluster.worker_port) - before, "the worker never connected"
        time.sleep(1.0)
        broker.send_signal(signal.SIGCONT)
        cluster.wait_for_workers(1)
        time.sleep(1.0)
    finally:
        broker.send_signal(signal.SIGCONT)
        cluster.stop()
    log = (tmp_path / "logs" / "worker0.log").read_text()
    assert log.count("registered with broker") == 1, log


# -- 8. exit codes -----------------------------------------------------------------------------


def test_a_port_in_use_exits_2_for_zeromq_and_metrics_alike():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (
            [
                "--client-bind",
                f"tcp://127.0.0.1:{port}",
                "--worker-bind",
                f"127.0.0.1:{free_port()}",
            ],
            [
                "--client-bind",
                f"127.0.0.1:{free_port()}",
                "--worker-bind",
                f"127.0.0.1:{free_port()}",
                "--metrics-bind",
                f"127.0.0.1:{port}",
            ],
        ):
            result = subprocess.run(
                [*_script("chords-broker"), *args], capture_output=True, text=True, timeout=120
            )
            assert result.returncode == ExitCode.USAGE, (args, result.stderr)
            (line,) = error_lines(result.stderr)
            assert "in use" in line, line


def test_an_unreachable_broker_exits_3_and_a_failed_request_1(clusters):
    nobody = f"127.0.0.1:{free_port()}"
    for command in (("status", "--broker", nobody), ("generate", "--broker", nobody)):
        result = chords(*command)
        assert result.returncode == ExitCode.UNREACHABLE, result.stderr
        assert "cannot reach a broker" in result.stderr
    failed = chords(
        "generate", "--broker", clusters[1].client_address, "--model", "nope", "--steps", "4"
    )
    assert failed.returncode == ExitCode.FAILED and "no_worker" in failed.stderr
    usage = chords("generate", "--steps", "0")
    assert usage.returncode == ExitCode.USAGE


def test_the_exit_codes_are_the_readmes():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, f"exit code {int(code)} is not in the README"


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_broker_stopped_with_nothing_running_exits_0(tmp_path, signum):
    cluster = LocalCluster(workers=0, log_dir=tmp_path / "logs")
    broker = cluster.start_broker()
    try:
        asyncio.run(_status(cluster.client_address))
        broker.send_signal(signum)
        assert broker.wait(30) == ExitCode.OK
    finally:
        cluster.stop()
    log = (tmp_path / "logs" / "broker.log").read_text()
    assert " ERROR " not in log and "Traceback" not in log, log


async def _status(address: str) -> dict:
    async with AsyncClient(address) as client:
        for _ in range(100):
            try:
                return await client.status(timeout=1.0)
            except RequestTimeout:
                await asyncio.sleep(0.2)
    raise AssertionError(f"no broker answered at {address}")
