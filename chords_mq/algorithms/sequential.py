"""The sequential baseline as a plan: one core, one task per step, one hit at round N."""

from __future__ import annotations

import torch

from chords_mq.algorithms.base import Hit, Task, TaskLedger, check_latent, check_solver
from chords_mq.solvers import Solver, unit_euler


class SequentialPlan(TaskLedger):
    """Plain sampling ``x_{i+1} = S(x_i, f(x_i, i), i, i + 1)``: what CHORDS' core 1 must equal."""

    def __init__(self, x0: torch.Tensor, steps: int, solver: Solver = unit_euler) -> None:
        super().__init__(steps, stop=None)
        self._solver = check_solver(solver)
        self._emit(core=1, step=0, round_=1, latent=check_latent(x0))

    def _on_output(self, task: Task, output: torch.Tensor) -> list[Hit]:
        step = task.step
        latent = self._solver(task.latent, output, step, step + 1)
        if step + 1 < self.steps:
            self._emit(core=1, step=step + 1, round_=task.round + 1, latent=latent)
            return []
        hit = Hit(core=1, round=task.round, latent=latent)
        self._publish(hit, closes_round=True, last=True)
        return [hit]
