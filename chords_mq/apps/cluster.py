"""A local cluster: one chords-broker and W chords-worker processes on loopback.

``chords run``, the integration tests and the benchmarks all start the real daemons through
this, as separate processes talking over real TCP sockets. Ports are picked free at start.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from chords_mq.client import AsyncClient, RequestTimeout
from chords_mq.errors import ChordsError


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """In a daemon we start: get SIGTERM when our parent dies, however it dies (SIGKILL
    included), so no broker or worker outlives the program that started it (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() and the signal handlers still run
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _spawn(
    command: list[str], log: IO[bytes] | int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(command, stdout=log, stderr=log, env=env, preexec_fn=preexec)


def free_port() -> int:
    """A TCP port on loopback that is free now, for a daemon to bind a moment later. Taken
    below the kernel's ephemeral range where it can be read: a port bind(0) hands out comes
    from that range, and so does the local port of every outgoing connection, so one made
    meanwhile (a worker or a client of another cluster) could take it first ("cannot bind:
    Address already in use", seen once in CI)."""
    low = _ephemeral_low()
    for _ in range(64 if low > 2048 else 0):
        port = random.randrange(max(1024, low - 20000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """The lowest ephemeral port (Linux), or 0 where that cannot be read."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _script(name: str) -> list[str]:
    """Run a console script of this environment, even if its bin/ is not on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    module = {
        "chords-broker": "chords_mq.broker.server",
        "chords-worker": "chords_mq.workers.worker",
    }[name]
    return [sys.executable, "-c", f"import {module} as m; m.main()"]


# The workers' malloc (glibc): a freed latent of up to 32 MiB stays in the process for the next
# one instead of going back to the system (trimmed or unmapped), so a step's new latents do not
# fault their pages in again: 2200 page faults and 4 ms of CPU less per 16 MiB step, one latent
# sequential at 1.05x of ideal instead of 1.06x (benchmarks/sequential_overhead.py). The store
# bounds what a worker holds. Workers only; a GLIBC_TUNABLES of the caller's own wins.
WORKER_TUNABLES = (
    "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432"
    ":glibc.malloc.trim_threshold=268435456"
)


class LocalCluster:
    """Start with ``start()`` (or ``with``); stop with ``stop()``. Logs go to ``log_dir``.

    ``threads`` is each worker's torch thread count: 1 by default, for steady timings when
    several workers share a few cores; None leaves torch's own default, as a user's plain
    Python process has it (core 1 is bitwise that process's pipeline output only then).
    ``devices``: one worker per entry, on that device (``["cuda:0", "cuda:1"]``); it overrides
    ``workers`` and ``device``.

    ``verify`` is the broker's ``--verify``: "off" by default here, since this cluster's workers
    are processes it started itself on this machine, and checking them against each other would
    only double their work (a new worker's every task is replicated until 500 agreed). None
    leaves the broker's own default (``sample``); a ``--verify`` in ``extra_broker_args`` wins.
    """

    def __init__(
        self,
        workers: int = 2,
        model: str = "synthetic",
        latency_ms: float = 0.0,
        log_dir: str | os.PathLike[str] | None = None,
        heartbeat_ms: int = 250,
        worker_timeout_s: float = 30.0,
        extra_worker_args: Sequence[str] = (),
        device: str = "cpu",
        threads: int | None = 1,
        extra_broker_args: Sequence[str] = (),
        curve: str | os.PathLike[str] | None = None,
        devices: Sequence[str] | None = None,
        verify: str | None = "off",
    ) -> None:
        self.devices = None if devices is None else list(devices)
        self.worker_count = workers if self.devices is None else len(self.devices)
        self.device = device
        self.model = model
        self.latency_ms = latency_ms
        self.heartbeat_ms = heartbeat_ms
        self.worker_timeout_s = worker_timeout_s
        self.extra_worker_args = list(extra_worker_args)
        self.extra_broker_args = list(extra_broker_args)
        if verify is not None and "--verify" not in self.extra_broker_args:
            self.extra_broker_args += ["--verify", verify]
        self.threads = threads
        # A folder from chords_mq.keys.pool_keys: CURVE on, with its "worker" and "client" keys.
        self.curve = Path(curve) if curve is not None else None
        self.client_port, self.worker_port = free_port(), free_port()
        self.client_address = f"tcp://127.0.0.1:{self.client_port}"
        self.worker_address = f"tcp://127.0.0.1:{self.worker_port}"
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
        }
        if threads is not None:  # None: the environment as the user has it
            self._env["OMP_NUM_THREADS"] = str(threads)
        tunables = os.environ.get("GLIBC_TUNABLES", WORKER_TUNABLES)
        self._worker_env = {**self._env, "GLIBC_TUNABLES": tunables}

    @property
    def env(self) -> dict[str, str]:
        """The environment the daemons start with (benchmarks start their baselines in it)."""
        return dict(self._env)

    def _log(self, name: str) -> IO[bytes] | int:
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(handle)
        return handle

    def start_broker(self) -> subprocess.Popen[bytes]:
        command = [
            *_script("chords-broker"),
            "--client-bind",
            self.client_address,
            "--worker-bind",
            self.worker_address,
            "--heartbeat-ms",
            str(self.heartbeat_ms),
            "--worker-timeout",
            str(self.worker_timeout_s),
            "--drain-timeout",
            "5",
            *([] if self.curve is None else ["--curve", str(self.curve)]),
            *self.extra_broker_args,
        ]
        log = self._log("broker")
        self.broker = _spawn(command, log, self._env)
        return self.broker

    def start_worker(
        self, latency_ms: float | None = None, extra_args: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        command = [
            *_script("chords-worker"),
            "--broker",
            self.worker_address,
            "--model",
            self.model,
            "--device",
            self.worker_device(len(self.workers)),
            "--heartbeat-ms",
            str(self.heartbeat_ms),
            *([] if self.threads is None else ["--threads", str(self.threads)]),
            *self.worker_keys(),
            *self.extra_worker_args,
            *extra_args,
        ]
        latency = self.latency_ms if latency_ms is None else latency_ms
        if self.model == "synthetic":
            command += ["--latency-ms", str(latency)]
        log = self._log(f"worker{len(self.workers)}")
        process = _spawn(command, log, self._worker_env)
        self.workers.append(process)
        return process

    def worker_device(self, index: int) -> str:
        """The device of the ``index``-th worker started (``devices`` in turn)."""
        if not self.devices:
            return self.device
        return self.devices[index % len(self.devices)]

    def worker_keys(self, name: str = "worker") -> list[str]:
        if self.curve is None:
            return []
        secret = self.curve / "private" / f"{name}.key_secret"
        return ["--curve-secret", str(secret), "--broker-key", str(self.curve / "broker.key")]

    def client_keys(self, name: str = "client") -> dict[str, Any]:
        """AsyncClient's keyword arguments for this cluster (none without CURVE)."""
        if self.curve is None:
            return {}
        return {
            "curve_secret": self.curve / "private" / f"{name}.key_secret",
            "broker_key": self.curve / "broker.key",
        }

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.launch()
        try:
            self.wait_for_workers(self.worker_count, timeout)
        except BaseException:
            self.stop()  # never leave daemons behind
            raise
        return self

    def launch(self) -> LocalCluster:
        """Start the broker and the workers without waiting for them (``wait_for_workers``
        then does): the caller can do its own work while they import and register."""
        try:
            self.start_broker()
            for _ in range(self.worker_count):
                self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def alive_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the broker lists ``count`` workers; returns its status.

        Works inside a running event loop too (it then waits on a helper thread).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.wait_for_workers_async(count, timeout))
        with ThreadPoolExecutor(max_workers=1) as helper:
            return helper.submit(
                lambda: asyncio.run(self.wait_for_workers_async(count, timeout))
            ).result()

    async def wait_for_workers_async(self, count: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with AsyncClient(self.client_address, **self.client_keys()) as client:
            while True:
                if self.broker is not None and self.broker.poll() is not None:
                    raise ChordsError(f"chords-broker exited with {self.broker.returncode}")
                try:
                    status = await client.status(timeout=1.0)
                    if len(status["workers"]) == count:
                        return status
                except RequestTimeout:
                    pass
                if time.monotonic() > deadline:
                    raise ChordsError(f"{count} worker(s) did not register in {timeout}s")
                await asyncio.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        processes = [p for p in [self.broker, *self.workers] if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
