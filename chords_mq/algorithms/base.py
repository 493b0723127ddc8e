"""The Plan protocol: a sampling method as a pure dataflow state machine.

``ready()`` hands out every task whose inputs exist; ``complete(id, out)`` feeds one model output
back, in any order; hits appear in ``hits`` as they are produced. The broker, ``local.simulate``
and the benchmarks all drive plans through exactly this interface. No I/O, no asyncio, no zmq.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from chords_mq.errors import InvalidPlanConfig, PlanProtocolError
from chords_mq.solvers import Solver


@dataclass(frozen=True, eq=False)
class Task:
    """One network evaluation the plan asks for: model output of ``latent`` at ``step``.

    ``round`` is the task's depth in the task graph: 1 + the longest chain of evaluations its
    latent depends on. Under a synchronous round-by-round driver it is the round it runs in.
    """

    id: int
    core: int
    step: int
    round: int
    latent: torch.Tensor


@dataclass(frozen=True, eq=False)
class Hit:
    """A latent a core delivers at step N. Core 0 is the coarse "zero-th hit"."""

    core: int
    round: int
    latent: torch.Tensor


class StopRule(Protocol):
    """Decides, after a round's hits are appended, whether the plan stops (CHORDS-SPEC 4)."""

    def should_stop(self, hits: Sequence[Hit]) -> bool: ...


@runtime_checkable
class Plan(Protocol):
    """What every sampling method exposes to whatever drives it."""

    @property
    def steps(self) -> int: ...

    def ready(self) -> list[Task]:
        """Every task whose inputs exist and that has not been handed out yet."""
        ...

    def complete(self, task_id: int, output: torch.Tensor) -> list[Hit]:
        """Feed back one model output; returns the hits this completion released (maybe none)."""
        ...

    @property
    def hits(self) -> Sequence[Hit]: ...

    @property
    def done(self) -> bool: ...

    @property
    def returned(self) -> Hit | None:
        """The hit the plan returns: set once ``done``, else None."""
        ...


def check_latent(x0: object) -> torch.Tensor:
    """The initial latent must be a floating-point tensor (any float dtype, float64 included)."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise InvalidPlanConfig(
            f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}"
        )
    return x0


def check_solver(solver: object) -> Solver:
    if not callable(solver):
        raise InvalidPlanConfig(f"solver must be callable as S(x, out, i, j), got {solver!r}")
    return solver


class TaskLedger:
    """Bookkeeping every plan shares: task ids, the ready queue, hand-out and completion checks.

    A plan subclasses it and implements ``_on_output``; it calls ``_emit`` for new tasks and
    ``_publish`` for hits. After the plan is done, late completions of handed-out tasks are
    accepted and dropped (the broker may still have them in flight when a stop rule fires).
    """

    def __init__(self, steps: int, stop: StopRule | None) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidPlanConfig(f"steps must be an integer >= 1, got {steps!r}")
        if stop is not None and not callable(getattr(stop, "should_stop", None)):
            raise InvalidPlanConfig(f"stop must have should_stop(hits), got {stop!r}")
        self._steps = steps
        self._stop = stop
        self._next_id = 0
        self._fresh: list[Task] = []
        self._handed_out: dict[int, Task] = {}
        self._hits: list[Hit] = []
        self._returned: Hit | None = None

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def hits(self) -> Sequence[Hit]:
        return tuple(self._hits)

    @property
    def done(self) -> bool:
        return self._returned is not None

    @property
    def returned(self) -> Hit | None:
        return self._returned

    @property
    def in_flight(self) -> int:
        """Tasks handed out and not completed yet."""
        return len(self._handed_out)

    def ready(self) -> list[Task]:
        if self.done:
            return []
        tasks, self._fresh = self._fresh, []
        for task in tasks:
            self._handed_out[task.id] = task
        return tasks

    def complete(self, task_id: int, output: torch.Tensor) -> list[Hit]:
        task = self._handed_out.get(task_id)
        if task is None:
            raise PlanProtocolError(f"task {task_id} was not handed out or is already complete")
        if not isinstance(output, torch.Tensor) or output.shape != task.latent.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise PlanProtocolError(
                f"task {task_id}: output shape {got} does not match latent "
                f"shape {tuple(task.latent.shape)}"
            )
        del self._handed_out[task_id]
        if self.done:
            return []
        return self._on_output(task, output)

    def _on_output(self, task: Task, output: torch.Tensor) -> list[Hit]:
        raise NotImplementedError

    def _emit(self, core: int, step: int, round_: int, latent: torch.Tensor) -> None:
        self._fresh.append(Task(self._next_id, core, step, round_, latent))
        self._next_id += 1

    def _publish(self, hit: Hit, closes_round: bool, last: bool) -> bool:
        """Append one hit, in the spec's order. True when the plan is done.

        The stop rule runs only once a round's hits are all appended (``closes_round``), and only
        if that round had a real core hit: a round's hits are the zero-th hit (if any) and then
        real cores, so the closing hit is real exactly when the round had one. ``last`` says no
        hit will ever follow, so the plan finishes with this one.
        """
        self._hits.append(hit)
        if not closes_round:
            return False
        stop = self._stop
        if last or (hit.core > 0 and stop is not None and stop.should_stop(self._hits)):
            self._returned = hit
            self._fresh.clear()
            return True
        return False
