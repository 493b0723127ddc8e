"""Several "hosts" on one machine, without pytest: network namespaces joined by veth pairs on a
Linux bridge, the processes started in them, optional link shaping, and interface counters.

Used by the multi-host tests (``conftest.py``) and by ``benchmarks/crosshost.py``.

    <prefix>-sw       the switch: bridge br0 and one port per host (p-<host>)
    <prefix>-<host>   one namespace per host, with lo and eth0 at <subnet>.<octet>/24

Nothing is added to the root namespace, and the caller never opens a socket to a namespace
address itself (TRANSPORT-NOTES section 6, route safety): processes inside the namespaces do.
Everything started here is stopped by PID, and every namespace deleted, in ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from chords_mq.apps.cluster import WORKER_TUNABLES

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # freed latents kept for the next step, as LocalCluster's workers (every process here)
    "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", WORKER_TUNABLES),
}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "`ip netns add` needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    return None


def script(name: str) -> str:
    """The path of one of this venv's console scripts (``chords-broker``, ...)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the project into this venv (deploy/dev.sh)"
        )
    return str(path)


class Network:
    """The namespaces of one run, the processes started in them, and their logs."""

    def __init__(self, prefix: str, subnet: str, hosts: dict[str, int], logs: Path) -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.hosts = dict(hosts)
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.created: list[str] = []
        self.processes: dict[str, list[subprocess.Popen[Any]]] = {h: [] for h in hosts}
        self._handles: list[IO[bytes]] = []

    # -- names ----------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts[host]}"

    # -- network --------------------------------------------------------------------------------

    def probe(self) -> str | None:
        """Why namespaces cannot be made here (after trying one), or None if they can."""
        reason = namespaces_unavailable()
        if reason is not None:
            return reason
        made = ip("netns", "add", self.ns("probe"), check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed (no CONFIG_NET_NS, or not allowed here): {made.stderr}"
        ip("netns", "del", self.ns("probe"), check=False)
        return None

    def add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        switch = self.ns("sw")
        self.add_namespace(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        for host in self.hosts:
            ns, port = self.ns(host), f"p-{host}"
            self.add_namespace(ns)
            # Both ends are made inside namespaces: nothing appears in the root namespace.
            veth = ["type", "veth", "peer", "name", "eth0", "netns", ns]
            ip("-n", switch, "link", "add", port, *veth)
            ip("-n", switch, "link", "set", port, "master", "br0")
            ip("-n", switch, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def link(self, host: str, up: bool) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def shape(self, host: str, rate: str | None) -> None:
        """Shape what ``host`` sends to ``rate`` (tc tbf, e.g. "1gbit"), or unshape (None).
        Each host shapes its own egress, so every host has a full-duplex link of that rate."""
        ns = self.ns(host)
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
            capture_output=True,
            timeout=15,
        )
        if rate is None:
            return
        command = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate]
        command += ["burst", "256kb", "latency", "50ms"]
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *command], capture_output=True, text=True, timeout=15
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {ns}: {done.stderr.strip()}")

    def counters(self, host: str) -> dict[str, int]:
        """Bytes ``host``'s eth0 has received and sent so far."""
        out = subprocess.run(
            ["ip", "-n", self.ns(host), "-s", "-j", "link", "show", "eth0"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx": int(stats["rx"]["bytes"]), "tx": int(stats["tx"]["bytes"])}

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

    def stop_processes(self) -> None:
        """SIGTERM everything started here, then SIGKILL what is left after 10 s."""
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

    def close(self) -> None:
        try:
            self.stop_processes()
        finally:
            for handle in self._handles:
                handle.close()
            for name in reversed(self.created):
                ip("netns", "del", name, check=False)
            self.created.clear()
