"""Several "hosts" on one machine: network namespaces joined by veth pairs on a Linux bridge.

Layout (one run; the names carry the test process's pid, so parallel runs do not collide):

    cmq<pid>-sw       the switch: bridge br0 and one port per host (p-broker, p-w1, ...)
    cmq<pid>-broker   10.231.0.1   chords-broker --curve KEYS, client port 5555, worker port 5556
    cmq<pid>-w1       10.231.0.11  2 synthetic chords-worker, key w1
    cmq<pid>-w2       10.231.0.12  2 synthetic chords-worker, key w2
    cmq<pid>-client   10.231.0.21  agent.py with the client key alice and the admin key ops
    cmq<pid>-rogue    10.231.0.31  agent.py (and, in one test, a worker) with an unlisted key

Each host namespace has lo and eth0; nothing is added to the root namespace, and the test
process never opens a socket to a 10.231.0.x address itself (TRANSPORT-NOTES section 6, route
safety): the agents do it from inside their namespaces. Keys are made with ``chords keygen``
as deploy/README.md's walkthrough makes them: each host's secret in its own folder, the public
keys copied into the broker's KEYS/workers/, KEYS/clients/ and KEYS/admins/, broker.key copied
to every host. Everything started here is stopped by PID, and every namespace deleted, in a
finally.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from chords_mq.keys import load_public
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits
from tests.multihost.netns import ENV, Network, script

SUBNET = "10.231.0"
HOSTS = {"broker": 1, "w1": 11, "w2": 12, "client": 21, "rogue": 31}
WORKER_HOSTS = ("w1", "w2")
WORKERS_PER_HOST = 2
LATENCY_MS = 20.0  # each synthetic forward sleeps this long
CLIENT_PORT, WORKER_PORT = 5555, 5556


def _script(name: str) -> str:
    try:
        return script(name)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


class AgentProcess:
    """tests/multihost/agent.py inside a namespace, spoken to over its stdin and stdout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.replies: dict[Any, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                with self.cond:
                    self.replies[reply.get("id")] = reply
                    self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def send(self, op: str, /, **fields: Any) -> int:
        assert self.process.stdin is not None
        with self.cond:
            self.next_id += 1
            ident = self.next_id
        self.process.stdin.write(json.dumps({"id": ident, "op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return ident

    def reply(self, ident: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while ident not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"agent: no reply to command {ident} in {timeout}s")
                if self.process.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.process.returncode}")
                self.cond.wait(min(left, 0.5))
            return self.replies.pop(ident)

    def result(self, ident: Any, timeout: float) -> Any:
        reply = self.reply(ident, timeout)
        if not reply["ok"]:
            raise AssertionError(f"agent: {reply['error']}: {reply['message']}")
        return reply["result"]

    def call(self, op: str, wait_s: float, /, **fields: Any) -> Any:
        """Send ``op`` and wait up to ``wait_s`` for its result (``fields`` go to the agent)."""
        return self.result(self.send(op, **fields), wait_s)

    def stop(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.process.stdin.write('{"op": "quit"}\n')
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class MultiHost(Network):
    """The namespaces, keys and processes of one run."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"cmq{os.getpid()}", SUBNET, HOSTS, root / "logs")
        self.root = root
        self.keys = root / "keys"  # the broker host's KEYS folder (--curve)
        self.agents: dict[str, AgentProcess] = {}
        self._spawned = 0

    # -- names ----------------------------------------------------------------------------------

    @property
    def client_address(self) -> str:
        return f"tcp://{self.addr('broker')}:{CLIENT_PORT}"

    @property
    def worker_address(self) -> str:
        return f"tcp://{self.addr('broker')}:{WORKER_PORT}"

    def host_dir(self, host: str) -> Path:
        """What lives on ``host``: its own key pairs and a copy of broker.key."""
        return self.root / "hosts" / host

    def keys_of(self, host: str, name: str) -> dict[str, str]:
        """AsyncClient keyword arguments (and the worker's two flags) for key ``name``."""
        folder = self.host_dir(host)
        return {
            "curve_secret": str(folder / f"{name}.key_secret"),
            "broker_key": str(folder / "broker.key"),
        }

    def principal(self, host: str, name: str) -> str:
        """How the broker's admin STATUS names a peer with this key."""
        return "key:" + load_public(self.host_dir(host) / f"{name}.key").decode()

    # -- keys -----------------------------------------------------------------------------------

    def make_keys(self) -> None:
        """``chords keygen`` for each party, run in parallel (each one imports torch)."""
        wanted = [(self.keys, "broker")]
        wanted += [(self.host_dir(h), h) for h in WORKER_HOSTS]
        wanted += [(self.host_dir("client"), "alice"), (self.host_dir("client"), "ops")]
        wanted += [(self.host_dir("rogue"), "rogue")]
        made = [
            subprocess.Popen(
                [_script("chords"), "keygen", str(folder), name],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=ENV,
            )
            for folder, name in wanted
        ]
        for process in made:
            try:
                out, _ = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
                raise
            assert process.returncode == 0, out
        # Distribute the public halves: the broker lists them, every host gets broker.key.
        listed = {"workers": [("w1", "w1"), ("w2", "w2")]}
        listed["clients"] = [("client", "alice")]
        listed["admins"] = [("client", "ops")]
        for role, entries in listed.items():
            (self.keys / role).mkdir(exist_ok=True)
            for host, name in entries:
                shutil.copy(self.host_dir(host) / f"{name}.key", self.keys / role)
        for host in HOSTS:
            if host != "broker":
                shutil.copy(self.keys / "broker.key", self.host_dir(host))
        # the rogue's key is valid but listed nowhere

    # -- processes ------------------------------------------------------------------------------

    def start_broker(self) -> subprocess.Popen[Any]:
        return self.spawn(
            "broker",
            "broker",
            [
                _script("chords-broker"),
                "--client-bind",
                self.client_address,
                "--worker-bind",
                self.worker_address,
                "--curve",
                str(self.keys),
                "--heartbeat-ms",
                "250",
                "--worker-timeout",
                "30",
                "--drain-timeout",
                "2",
            ],
        )

    def worker_command(self, host: str, key: str) -> list[str]:
        keys = self.keys_of(host, key)
        return [
            _script("chords-worker"),
            "--broker",
            self.worker_address,
            "--model",
            "synthetic",
            "--name",
            "synthetic",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--latency-ms",
            str(LATENCY_MS),
            "--curve-secret",
            keys["curve_secret"],
            "--broker-key",
            keys["broker_key"],
        ]

    def start_workers(self, host: str, count: int = WORKERS_PER_HOST) -> None:
        for _ in range(count):
            self._spawned += 1
            self.spawn(host, f"{host}-worker{self._spawned}", self.worker_command(host, host))

    def start_agent(self, host: str) -> AgentProcess:
        process = self.spawn(
            host,
            f"{host}-agent",
            [sys.executable, "-m", "tests.multihost.agent", "--address", self.client_address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        agent = AgentProcess(process)
        self.agents[host] = agent
        return agent

    # -- the admin's view -----------------------------------------------------------------------

    @property
    def admin(self) -> dict[str, str]:
        return self.keys_of("client", "ops")

    def wait_workers(self, count: int, timeout: float, sessions: int = 0) -> dict[str, Any]:
        """Poll, from the client host, until the broker lists ``count`` workers."""
        result: dict[str, Any] = self.agents["client"].call(
            "wait",
            timeout + 10,
            keys=self.admin,
            workers=count,
            sessions=sessions,
            timeout=timeout,
        )
        return result

    def workers_by_host(self, status: dict[str, Any]) -> dict[str, int]:
        principals = [w["principal"] for w in status["workers"]]
        counts = {h: principals.count(self.principal(h, h)) for h in WORKER_HOSTS}
        counts["other"] = len(principals) - sum(counts.values())
        return counts

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for agent in self.agents.values():
                with contextlib.suppress(Exception):
                    agent.stop()
        finally:
            super().close()


@pytest.fixture(scope="module")
def multihost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    pool = MultiHost(tmp_path_factory.mktemp("multihost"))
    reason = pool.probe()
    if reason is not None:
        pytest.skip(f"multi-host tests skipped: {reason}")
    try:
        pool.build()
        pool.make_keys()
        pool.start_broker()
        for host in WORKER_HOSTS:
            pool.start_workers(host)
        for host in ("client", "rogue"):
            pool.start_agent(host)
        for agent in pool.agents.values():
            agent.result(None, timeout=60)  # "ready"
        status = pool.wait_workers(len(WORKER_HOSTS) * WORKERS_PER_HOST, timeout=60)["status"]
        expected = {**{host: WORKERS_PER_HOST for host in WORKER_HOSTS}, "other": 0}
        assert pool.workers_by_host(status) == expected
        yield pool
    finally:
        pool.close()


# -- hits ----------------------------------------------------------------------------------------


def read_hits(path: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def as_hits(records: list[dict[str, Any]]) -> list[SimpleNamespace]:
    """The agent's JSON hits as objects assert_same_hits compares (core, round, latent)."""
    hits = []
    for record in records:
        raw = base64.b64decode(record["latent_b64"])
        assert hashlib.sha256(raw).hexdigest() == record["sha256"]
        dtype = getattr(torch, record["dtype"])
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
        latent = flat.view(dtype).reshape(record["shape"])
        hits.append(SimpleNamespace(core=record["core"], round=record["round"], latent=latent))
    return hits


def check_bitwise(records: list[dict[str, Any]], spec: RequestSpec) -> None:
    """The engine's hits, across namespaces, are the in-process run's, bit for bit."""
    assert_same_hits(as_hits(records), local_hits(spec))
