"""SRDS (Selvam et al., NeurIPS 2024): Parareal over blocks of the solver grid
(BASELINES-SPEC section 3), in two forms.

**The Parareal iteration** (``SrdsPlan``, method ``srds-parareal``). The N steps are split into
``B = floor(sqrt(N))`` blocks with boundaries ``0 = b_0 < ... < b_B = N``; the lengths differ by
at most one, the longer blocks last (N = 50: ``[7, 7, 7, 7, 7, 7, 8]``). ``F_i`` is the fine
solve of block i (``L_i`` ordinary steps), ``G_i`` one solver jump ``b_i -> b_{i+1}`` with the
model output at ``b_i``, which is the first evaluation of ``F_i`` from the same point, so the
coarse solve never costs an extra evaluation. Iterates::

    x_0^p = x0,   x_{i+1}^0 = G_i(x_i^0)
    x_{i+1}^p = F_i(x_i^{p-1}) + G_i(x_i^p) - G_i(x_i^{p-1})     (i >= p, p >= 1)
    x_p^p     = F_{p-1}(x_{p-1}^{p-1})                           (the corrections cancel)

so ``x_B^B`` is plain sequential sampling, bit for bit. It runs pipelined: every evaluation is a
task as soon as its input exists, so iterate p+1 starts while p is still sweeping. The iterates
``x_B^p`` are the hits: p = 0 (the pure coarse sweep) is core 0, iterate p is "core" p. The plan
stops at iteration ``iterations`` (default B, exact) or earlier when the stop rule (for example
``residual:TAU`` on consecutive iterates) says so.

The evaluation graph does not depend on the data, so each task's round is fixed up front by
greedy list scheduling of the graph on ``workers`` workers (earliest possible round first,
then lower iteration, then lower block): ``Task.round`` is the synchronous round it runs in on
that pool, and a hit's round is the round its last evaluation ran in. With unlimited workers
and N = B^2 the iterate p lands at round ``(p + 1) B - p``.

**The CHORDS preset** (method ``srds``): CHORDS with the uniform init sequence ``[0, B, 2B, ...,
(K-1)B]`` and the residual stop. Core k then equals the Parareal iterate ``x_B^{B-k+1}``, which
is how the CHORDS paper ran "pipelined SRDS" for its tables. ``srds_init_sequence`` builds it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from chords_mq.algorithms.base import (
    Hit,
    Latent,
    Results,
    StopRule,
    Task,
    TaskLedger,
    Value,
    check_latent,
    parareal,
)
from chords_mq.errors import InvalidPlanConfig

Eval = tuple[int, int, int]  # (iteration q, block i, offset s): s-th step of F_i from x_i^q


def srds_blocks(steps: int, blocks: int | None = None) -> list[int]:
    """Block boundaries ``[b_0 = 0, ..., b_B = N]``: B = floor(sqrt(N)) blocks by default,
    lengths as even as possible, the longer ones last."""
    count = math.isqrt(steps) if blocks is None else blocks
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= steps:
        raise InvalidPlanConfig(f"blocks must be an integer in 1..{steps}, got {blocks!r}")
    base, extra = divmod(steps, count)
    lengths = [base] * (count - extra) + [base + 1] * extra
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return bounds


def srds_init_sequence(cores: int, steps: int) -> list[int]:
    """The CHORDS preset for pipelined SRDS: ``[0, B, 2B, ..., (K-1)B]`` with B = floor(sqrt(N))."""
    spacing = math.isqrt(steps)
    sequence = [k * spacing for k in range(cores)]
    if sequence[-1] >= steps:
        raise InvalidPlanConfig(
            f"SRDS with {cores} cores needs (K-1) * floor(sqrt(N)) < N, "
            f"but {sequence[-1]} >= {steps}; use fewer cores or more steps"
        )
    return sequence


def srds_schedule(
    bounds: Sequence[int], iterations: int, workers: int | None
) -> tuple[dict[Eval, int], dict[int, int]]:
    """The round of every evaluation, and of every iterate ``x_B^p`` (p = 0..iterations).

    Greedy list scheduling on ``workers`` workers (None: unlimited): each round runs the ready
    evaluations with the earliest as-soon-as-possible round first, then lower iteration, then
    lower block. With unlimited workers every evaluation runs at its as-soon-as-possible round.
    """
    blocks = len(bounds) - 1
    length = [bounds[i + 1] - bounds[i] for i in range(blocks)]
    deps: dict[Eval, list[Eval]] = {}
    boundary: dict[tuple[int, int], list[Eval]] = {}  # (i, p) -> evaluations x_i^p needs

    def boundary_deps(i: int, p: int) -> list[Eval]:
        if i == 0:
            return []
        if p == 0:
            return [(0, i - 1, 0)]
        if i <= p:  # converged: x_i^p is x_i^i = F_{i-1}(x_{i-1}^{i-1})
            return [(i - 1, i - 1, length[i - 1] - 1)]
        return [(p - 1, i - 1, length[i - 1] - 1), (p, i - 1, 0)]

    for q in range(iterations + 1):
        for i in range(q if q > 0 else 0, blocks):
            fine = length[i] if q < iterations else 1
            for s in range(fine):
                deps[(q, i, s)] = boundary_deps(i, q) if s == 0 else [(q, i, s - 1)]
    for p in range(iterations + 1):
        boundary[(blocks, p)] = boundary_deps(blocks, p)
    depth: dict[Eval, int] = {}  # the round with unlimited workers (as soon as possible)
    users: dict[Eval, list[Eval]] = {node: [] for node in deps}
    for node in sorted(deps):  # (q, i, s) order lists every dependency before its users
        depth[node] = 1 + max((depth[d] for d in deps[node]), default=0)
        for d in deps[node]:
            users[d].append(node)
    waiting = {node: len(deps[node]) for node in deps}
    ready = [(depth[node], node) for node in deps if not deps[node]]
    heapq.heapify(ready)
    rounds: dict[Eval, int] = {}
    current = 0
    while ready:
        current += 1
        count = len(ready) if workers is None else min(workers, len(ready))
        chosen = [heapq.heappop(ready)[1] for _ in range(count)]
        for node in chosen:
            rounds[node] = current
        for node in chosen:  # their users become ready for the next round
            for user in users[node]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, (depth[user], user))
    if len(rounds) != len(deps):  # pragma: no cover - the graph is acyclic
        raise AssertionError("SRDS schedule is stuck")
    hit_rounds = {p: max(rounds[d] for d in boundary[(blocks, p)]) for p in range(iterations + 1)}
    return rounds, hit_rounds


class SrdsPlan(TaskLedger):
    """Pipelined Parareal SRDS for one request (see the module docstring)."""

    def __init__(
        self,
        x0: torch.Tensor,
        steps: int,
        iterations: int | None = None,
        stop: StopRule | None = None,
        workers: int | None = None,
        blocks: int | None = None,
    ) -> None:
        super().__init__(steps, stop)
        self.bounds = srds_blocks(steps, blocks)
        self.blocks = len(self.bounds) - 1
        count = self.blocks if iterations is None else iterations
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.blocks:
            raise InvalidPlanConfig(
                f"iterations must be an integer in 1..{self.blocks} (B), got {iterations!r}"
            )
        if workers is not None and (
            isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
        ):
            raise InvalidPlanConfig(f"workers must be an integer >= 1, got {workers!r}")
        self.iterations = count
        self._rounds, self.hit_rounds = srds_schedule(self.bounds, count, workers)
        # Boundary values x_i^p that exist. Their latents live only in the tasks that start
        # from them; F and G values are kept until their last user is computed, so the plan
        # holds O(B) latents rather than the O(B x iterations) of the whole iteration table.
        self._known: set[tuple[int, int]] = set()  # (i, p): x_i^p exists
        # (i, q) -> F_i(x_i^q), and whether the plan holds it exclusively
        self._fine: dict[tuple[int, int], tuple[Value, bool]] = {}
        self._coarse: dict[tuple[int, int], Value] = {}  # (i, q) -> G_i(x_i^q)
        self._origin: dict[int, Eval] = {}  # task id -> evaluation
        self._arrived: dict[int, Hit] = {}
        self._next_hit = 0
        x0 = check_latent(x0)
        for q in range(count + 1):
            self._known.add((0, q))
            self._start_chain(0, q, x0)

    def _stored(self) -> list[Latent]:
        return [
            *(t for t, _ in self._fine.values()),
            *self._coarse.values(),
            *(h.latent for h in self._arrived.values()),
        ]

    def _release(self) -> None:
        for store in (self._known, self._fine, self._coarse, self._arrived):
            store.clear()

    def _start_chain(self, i: int, q: int, latent: Latent) -> None:
        """x_i^q exists: start the fine chain F_i from it (its first step also gives G_i)."""
        if (q, i, 0) in self._rounds:
            self._task((q, i, 0), latent)

    def _task(self, node: Eval, latent: Latent) -> None:
        q, i, s = node
        step, end = self.bounds[i] + s, self.bounds[i + 1]
        self._origin[self._next_id] = node
        # The fine step; the first step of a chain also gives the coarse jump G_i.
        targets = (step + 1, end) if s == 0 else (step + 1,)
        self._emit(q + 1, step, self._rounds[node], latent, targets)

    def _on_results(self, task: Task, results: Results) -> list[Hit]:
        q, i, s = self._origin.pop(task.id)
        step, end = task.step, self.bounds[i + 1]
        released: list[Hit] = []
        if s == 0:
            self._coarse[(i, q)] = results[end]
        fine = results[step + 1]
        if (q, i, s + 1) in self._rounds:
            self._task((q, i, s + 1), fine)
        elif step + 1 == end and q < self.iterations:
            # F_i(x_i^q), for x_{i+1}^{q+1}; held exclusively unless it is also G_i (L_i = 1)
            self._fine[(i, q)] = (fine, s > 0)
        # Which boundary values may now exist: x_{i+1}^q (coarse sweep / correction) and
        # x_{i+1}^{q+1} (the next iterate, which needs F_i(x_i^q)).
        for p in (q, q + 1):
            if p <= self.iterations:
                self._try_boundary(i + 1, p, released)
        return released

    def _try_boundary(self, i: int, p: int, released: list[Hit]) -> None:
        if (i, p) in self._known or self.done:
            return
        value: Latent
        if p == 0:
            if (i - 1, 0) not in self._coarse:
                return
            value = self._coarse[(i - 1, 0)]
        elif i <= p:
            if i != p or (i - 1, i - 1) not in self._fine:
                return  # x_i^p for i < p is x_i^i, created when p was i
            value = self._fine.pop((i - 1, i - 1))[0]  # its only user
        else:
            need = ((i - 1, p - 1), (i - 1, p))
            if need[0] not in self._fine or any(n not in self._coarse for n in need):
                return
            # Parareal: F(x^{p-1}) + G(x^p) - G(x^{p-1}), in this association
            fine, exclusive = self._fine.pop(need[0])
            value = parareal(fine, self._coarse[need[1]], self._coarse[need[0]], exclusive)
        self._known.add((i, p))
        if i == p:  # converged: x_i^{p'} = x_i^i for every later p'
            self._known.update((i, later) for later in range(p + 1, self.iterations + 1))
        for q in (p - 1, p):  # G_{i-1} values this boundary may have been the last user of
            if q >= 0:
                self._drop_spent_coarse(i - 1, q)
        if i == self.blocks:
            self._arrive(Hit(core=p, round=self.hit_rounds[p], latent=value), released)
            return
        self._start_chain(i, p, value)

    def _drop_spent_coarse(self, i: int, q: int) -> None:
        """G_i(x_i^q) is read by x_{i+1}^q and, where the Parareal update forms it, by
        x_{i+1}^{q+1}; drop it once both exist."""
        if (i, q) not in self._coarse or (i + 1, q) not in self._known:
            return
        later = q + 1
        if later <= self.iterations and i + 1 > later and (i + 1, later) not in self._known:
            return
        del self._coarse[(i, q)]

    def _arrive(self, hit: Hit, released: list[Hit]) -> None:
        """Release iterates in order p = 0, 1, ...; the stop rule sees each in turn."""
        self._arrived[hit.core] = hit
        while self._next_hit in self._arrived:
            nxt = self._arrived.pop(self._next_hit)
            self._next_hit += 1
            released.append(nxt)
            if self._publish(nxt, closes_round=True, last=nxt.core == self.iterations):
                return
