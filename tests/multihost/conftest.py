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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import pytest
import torch

from chords_mq.keys import load_public
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUBNET = "10.231.0"
HOSTS = {"broker": 1, "w1": 11, "w2": 12, "client": 21, "rogue": 31}
WORKER_HOSTS = ("w1", "w2")
WORKERS_PER_HOST = 2
LATENCY_MS = 20.0  # each synthetic forward sleeps this long
CLIENT_PORT, WORKER_PORT = 5555, 5556
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the project into this venv (deploy/dev.sh)")
    return str(path)


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


class MultiHost:
    """The namespaces, keys and processes of one run."""

    def __init__(self, root: Path) -> None:
        self.prefix = f"cmq{os.getpid()}"
        self.root = root
        self.keys = root / "keys"  # the broker host's KEYS folder (--curve)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.created: list[str] = []
        self.processes: dict[str, list[subprocess.Popen[Any]]] = {h: [] for h in HOSTS}
        self.agents: dict[str, AgentProcess] = {}
        self._handles: list[IO[bytes]] = []
        self._spawned = 0

    # -- names ----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @staticmethod
    def addr(host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

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

    # -- network --------------------------------------------------------------------------------

    def add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build_network(self) -> None:
        switch = self.ns("sw")
        self.add_namespace(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for host in HOSTS:
            ns, port = self.ns(host), f"p-{host}"
            self.add_namespace(ns)
            # Both ends are made inside namespaces: nothing appears in the root namespace.
            ip(
                "-n",
                switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            ip("-n", switch, "link", "set", port, "master", "br0")
            ip("-n", switch, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def link(self, host: str, up: bool) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

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

    def spawn(
        self, host: str, label: str, command: list[str], **popen: Any
    ) -> subprocess.Popen[Any]:
        log = open(self.logs / f"{label}.log", "ab")  # noqa: SIM115 - closed in close()
        self._handles.append(log)
        popen.setdefault("stdout", log)
        process: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *command],
            stderr=log,
            env=ENV,
            cwd=REPO,
            **popen,
        )
        self.processes[host].append(process)
        self._check_exec(process, command[0])
        return process

    @staticmethod
    def _check_exec(process: subprocess.Popen[Any], program: str) -> None:
        """``ip netns exec`` execs the command in its own process (no fork), so the pid we hold
        is the daemon's and a kill by pid reaches it. Check that instead of assuming it."""
        deadline = time.monotonic() + 10
        name = Path(program).name
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return  # exited: its log says why; the waits that follow fail
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
                if cmdline[0] not in (b"", b"ip"):  # b"": between fork and exec
                    assert any(name.encode() in part for part in cmdline), cmdline
                    return
            time.sleep(0.01)
        raise AssertionError(f"pid {process.pid} is still `ip netns exec`, not {name}")

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

    def alive(self, host: str) -> list[subprocess.Popen[Any]]:
        return [p for p in self.processes[host] if p.poll() is None]

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process this run started on ``host``, by pid."""
        killed = []
        for process in self.alive(host):
            os.kill(process.pid, signal.SIGKILL)
            killed.append(process.pid)
        for process in self.processes[host]:
            process.wait(10)
        return killed

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
            every = [p for procs in self.processes.values() for p in procs]
            for process in every:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            for process in every:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        finally:
            for handle in self._handles:
                handle.close()
            for name in reversed(self.created):
                ip("netns", "del", name, check=False)
            self.created.clear()


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the namespace tests, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "`ip netns add` needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    return None


@pytest.fixture(scope="module")
def multihost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHost]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests skipped: {reason}")
    pool = MultiHost(tmp_path_factory.mktemp("multihost"))
    try:
        probe = ip("netns", "add", pool.ns("probe"), check=False)
        if probe.returncode != 0:
            pytest.skip(
                "multi-host tests skipped: `ip netns add` failed (no CONFIG_NET_NS, or not "
                f"allowed here): {probe.stderr.strip()}"
            )
        ip("netns", "del", pool.ns("probe"), check=False)
        pool.build_network()
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
