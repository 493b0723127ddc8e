"""A chords-gateway process on loopback, in front of a broker (a ``LocalCluster``'s or any):
the tests, the benchmarks and the playground's browser test start the real daemon through this.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from chords_mq.apps.cluster import _spawn, free_port
from chords_mq.errors import ChordsError


def gateway_command() -> list[str]:
    """``chords-gateway`` of this environment, even if its bin/ is not on PATH."""
    local = Path(sys.executable).parent / "chords-gateway"
    if local.exists():
        return [str(local)]
    return [sys.executable, "-c", "from chords_mq.gateway.app import main; main()"]


class LocalGateway:
    """``LocalGateway(cluster.client_address).start()``; ``url`` is its base
    (``http://127.0.0.1:PORT``), ``stop()`` sends SIGTERM. ``extra_args`` go to the daemon
    (``--api-keys KEYS``, ``--max-requests-per-key 2``, CURVE keys ...)."""

    def __init__(
        self,
        broker: str,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.broker = broker
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 60.0) -> LocalGateway:
        command = [
            *gateway_command(),
            "--broker",
            self.broker,
            "--http-bind",
            f"127.0.0.1:{self.port}",
            *self.extra_args,
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = _spawn(command, self._log or subprocess.DEVNULL, self.env)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the gateway answers HTTP at all (``/metrics``: no broker needed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ChordsError(f"chords-gateway exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/metrics", timeout=1.0):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ChordsError(f"chords-gateway did not answer at {self.url} in {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout``; the exit code (None if never started)."""
        process, code = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> LocalGateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
