"""Drive any plan in-process with a Python velocity function ``velocity(x, step) -> out``.

The in-process twin of the broker: tests, ``chords plan`` and benchmarks use it. By default it
runs synchronous rounds (every ready task, then the next wave), which is exactly the reference
round-by-round schedule; with ``seed`` it completes tasks one at a time in a random order, as an
unlucky distributed run would.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chords_mq.algorithms.base import Hit, Plan, Task
from chords_mq.errors import PlanProtocolError

Velocity = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class SimulationResult:
    """What a plan produced. ``rounds[r - 1]`` lists the ``(step, core)`` pairs run in round r."""

    hits: list[Hit]
    returned: Hit
    evaluations: int
    rounds: list[list[tuple[int, int]]]


def simulate(plan: Plan, velocity: Velocity, *, seed: int | None = None) -> SimulationResult:
    """Run ``plan`` to the end with ``velocity`` as the network.

    Rounds mode (``seed=None``): all tasks of a wave are evaluated, even if a stop rule fires
    partway, since the reference schedule runs them in the same round; ``evaluations`` then
    equals the reference code's count. Random mode: one random ready task at a time, stopping as
    soon as the plan is done.
    """
    rng = random.Random(seed) if seed is not None else None
    pending: list[Task] = []
    evaluated: list[Task] = []
    while not plan.done:
        pending.extend(plan.ready())
        if not pending:
            raise PlanProtocolError("the plan has no ready task but is not done")
        if rng is None:
            wave, pending = pending, []
        else:
            wave = [pending.pop(rng.randrange(len(pending)))]
        for task in wave:
            plan.complete(task.id, velocity(task.latent, task.step))
            evaluated.append(task)
    returned = plan.returned
    if returned is None:  # pragma: no cover - done implies returned
        raise PlanProtocolError("the plan is done but returned nothing")
    depth = max(task.round for task in evaluated)
    rounds: list[list[tuple[int, int]]] = [[] for _ in range(depth)]
    for task in evaluated:
        rounds[task.round - 1].append((task.step, task.core))
    for pairs in rounds:
        pairs.sort(key=lambda pair: pair[1])
    return SimulationResult(list(plan.hits), returned, len(evaluated), rounds)


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
