"""The in-process driver: rounds mode is the reference schedule, random mode any order."""

from __future__ import annotations

import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan
from chords_mq.local import ToyODE, simulate
from chords_mq.solvers import unit_euler


def test_sequential_plan_runs_n_rounds_of_one_call():
    toy = ToyODE(20, dim=8)
    result = simulate(SequentialPlan(toy.x0, 20), toy.velocity, unit_euler)
    assert result.evaluations == 20
    assert result.rounds == [[(i, 1)] for i in range(20)]
    assert [(h.core, h.round) for h in result.hits] == [(1, 20)]
    x = toy.x0
    for i in range(20):
        x = x + toy.velocity(x, i)
    assert torch.equal(result.returned.latent, x)


def test_random_order_reports_rounds_by_task_depth():
    toy = ToyODE(30, dim=8)
    waves = simulate(ChordsPlan(x0=toy.x0, steps=30, init_sequence=[0, 4, 12]), toy.velocity)
    shuffled = simulate(
        ChordsPlan(x0=toy.x0, steps=30, init_sequence=[0, 4, 12]), toy.velocity, seed=3
    )
    assert shuffled.rounds == waves.rounds
    assert shuffled.evaluations == waves.evaluations == 30 + 26 + 18


def test_velocity_sees_the_task_step():
    seen: list[int] = []

    def velocity(x: torch.Tensor, step: int) -> torch.Tensor:
        seen.append(step)
        return torch.zeros_like(x)

    simulate(ChordsPlan(x0=torch.ones(3), steps=6, init_sequence=[0, 3]), velocity)
    assert sorted(seen) == sorted([0, 1, 2, 3, 4, 5, 3, 4, 5])
