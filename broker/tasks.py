"""A request's tasks between its plan and the workers: the ready queue, the attempts in flight,
the late attempts still accepted, and what a lost or late worker means for them.

Every task the plan hands out waits in the queue, most urgent first (the order its session
gives: ``urgency``), until the dispatcher takes it for a worker; it is then in flight under an
attempt number. A lost or failed worker's task goes back to the queue with the next attempt,
and an answer whose attempt is not the current one is stale. A late task (past its deadline)
is copied: queued again with the next attempt, while its late attempt stays valid too, so the
first of the two answers wins. The session owns the book; nothing else writes it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import torch

from chords_mq.algorithms.base import Task

Entry = tuple[Task, int, bytes]  # a task, its attempt, the worker running it


class TaskBook:
    """One request's queued and running tasks, and their attempts."""

    def __init__(self, urgency: Callable[[Task], tuple[float, ...]]) -> None:
        self._urgency = urgency
        # heap of (urgency, seq, task): the most urgent first
        self._queue: list[tuple[tuple[float, ...], int, Task]] = []
        self._seq = 0
        self.in_flight: dict[int, Entry] = {}  # task id -> task, attempt, worker
        self.attempts: dict[int, int] = {}
        # Late attempts still accepted while their copy is queued or running: id -> entry.
        self.late: dict[int, Entry] = {}
        self.retries = 0
        # While results are being recomputed: the tasks that read them wait (``take`` skips them).
        self.blocked: Callable[[Task], bool] | None = None
        # Replicas (``broker.verify``): taken only when asked for (``spare``), by the workers
        # that may run them; not counted as runnable.
        self.spare: Callable[[Task], bool] | None = None
        # Chains: the plan's ``unfollow``. A follower handed out behind the task it reads
        # (``follow``) cannot run anywhere else before that one's result exists: wherever a
        # task would run again, a follower is taken back instead (the plan readies it again).
        self.unfollow: Callable[[int], bool] | None = None
        # Tasks a given worker may not run (``RequestSession.avoids``: a recomputation, on a
        # worker accused of serving corrupt data in the request); ``take`` and ``may_take``
        # skip them for that worker.
        self.avoid: Callable[[Task, bytes], bool] | None = None

    def __len__(self) -> int:
        """How many tasks are queued."""
        return len(self._queue)

    # -- the queue -------------------------------------------------------------------------------

    def push(self, task: Task) -> None:
        heapq.heappush(self._queue, (self._urgency(task), self._seq, task))
        self._seq += 1

    def reorder(self) -> None:
        """The urgencies changed (a new schedule): queue every task again under them."""
        tasks = [entry[2] for entry in self._queue]
        self._queue = []
        for task in tasks:
            self.push(task)

    def queued(self) -> list[Task]:
        """The queued tasks, the next to go out first."""
        return [entry[2] for entry in sorted(self._queue)]

    def head(self) -> Task | None:
        """The task that would go out next."""
        return self._queue[0][2] if self._queue else None

    def frontier(self) -> int:
        """The round of the oldest task not finished yet (queued or in flight)."""
        oldest = min((entry[2].round for entry in self._queue), default=None)
        for task, _, _ in self.in_flight.values():
            if oldest is None or task.round < oldest:
                oldest = task.round
        return oldest or 0

    def _gate(
        self,
        allowed: Callable[[Task], bool] | None,
        spare: bool = False,
        worker: bytes | None = None,
    ) -> Callable[[Task], bool] | None:
        """``allowed``, less the blocked tasks, the tasks ``worker`` may not run (``avoid``),
        and the replicas unless ``spare`` (then only those)."""
        blocked, replica = self.blocked, self.spare
        avoid = None if worker is None else self.avoid
        if replica is not None and not spare and not any(replica(e[2]) for e in self._queue):
            replica = None  # none queued: ``allowed`` as it is (a slack take stays one)
        if blocked is None and replica is None and avoid is None and not spare:
            return allowed

        def gate(task: Task) -> bool:
            if blocked is not None and blocked(task):
                return False
            if avoid is not None and avoid(task, worker):  # type: ignore[arg-type]
                return False
            if (replica is not None and replica(task)) != spare:
                return False
            return allowed is None or allowed(task)

        return gate

    def take(
        self,
        worker: bytes,
        count: int,
        slack: bool = False,
        allowed: Callable[[Task], bool] | None = None,
        spare: bool = False,
    ) -> list[tuple[Task, int]]:
        """Pop up to ``count`` queued tasks for ``worker``: the most urgent first, or with
        ``slack`` the least urgent (for a slow worker: a task the fast ones would reach last,
        so the critical chain stays on the fast ones); with ``allowed``, only tasks it
        allows (the most urgent of those first). Replicas only with ``spare`` (then only
        they)."""
        taken = []
        allowed = self._gate(allowed, spare, worker)
        for _ in range(min(count, len(self._queue))):
            if allowed is not None:
                order = sorted(range(len(self._queue)), key=lambda i: self._queue[i][:2])
                pick = next((i for i in order if allowed(self._queue[i][2])), None)
                if pick is None:
                    break
                task = self._queue.pop(pick)[2]
                heapq.heapify(self._queue)
            elif slack:
                last = max(range(len(self._queue)), key=lambda i: self._queue[i][:2])
                task = self._queue.pop(last)[2]
                heapq.heapify(self._queue)
            else:
                task = heapq.heappop(self._queue)[2]
            attempt = self.attempts.get(task.id, 0)
            self.in_flight[task.id] = (task, attempt, worker)
            taken.append((task, attempt))
        return taken

    def follow(self, task: Task, worker: bytes) -> None:
        """``task`` (a plan's ``follow``) runs on ``worker`` behind the task it reads: in flight
        there, under attempt 0, never queued."""
        self.in_flight[task.id] = (task, 0, worker)

    def _taken_back(self, task_id: int) -> bool:
        """Is ``task_id`` a follower whose input does not exist yet? Then the plan takes it
        back (``unfollow``) and it runs nowhere: True."""
        if self.unfollow is None or not self.unfollow(task_id):
            return False
        self.in_flight.pop(task_id, None)
        self.late.pop(task_id, None)
        return True

    def may_take(
        self,
        allowed: Callable[[Task], bool] | None,
        spare: bool = False,
        worker: bytes | None = None,
    ) -> bool:
        """Is a queued task one ``allowed`` allows (and not blocked; one ``worker`` may run;
        a replica only with ``spare``)?"""
        gate = self._gate(allowed, spare, worker)
        if gate is None:
            return bool(self._queue)
        return any(gate(entry[2]) for entry in self._queue)

    def runnable(self) -> int:
        """How many queued tasks may go out now (none blocked, no replica: all of them)."""
        gate = self._gate(None)
        if gate is None:
            return len(self._queue)
        return sum(1 for entry in self._queue if gate(entry[2]))

    def all_tasks(self) -> list[Task]:
        """The tasks queued, running or late."""
        tasks = [entry[2] for entry in self._queue]
        return tasks + [task for task, _, _ in (*self.in_flight.values(), *self.late.values())]

    # -- answers ---------------------------------------------------------------------------------

    def current(self, task_id: int, attempt: int) -> Task | None:
        """The task this answer is for (in flight, or a late attempt whose copy has not
        answered yet), or None if it is stale."""
        entry = self.in_flight.get(task_id)
        if entry is not None and entry[1] == attempt:
            return entry[0]
        late = self.late.get(task_id)
        if late is not None and late[1] == attempt:
            return late[0]
        return None

    def answered(self, task_id: int) -> None:
        """The task's result is in: it runs nowhere any more."""
        self.in_flight.pop(task_id, None)
        if self.late.pop(task_id, None) is not None and any(
            entry[2].id == task_id for entry in self._queue
        ):  # the late attempt won before its copy went out: the copy is not needed
            self._queue = [entry for entry in self._queue if entry[2].id != task_id]
            heapq.heapify(self._queue)

    def requeue(self, task_id: int, attempt: int | None = None) -> None:
        """Run the task again (next attempt). With ``attempt``, only if that attempt is the
        one in flight: a failed late attempt just stops counting, its copy goes on."""
        if attempt is not None and self.in_flight.get(task_id, (None, attempt))[1] != attempt:
            late = self.late.get(task_id)
            if late is not None and late[1] == attempt:
                del self.late[task_id]
            return
        if self._taken_back(task_id):  # (a follower: readied again once its input exists)
            return
        entry = self.in_flight.pop(task_id, None)
        if entry is None:
            return
        self.attempts[task_id] = entry[1] + 1
        self.retries += 1
        self.push(entry[0])

    def speculate(self, task_id: int) -> None:
        """The task is late: queue a copy with the next attempt, and keep accepting the late
        attempt until either answers."""
        entry = self.in_flight.get(task_id)
        if entry is None or self._taken_back(task_id):  # (a follower: no copy, taken back)
            return
        self.requeue(task_id)
        self.late[task_id] = entry

    def again(self, task: Task) -> None:
        """Run ``task`` once more, under the next attempt (an answer to an earlier one is
        stale): its answer was outvoted, or computed from a wrong input. A follower whose input
        does not exist yet is taken back instead."""
        if self._taken_back(task.id):
            return
        self.cancel(task.id)
        self.attempts[task.id] = self.attempts.get(task.id, 0) + 1
        self.push(task)

    def cancel(self, task_id: int) -> None:
        """Forget ``task_id`` wherever it is (queued, running, late): an answer is stale."""
        self._queue = [entry for entry in self._queue if entry[2].id != task_id]
        heapq.heapify(self._queue)
        entry = self.in_flight.pop(task_id, None) or self.late.pop(task_id, None)
        self.late.pop(task_id, None)
        if entry is not None:
            self.attempts[task_id] = entry[1] + 1

    def redo(self, reads_wrong: Callable[[Task], bool]) -> None:
        """The running and late tasks ``reads_wrong`` names read a wrong input: they run again
        (their answers are stale)."""
        running = [entry[0] for entry in (*self.in_flight.values(), *self.late.values())]
        for task in running:
            if reads_wrong(task):
                self.again(task)

    def worker_lost(self, identity: bytes) -> None:
        """The worker will not answer: its tasks run again (next attempt)."""
        for task_id in [t for t, (_, _, w) in self.in_flight.items() if w == identity]:
            self.requeue(task_id)
        for task_id in [t for t, (_, _, w) in self.late.items() if w == identity]:
            del self.late[task_id]  # it will not answer: its copy is queued or running

    def tensors(self) -> list[torch.Tensor]:
        """The input tensors of the tasks queued, running or late (a name is not one)."""
        tasks = [entry[2] for entry in self._queue]
        tasks += [task for task, _, _ in (*self.in_flight.values(), *self.late.values())]
        return [task.latent for task in tasks if isinstance(task.latent, torch.Tensor)]
