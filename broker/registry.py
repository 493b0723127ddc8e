"""The worker registry: who is connected, what they serve, whether they are alive and busy.

Plain data owned by the broker's event loop (no locks). A worker is alive while it has been heard
from within ``timeout_s``; the broker also probes workers on a socket disconnect event, which
catches a killed worker within milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """What a worker is doing for the broker: PREPARE for a request, or EVAL of some tasks."""

    kind: str  # "PREPARE", "EVAL" or "DECODE"
    request: str
    task: int | None = None  # first task of an EVAL, or a DECODE's id; answers carry it
    sent_at: float = field(default_factory=time.monotonic)


@dataclass
class WorkerInfo:
    identity: bytes
    name: str
    model: str
    device: str
    dtype: str
    max_batch: int
    last_seen: float = field(default_factory=time.monotonic)
    job: Job | None = None
    prepared: set[str] = field(default_factory=set)  # request ids with a cached context
    completed: int = 0

    @property
    def idle(self) -> bool:
        return self.job is None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "busy": self.job is not None,
            "prepared": len(self.prepared),
            "completed": self.completed,
        }


class WorkerRegistry:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workers: dict[bytes, WorkerInfo] = {}

    def hello(self, info: WorkerInfo) -> WorkerInfo | None:
        """Register ``info``; returns the previous entry under the same identity, if any."""
        previous = self.workers.pop(info.identity, None)
        self.workers[info.identity] = info
        return previous

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def seen(self, identity: bytes) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.pop(identity, None)

    def expired(self) -> list[WorkerInfo]:
        deadline = time.monotonic() - self.timeout_s
        return [w for w in self.workers.values() if w.last_seen < deadline]

    def serving(self, model: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.model == model]

    def idle(self) -> list[WorkerInfo]:
        return [w for w in self.workers.values() if w.idle]
