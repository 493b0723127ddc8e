"""How the daemons and the CLI behave for an operator: endpoints, the environment, config
files, fail-fast errors. Real processes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from chords_mq import __version__
from chords_mq.apps.cluster import LocalCluster, _script, free_port
from chords_mq.apps.local_gateway import gateway_command
from chords_mq.options import BrokerUnreachable, probe

BIN = Path(sys.executable).parent


def chords(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chords"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "endpoint", ["tcp://localhost", "http://127.0.0.1:5555", "tcp://127.0.0.1:0", "tcp://a b:1"]
)
def test_an_unusable_endpoint_exits_2_with_one_line(endpoint):
    commands = [
        [str(BIN / "chords"), "status", "--broker", endpoint],
        [*_script("chords-worker"), "--broker", endpoint],
        [*_script("chords-broker"), "--client-bind", endpoint],
        [*gateway_command(), "--broker", endpoint],
    ]
    # all four at once (each is mostly its imports): the test's time is the slowest one's
    running = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    try:
        for command, process in zip(commands, running):
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 2, (command, stderr)
            errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and "Traceback" not in stderr, stderr
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def test_host_port_without_tcp_works_for_workers_and_the_cli(tmp_path):
    cluster = LocalCluster(workers=0, log_dir=tmp_path / "logs")
    cluster.start_broker()
    worker = None
    try:
        bare = cluster.worker_address.removeprefix("tcp://")
        worker = subprocess.Popen(
            [*_script("chords-worker"), "--broker", bare, "--model", "synthetic"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cluster.wait_for_workers(1, timeout=60)
        result = chords("status", "--broker", cluster.client_address.removeprefix("tcp://"))
        assert result.returncode == 0, result.stderr
        assert "workers: 1" in result.stdout
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        cluster.stop()


def test_a_missing_or_unresolvable_broker_is_reported_within_5s_with_the_reason():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="refused"):
        probe(f"127.0.0.1:{port}", timeout=5.0)
    with pytest.raises(BrokerUnreachable, match="does not resolve"):
        probe("no-such-host.invalid:5555", timeout=5.0)
    assert time.monotonic() - started < 5.0
    for address, reason in (
        (f"127.0.0.1:{port}", "refused"),
        ("no-such-host.invalid:1", "resolve"),
    ):
        result = chords("status", "--broker", address)
        assert result.returncode == 3  # ExitCode.UNREACHABLE
        assert f"cannot reach a broker at tcp://{address}" in result.stderr
        assert reason in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_model_fails_at_once_with_the_served_list(clusters):
    address = clusters[1].client_address
    time.sleep(3.0)  # past the broker's re-registration window after its start
    started = time.monotonic()
    result = chords("generate", "--broker", address, "--model", "nope", "--steps", "4")
    waited = time.monotonic() - started
    assert result.returncode == 1
    assert "no_worker" in result.stderr and "'synthetic'" in result.stderr, result.stderr
    assert waited < 20  # the old behaviour waited 30 s for the no-worker timeout


def test_chords_broker_in_the_environment_is_honoured(clusters):
    cluster = clusters[1]
    result = chords("status", env={"CHORDS_BROKER": cluster.client_address})
    assert result.returncode == 0, result.stderr
    assert f"broker {cluster.client_address}" in result.stdout and "workers: 1" in result.stdout


def test_a_config_file_sets_options_below_the_environment(tmp_path):
    from_file, from_env, workers_port = free_port(), free_port(), free_port()
    config = tmp_path / "broker.toml"
    config.write_text(
        f'client-bind = "tcp://127.0.0.1:{from_file}"\n'
        f'worker_bind = "127.0.0.1:{workers_port}"\n'
        'log-level = "warning"\n'
    )
    env = {**os.environ, "CHORDS_CLIENT_BIND": f"tcp://127.0.0.1:{from_env}"}
    broker = subprocess.Popen(
        [*_script("chords-broker"), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        result = chords("status", "--broker", f"127.0.0.1:{from_env}")
        while result.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            result = chords("status", "--broker", f"127.0.0.1:{from_env}")
        assert result.returncode == 0, result.stderr  # the environment beat the file
        assert chords("status", "--broker", f"127.0.0.1:{from_file}").returncode == 3
        worker = chords("status", "--broker", f"127.0.0.1:{workers_port}", "--timeout", "1")
        assert "cannot reach" not in worker.stderr  # the file's worker-bind is listening
    finally:
        broker.terminate()
        broker.wait(timeout=30)
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-option = 1\n")
    result = subprocess.run(
        [*_script("chords-broker"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "unknown option 'no-such-option'" in result.stderr


def test_the_gateway_answers_version():
    result = subprocess.run(
        [*gateway_command(), "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout == f"chords-gateway, version {__version__}\n"


def test_the_gateway_refuses_a_bad_start_in_one_line(tmp_path):
    """A port in use, a missing API keys file, an unknown option in --config, an option out
    of range in the environment: each one ``Error:`` line naming it, and exit 2."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-option = 1\n")
    cases = {
        f"127.0.0.1:{taken.getsockname()[1]}": [
            "--http-bind",
            f"127.0.0.1:{taken.getsockname()[1]}",
        ],
        "API keys file": ["--api-keys", str(tmp_path / "missing")],
        "no-such-option": ["--config", str(bad)],
        "--max-n": [],  # CHORDS_MAX_N=0
    }
    env = {**os.environ, "CHORDS_MAX_N": "0"}
    try:
        for needle, args in cases.items():
            result = subprocess.run(
                [*gateway_command(), "--broker", "tcp://127.0.0.1:1", *args],
                capture_output=True,
                text=True,
                timeout=60,
                env=env if not args else None,
            )
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert result.returncode == 2, (needle, result.stderr)
            assert len(errors) == 1 and needle in errors[0], result.stderr
            assert "Traceback" not in result.stderr, result.stderr
    finally:
        taken.close()


def test_the_gateway_takes_its_broker_from_the_environment_over_its_config_file(clusters, tmp_path):
    """--config names a broker where none listens and the HTTP port; CHORDS_BROKER names the
    real one: the gateway serves on the file's port, in front of the environment's broker."""
    cluster, port = clusters[1], free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'broker = "tcp://127.0.0.1:{free_port()}"\n'
        f'http-bind = "127.0.0.1:{port}"\n'
        'log-format = "json"\n'
    )
    log = tmp_path / "gateway.log"
    with open(log, "wb") as handle:
        gateway = subprocess.Popen(
            [*gateway_command(), "--config", str(config)],
            stdout=handle,
            stderr=handle,
            env={**os.environ, "CHORDS_BROKER": cluster.client_address},
        )
        try:
            report, deadline = None, time.monotonic() + 60
            while report is None and time.monotonic() < deadline and gateway.poll() is None:
                try:
                    url = f"http://127.0.0.1:{port}/healthz"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        report = json.load(response)
                except OSError:
                    time.sleep(0.1)
            assert report is not None, log.read_text()
            assert report["broker"] == cluster.client_address and report["models"] == ["synthetic"]
        finally:
            gateway.terminate()
            assert gateway.wait(timeout=30) == 0
    lines = log.read_text().splitlines()
    assert lines and all(json.loads(line)["daemon"] == "chords-gateway" for line in lines)
