"""One request: owns its plan, its ready queue, its in-flight tasks and their attempts.

The plan is a dataflow graph, so there is no round barrier here: every task ``plan.ready()``
returns waits in ``queue`` until the dispatcher hands it to an idle worker. A lost or failed
worker's task goes back to the queue with the next attempt number; a result whose attempt is not
the current one is stale and dropped, so a task counts once whichever copy returns first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from chords_mq.algorithms.base import Hit, Task, TaskLedger
from chords_mq.request import RequestSpec
from chords_mq.solvers import Solver


@dataclass
class PendingHit:
    """A released hit waiting for its decoded media (requests with output media or both)."""

    hit: Hit
    decode_id: int
    media: torch.Tensor | None = None
    worker: bytes | None = None  # the worker decoding it now


class RequestSession:
    def __init__(self, request_id: str, client: bytes, spec: RequestSpec) -> None:
        self.id = request_id
        self.client = client
        self.spec = spec
        self.created = time.monotonic()
        self.plan: TaskLedger | None = None
        self.queue: list[Task] = []
        self.in_flight: dict[int, tuple[Task, int, bytes]] = {}  # task id -> task, attempt, worker
        self.attempts: dict[int, int] = {}
        self.failures: dict[int | None, int] = {}  # task id (None: prepare) -> failures so far
        self.preparing: set[bytes] = set()
        self.prepared: set[bytes] = set()
        self.evaluations = 0
        self.compute_s = 0.0  # worker-reported model time, summed over accepted results
        self.forwards = 0  # EVAL messages answered (fewer than evaluations in batch mode)
        self.retries = 0
        self.hits_sent = 0
        self.core_steps: dict[int, int] = {}  # highest step each core has evaluated
        self.pending: list[PendingHit] = []  # hits in release order, waiting for media
        self._decode_ids = 0
        self.no_worker_since: float | None = None
        self.last_progress = 0.0
        # How many workers can usefully work on this request at once.
        self.parallelism = spec.resolved_cores()

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def done(self) -> bool:
        """The plan is finished and every hit has been delivered (media included)."""
        return self.plan is not None and self.plan.done and not self.pending

    @property
    def wants_media(self) -> bool:
        return self.spec.output != "latent"

    def await_media(self, hits: list[Hit]) -> None:
        for hit in hits:
            self._decode_ids += 1
            self.pending.append(PendingHit(hit, self._decode_ids))

    def next_decode(self, worker: bytes) -> PendingHit | None:
        for pending in self.pending:
            if pending.media is None and pending.worker is None:
                pending.worker = worker
                return pending
        return None

    def decode_backlog(self) -> int:
        """Released hits that still need a worker to decode them."""
        return sum(1 for p in self.pending if p.media is None and p.worker is None)

    def media_arrived(self, decode_id: int, media: torch.Tensor) -> list[PendingHit]:
        """Store media; returns the hits now deliverable, in release order."""
        for pending in self.pending:
            if pending.decode_id == decode_id and pending.media is None:
                pending.media = media
        ready = []
        while self.pending and self.pending[0].media is not None:
            ready.append(self.pending.pop(0))
        return ready

    def decode_failed(self, decode_id: int) -> None:
        for pending in self.pending:
            if pending.decode_id == decode_id:
                pending.worker = None

    def elapsed(self) -> float:
        return time.monotonic() - self.created

    def wants_worker(self, identity: bytes) -> bool:
        """Should an idle worker that is not prepared for us be prepared now?"""
        if identity in self.prepared or identity in self.preparing:
            return False
        if len(self.prepared) + len(self.preparing) >= self.parallelism:
            return False
        return self.plan is None or bool(self.queue)

    def start(self, x0: torch.Tensor, solver: Solver) -> None:
        """Build the plan from the first PREPARED (initial latent and solver)."""
        if self.plan is None:
            self.plan = self.spec.build_plan(x0, solver)
            self._pull()

    def _pull(self) -> None:
        assert self.plan is not None
        self.queue.extend(self.plan.ready())
        # Any order gives the same bits; this one keeps the wavefront even (earliest round
        # first) and, within a round, serves the fastest core's critical path first.
        self.queue.sort(key=lambda task: (task.round, -task.core))

    def next_task(self, worker: bytes) -> tuple[Task, int]:
        task = self.queue.pop(0)
        attempt = self.attempts.get(task.id, 0)
        self.in_flight[task.id] = (task, attempt, worker)
        return task, attempt

    def complete(self, task_id: int, attempt: int, output: torch.Tensor) -> list[Hit] | None:
        """Feed one result to the plan; None if it is stale (unknown task or old attempt)."""
        entry = self.in_flight.get(task_id)
        if entry is None or entry[1] != attempt or self.plan is None:
            return None
        del self.in_flight[task_id]
        self.evaluations += 1
        task = entry[0]
        self.core_steps[task.core] = max(self.core_steps.get(task.core, -1), task.step)
        hits = self.plan.complete(task_id, output)
        self._pull()
        return hits

    def requeue(self, task_id: int) -> None:
        entry = self.in_flight.pop(task_id, None)
        if entry is None:
            return
        self.attempts[task_id] = entry[1] + 1
        self.retries += 1
        self.queue.append(entry[0])
        self.queue.sort(key=lambda task: (task.round, -task.core))

    def worker_lost(self, identity: bytes) -> None:
        self.prepared.discard(identity)
        self.preparing.discard(identity)
        for pending in self.pending:
            if pending.worker == identity:
                pending.worker = None
        for task_id in [t for t, (_, _, w) in self.in_flight.items() if w == identity]:
            self.requeue(task_id)

    def progress(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "hits": self.hits_sent,
            "cores": [[core, step] for core, step in sorted(self.core_steps.items())],
        }

    def stats(self) -> dict[str, Any]:
        returned = self.plan.returned if self.plan is not None else None
        return {
            "evaluations": self.evaluations,
            "retries": self.retries,
            "hits": self.hits_sent,
            "wall_s": round(self.elapsed(), 6),
            "compute_s": round(self.compute_s, 6),
            "forwards": self.forwards,
            "returned": None
            if returned is None
            else {"core": returned.core, "round": returned.round},
        }

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "method": self.spec.method,
            "steps": self.spec.steps,
            "evaluations": self.evaluations,
            "hits": self.hits_sent,
            "queued": len(self.queue),
            "in_flight": len(self.in_flight),
            "workers": len(self.prepared),
            "elapsed_s": round(self.elapsed(), 3),
        }
