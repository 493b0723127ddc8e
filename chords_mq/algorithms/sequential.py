"""The sequential baseline as a plan: one core, one task per step, one hit at round N."""

from __future__ import annotations

import torch

from chords_mq.algorithms.base import Hit, Results, Task, TaskLedger, check_latent


class SequentialPlan(TaskLedger):
    """Plain sampling ``x_{i+1} = S(x_i, f(x_i, i), i, i + 1)``: what CHORDS' core 1 must equal.

    Each task's one target is the next step; the plan only passes the result on.
    """

    def __init__(self, x0: torch.Tensor, steps: int) -> None:
        super().__init__(steps, stop=None)
        self._emit(core=1, step=0, round_=1, latent=check_latent(x0), targets=(1,))

    def _follower(self, task: Task) -> tuple[int, int, tuple[int, ...]] | None:
        step = task.step + 1
        return (1, step, (step + 1,)) if step < self.steps else None

    def _on_results(self, task: Task, results: Results) -> list[Hit]:
        step = task.step
        latent = results[step + 1]
        if step + 1 < self.steps:
            if not self._followed_by(task.id):
                self._emit(1, step + 1, task.round + 1, latent, targets=(step + 2,))
            return []
        hit = Hit(core=1, round=task.round, latent=latent)
        self._publish(hit, closes_round=True, last=True)
        return [hit]
