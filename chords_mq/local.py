"""Drive any plan in-process: the in-process twin of the broker and its workers.

A task is evaluated the way a worker evaluates it: ``v = velocity(x, step)``, then the solver
results ``S(x, v, step, j)`` for each of the task's targets (``solvers.solve_targets``), and the
plan gets only those. Tests, ``chords plan`` and benchmarks use it. By default it runs
synchronous rounds (every ready task, then the next wave), which is exactly the reference
round-by-round schedule; with ``seed`` it completes tasks one at a time in a random order, as an
unlucky distributed run would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from chords_mq.algorithms.base import Hit, Plan, Task, as_tensor
from chords_mq.errors import PlanProtocolError
from chords_mq.solvers import Solver, solve_targets, unit_euler

Velocity = Callable[[torch.Tensor, int], torch.Tensor]
# One task's evaluation: (latent, step, targets) -> {target: S(x, f(x, step), step, target)}
Evaluate = Callable[[torch.Tensor, int, tuple[int, ...]], Mapping[int, torch.Tensor]]


@dataclass(frozen=True)
class SimulationResult:
    """What a plan produced. ``rounds[r - 1]`` lists the ``(step, core)`` pairs run in round r.

    ``peak_latents`` is the most latents the plan held at once (``Plan.retained_latents``)."""

    hits: list[Hit]
    returned: Hit
    evaluations: int
    rounds: list[list[tuple[int, int]]]
    peak_latents: int = 0


def evaluator(velocity: Velocity, solver: Solver = unit_euler) -> Evaluate:
    """A worker's evaluation in-process: the velocity, then the solver at every target."""

    def evaluate(x: torch.Tensor, step: int, targets: tuple[int, ...]) -> dict[int, torch.Tensor]:
        return solve_targets(solver, x, velocity(x, step), step, targets)

    return evaluate


def simulate(
    plan: Plan,
    velocity: Velocity,
    solver: Solver = unit_euler,
    *,
    seed: int | None = None,
) -> SimulationResult:
    """Run ``plan`` to the end with ``velocity`` as the network and ``solver`` next to it."""
    return run_tasks(plan, evaluator(velocity, solver), seed=seed)


def run_tasks(plan: Plan, evaluate: Evaluate, *, seed: int | None = None) -> SimulationResult:
    """Run ``plan`` to the end, each task evaluated by ``evaluate``.

    Rounds mode (``seed=None``): all tasks of a wave are evaluated, even if a stop rule fires
    partway, since the reference schedule runs them in the same round; ``evaluations`` then
    equals the reference code's count. Random mode: one random ready task at a time, stopping as
    soon as the plan is done.
    """
    rng = random.Random(seed) if seed is not None else None
    pending: list[Task] = []
    evaluated: list[Task] = []
    hits: list[Hit] = []
    peak = 0
    while not plan.done:
        pending.extend(plan.ready())
        peak = max(peak, plan.retained_latents())
        if not pending:
            raise PlanProtocolError("the plan has no ready task but is not done")
        if rng is None:
            wave, pending = pending, []
        else:
            wave = [pending.pop(rng.randrange(len(pending)))]
        for task in wave:
            results = evaluate(as_tensor(task.latent), task.step, task.targets)
            hits.extend(plan.complete(task.id, results))
            evaluated.append(task)
            peak = max(peak, plan.retained_latents())
    returned = plan.returned
    if returned is None:  # pragma: no cover - done implies returned
        raise PlanProtocolError("the plan is done but returned nothing")
    depth = max(task.round for task in evaluated)
    rounds: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
    for task in evaluated:
        rounds[task.round - 1].append((task.step, task.core))
    for pairs in rounds:
        pairs.sort(key=lambda pair: pair[1])
    return SimulationResult(hits, returned, len(evaluated), rounds, peak)


class ToyODE:
    """A smooth nonlinear toy ODE, ``f(x, i) = tanh(2x) (1 - i/N) - 0.3 x`` on a random x0.

    Used by ``chords plan`` to evaluate data-dependent stop rules (residual) and by tests.
    """

    def __init__(
        self, steps: int, dim: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64
    ) -> None:
        self.steps = steps
        generator = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype)

    def velocity(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return torch.tanh(2 * x) * (1 - step / self.steps) - 0.3 * x
