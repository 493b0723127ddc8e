"""Proposition 2.1, numerically: rectification shrinks a core's error faster than the step.

Core 2 starts at step d from one coarse Euler jump, so before its first rectification (at step
2d) its error against the sequential solve is O(delta^2), delta = d/N. Rectification replaces
it by (F - G)(x~) - (F - G)(x), and F - G is O(delta^2) with an O(delta^2) derivative, so the
error after is O(delta^4). Measured here (N = 1024, d = 8..128; and d = 4, N = 64..512):
order before = 2.0, order after = 3.7 to 4.2.
"""

from __future__ import annotations

import math

import pytest
import torch

from chords_mq.algorithms import ChordsPlan
from chords_mq.solvers import grid_euler, solve_targets


def errors_around_first_rectification(steps: int, d: int) -> tuple[float, float]:
    x0 = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(x: torch.Tensor, i: int) -> torch.Tensor:
        return torch.tanh(2 * x) * (1 - i / steps) - 0.3 * x

    solver = grid_euler([i / steps for i in range(steps + 1)])
    plan = ChordsPlan(x0=x0, steps=steps, init_sequence=[0, d])
    sequential: dict[int, torch.Tensor] = {}
    rectified = None
    while rectified is None or 2 * d not in sequential:
        for task in plan.ready():
            if task.core == 1:
                sequential[task.step] = task.latent
            elif task.step == 2 * d:
                rectified = task.latent  # core 2's latent right after its first rectification
            out = f(task.latent, task.step)
            plan.complete(task.id, solve_targets(solver, task.latent, out, task.step, task.targets))
    assert [(r.core, r.anchor, r.target) for r in plan.rectifications[:1]] == [(2, d, 2 * d)]
    # The same core without rectification: its coarse start, then d fine steps.
    unrectified = solver(x0, f(x0, 0), 0, d)
    for i in range(d, 2 * d):
        unrectified = solver(unrectified, f(unrectified, i), i, i + 1)
    truth = sequential[2 * d]
    return float((unrectified - truth).norm()), float((rectified - truth).norm())


def fitted_order(sizes: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(step size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize(
    ("cases", "label"),
    [
        ([(1024, d) for d in (8, 16, 32, 64, 128)], "block shrinks on a fixed fine grid"),
        ([(n, 4) for n in (64, 128, 256, 512)], "grid and block shrink together"),
    ],
)
def test_error_after_rectification_shrinks_faster_than_before(cases, label):
    deltas, before, after = [], [], []
    for steps, d in cases:
        b, a = errors_around_first_rectification(steps, d)
        deltas.append(d / steps)
        before.append(b)
        after.append(a)
        assert a < b, f"{label}: rectification must reduce the error (N={steps}, d={d})"
    order_before, order_after = fitted_order(deltas, before), fitted_order(deltas, after)
    assert order_before == pytest.approx(2.0, abs=0.2), (label, order_before)
    assert order_after > 3.4, (label, order_after)
    assert order_after - order_before > 1.4, (label, order_before, order_after)
