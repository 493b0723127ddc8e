"""ParaDIGMS (Shih et al., NeurIPS 2023) as a plan: sliding-window Picard iteration
(BASELINES-SPEC section 2).

The plan keeps the time-evolution buffer ``buf[0..N]`` (every slot starts as the noise ``x0``)
and a window ``[b, e)`` of at most ``W`` steps. One round evaluates the model at every window
position (one task each, so a round is a set of ready tasks that can go to ``W`` workers at
once), then re-integrates the whole window from its anchor::

    delta_i = S(buf[b+i], out_i, b+i, b+i+1) - buf[b+i]
    new_i   = buf[b] + cumsum(delta)_i

and accepts position ``i`` when ``||new_i - buf[b+1+i]||^2 / (D var_{b+1+i}) <= tau^2`` for
every sample of the batch (``D`` = elements per sample). The window slides past the first
failing position, at most ``W``: ``b' = b + min(ind + 1, W)``; the newly exposed slots start as a
copy of ``buf[e]``. The plan ends when ``b >= N`` and returns ``buf[N]`` as its single hit (core
1). The update and the test run only when the whole round is in, in window order, so the result
does not depend on the order tasks complete in.

Only ODE schedulers are supported (DDIM with eta = 0, flow-matching Euler): the pre-drawn noise of
stochastic schedulers is not needed. The tolerance scale ``var_j`` is the scheduler's noise
magnitude of the step leaving ``j``:

* DDIM: the DDPM posterior variance ``(1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``, exactly
  ``DDIMParallelScheduler._get_variance`` (so round counts match diffusers' pipeline);
* flow matching and Euler grids (no reference exists): ``var_j = (sigma_j - sigma_{j+1})^2``, the
  squared size of step ``j``. A position is accepted when its RMS change is below ``tau`` times one
  step's sigma change, a scale that does not depend on N or on where the step sits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chords_mq.algorithms.base import (
    Hit,
    Latent,
    Results,
    Task,
    TaskLedger,
    as_tensor,
    check_latent,
    reusable,
)
from chords_mq.errors import InvalidPlanConfig
from chords_mq.solvers import (
    DDIMCogVideoX,
    EulerDiscrete,
    FlowMatchEuler,
    GridEuler,
    Solver,
    _DDIMGrid,
    unit_euler,
)

DEFAULT_TOLERANCE = 0.1  # the reference code's default (a ratio of the noise magnitude)
_SPENT = torch.empty(0)  # what a buffer slot below the window holds: it is never read again


def step_variance(solver: Solver, steps: int) -> list[float]:
    """``var_j`` for j = 0..N-1: the tolerance scale of each step (see the module docstring)."""
    if isinstance(solver, _DDIMGrid) and not isinstance(solver, DDIMCogVideoX):
        out = []
        for j in range(steps):
            t = solver.timesteps[j]
            prev = t - solver.stride
            alpha_t = float(solver.alphas_cumprod[t])
            alpha_prev = (
                float(solver.alphas_cumprod[prev])
                if prev >= 0
                else float(solver.final_alpha_cumprod)
            )
            out.append((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        return out
    if isinstance(solver, DDIMCogVideoX):
        raise InvalidPlanConfig("ParaDIGMS has no tolerance scale for CogVideoX's DDIM form")
    if isinstance(solver, FlowMatchEuler | EulerDiscrete):
        grid = [float(s) for s in solver.sigmas]
    elif isinstance(solver, GridEuler):
        grid = list(solver.grid)
    elif solver is unit_euler:
        grid = [float(j) for j in range(steps + 1)]
    else:
        name = getattr(solver, "__name__", type(solver).__name__)
        raise InvalidPlanConfig(f"ParaDIGMS: no tolerance scale for the solver {name} yet")
    if len(grid) < steps + 1:
        raise InvalidPlanConfig(f"the solver's grid has {len(grid)} points for {steps} steps")
    return [(grid[j] - grid[j + 1]) ** 2 for j in range(steps)]


@dataclass(frozen=True)
class Window:
    """One ParaDIGMS round: window ``[begin, end)``, and the slide it earned."""

    round: int
    begin: int
    end: int
    accepted: int  # positions that passed the test before the first failure (``ind``)
    slide: int


class ParadigmsPlan(TaskLedger):
    """Sliding-window Picard iteration with window ``window`` (W = K in the CHORDS paper)."""

    def __init__(
        self,
        x0: torch.Tensor,
        steps: int,
        window: int,
        tolerance: float = DEFAULT_TOLERANCE,
        variance: Sequence[float] | None = None,
    ) -> None:
        """``variance[j]`` is the tolerance scale of step j (``step_variance`` of the solver the
        tasks are evaluated with); by default that of unit-index Euler."""
        super().__init__(steps, stop=None)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidPlanConfig(f"window must be an integer >= 1, got {window!r}")
        tolerance = float(tolerance)
        if not math.isfinite(tolerance) or tolerance < 0:
            raise InvalidPlanConfig(f"tolerance must be a number >= 0, got {tolerance}")
        var = list(step_variance(unit_euler, steps) if variance is None else variance)
        if len(var) != steps or any(not (math.isfinite(v) and v >= 0) for v in var):
            raise InvalidPlanConfig(f"variance needs {steps} finite values >= 0")
        self.window = min(window, steps)
        self.tolerance = tolerance
        # inv[j] = 1 / var_j for slot j's test, inv[N] = inf (the output slot is never confirmed)
        self._inv = [math.inf if v == 0 else 1.0 / v for v in var] + [math.inf]
        x0 = check_latent(x0)
        self._per_sample = x0[0].numel() if x0.dim() >= 2 else x0.numel()
        self._samples = x0.shape[0] if x0.dim() >= 2 else 1
        self._buf: list[torch.Tensor] = [x0] * (steps + 1)
        self._begin, self._end = 0, self.window
        self._dead = 0  # slots below this index hold _SPENT
        self._round = 0
        self._deltas: dict[int, torch.Tensor] = {}  # step -> S(x, out) - x, this round
        self.windows: list[Window] = []
        self._launch()

    @property
    def rounds(self) -> int:
        """Rounds started so far (all of them once the plan is done)."""
        return self._round

    def _launch(self) -> None:
        self._round += 1
        self._deltas = {}
        for position, step in enumerate(range(self._begin, self._end)):
            self._emit(position + 1, step, self._round, self._buf[step], targets=(step + 1,))

    def _stored(self) -> list[Latent]:
        return [*(t for t in self._buf if t is not _SPENT), *self._deltas.values()]

    def _release(self) -> None:
        self._buf, self._deltas = [], {}

    def _on_results(self, task: Task, results: Results) -> list[Hit]:
        # Each position's drift needs only its own result: compute it now, off the barrier.
        # (It reads values to decide, so it is fed tensors: see ``base``.)
        step, stepped, latent = task.step, as_tensor(results[task.step + 1]), as_tensor(task.latent)
        if reusable(stepped, latent):
            self._deltas[step] = stepped.sub_(latent)
        else:
            self._deltas[step] = stepped - latent
        if len(self._deltas) < self._end - self._begin:
            return []
        return self._slide()

    def _failing(self, new: torch.Tensor, slot: int) -> bool:
        old = self._buf[slot]
        diff = (new - old).reshape(self._samples, -1)
        error = torch.linalg.vector_norm(diff, dim=-1).double().pow(2)
        inv = self._inv[slot]
        if math.isinf(inv):
            return bool((error > 0).any())
        return bool((error * (inv / self._per_sample) > self.tolerance**2).any())

    def _slide(self) -> list[Hit]:
        b, e, buf = self._begin, self._end, self._buf
        # window order, whatever the arrival; each new value gets its own memory (views of one
        # stacked tensor would keep the whole window alive for as long as any slot is read)
        stacked = torch.stack([self._deltas[j] for j in range(b, e)])
        self._deltas = {}
        sums = torch.cumsum(stacked, dim=0)
        del stacked
        new = [buf[b] + row for row in sums]  # the same bits as buf[b][None] + sums
        del sums
        length = e - b
        ind = next((i for i in range(length) if self._failing(new[i], b + 1 + i)), length)
        slide = min(ind + 1, self.window)
        begin = b + slide
        end = min(begin + self.window, self.steps)
        for i in range(length):
            buf[b + 1 + i] = new[i]
        for slot in range(e + 1, end + 1):
            buf[slot] = buf[e]
        self.windows.append(Window(self._round, b, e, ind, slide))
        if begin >= self.steps:
            hit = Hit(core=1, round=self._round, latent=buf[self.steps])
            self._publish(hit, closes_round=True, last=True)
            self._buf = []
            return [hit]
        self._begin, self._end = begin, end
        # slots below the new anchor are never read again: let their latents go
        for slot in range(self._dead, begin):
            buf[slot] = _SPENT
        self._dead = begin
        self._launch()
        return []
