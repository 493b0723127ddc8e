"""CHORDS as a dataflow plan (CHORDS-SPEC sections 2 to 5).

Core k starts at step ``i_k`` from a coarse chain (one solver jump from core k-1's first point),
takes fine steps ``F``, and whenever core k-1 evaluates core k's anchor step ``a`` it is rectified:
``x = (F - G) + cur_G`` with ``G = S(own anchor, a -> target)`` and ``cur_G = S(core k-1 at a,
a -> target)``. In the reference code that happens "in the same round"; here it is a data
dependency, so the broker can run every task as soon as its inputs exist, in any order, and get
bit-identical hits. A task's depth in this graph equals the reference round it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from chords_mq.algorithms.base import (
    Hit,
    StopRule,
    Task,
    TaskLedger,
    check_latent,
    check_solver,
)
from chords_mq.algorithms.init_sequence import validate_init_sequence
from chords_mq.solvers import Solver, unit_euler

Node = tuple[int, int]  # (core, step): core's latent at step, and later its model output there


@dataclass(frozen=True)
class Rectification:
    """Core ``core`` was rectified in ``round`` from anchor step ``anchor`` to step ``target``."""

    core: int
    round: int
    anchor: int
    target: int


def hit_rounds(init_sequence: Sequence[int], steps: int) -> dict[int, int]:
    """Round of every hit, by core (0 = zero-th): ``N - i_k + k - 1``; the zero-th at round K."""
    cores = len(init_sequence)
    rounds = {0: cores}
    for k, start in enumerate(init_sequence, start=1):
        rounds[k] = steps - start + k - 1
    return rounds


class ChordsPlan(TaskLedger):
    """The CHORDS schedule for one request.

    Hits are released in the spec's order (zero-th first, then by round, ties by ascending core),
    so a stop rule sees the same list whatever order tasks complete in. Latents and outputs are
    dropped as soon as no later step can read them.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        steps: int,
        init_sequence: Sequence[int],
        solver: Solver = unit_euler,
        stop: StopRule | None = None,
    ) -> None:
        super().__init__(steps, stop)
        starts = validate_init_sequence(init_sequence, steps)
        self.init_sequence: tuple[int, ...] = tuple(starts)
        self.cores = len(starts)
        self.rectifications: list[Rectification] = []
        self._solver = check_solver(solver)
        # 1-based by core: _start[k] = i_k, _gap[k] = d_k = i_k - i_{k-1} (k >= 2).
        self._start = [0, *starts]
        self._gap = [0, 0] + [b - a for a, b in pairwise(starts)]
        self._latent: dict[Node, torch.Tensor] = {}
        self._output: dict[Node, torch.Tensor] = {}
        self._round: dict[Node, int] = {}  # round of the evaluation at this node
        self._uses: dict[Node, int] = {}  # reads still to come of this node's latent and output
        rounds = hit_rounds(starts, steps)
        self._hit_round = rounds
        self._hit_order = sorted(rounds, key=lambda core: (rounds[core], core))
        self._next_hit = 0
        self._arrived: dict[int, Hit] = {}
        self._add_latent(1, 0, check_latent(x0), depth=0)

    @property
    def retained_nodes(self) -> int:
        """How many (core, step) latents the plan still holds for later steps (memory use)."""
        return len(self._latent)

    def _is_anchor(self, core: int, step: int) -> bool:
        """Is ``step`` an anchor of ``core``: a step where core-1's latent will rectify it?"""
        if not 2 <= core <= self.cores:
            return False
        start, gap = self._start[core], self._gap[core]
        return step >= start and (step - start) % gap == 0 and step + gap <= self.steps

    def _add_latent(self, core: int, step: int, latent: torch.Tensor, depth: int) -> None:
        node = (core, step)
        self._latent[node] = latent
        self._round[node] = depth + 1
        # Read by: the next fine step; its own rectification later if it is an anchor; and
        # core+1's rectification if it sits at one of core+1's anchors.
        self._uses[node] = 1 + self._is_anchor(core, step) + self._is_anchor(core + 1, step)
        self._emit(core, step, depth + 1, latent)

    def _use(self, node: Node) -> None:
        self._uses[node] -= 1
        if self._uses[node] == 0:
            for store in (self._latent, self._output, self._round, self._uses):
                del store[node]

    def _on_output(self, task: Task, output: torch.Tensor) -> list[Hit]:
        core, step = task.core, task.step
        self._output[(core, step)] = output
        released: list[Hit] = []
        if step == self._start[core]:
            # The coarse chain: core's first evaluation spawns core+1 (or the zero-th hit).
            nxt = self._start[core + 1] if core < self.cores else self.steps
            coarse = self._solver(task.latent, output, step, nxt)
            if core < self.cores:
                self._add_latent(core + 1, nxt, coarse, depth=task.round)
            else:
                self._arrive(Hit(core=0, round=task.round, latent=coarse), released)
        self._advance(core, step, released)
        if self._is_anchor(core + 1, step) and not self.done:
            self._advance(core + 1, step + self._gap[core + 1] - 1, released)
        return released

    def _advance(self, core: int, step: int, released: list[Hit]) -> None:
        """Make core's latent at step+1 once its inputs exist (the output at step, and at a
        rectification target also core-1's output at the anchor)."""
        node = (core, step)
        if node not in self._output or self.done:
            return
        solve = self._solver
        target = step + 1
        anchor = target - self._gap[core]
        depth = self._round[node]
        rectify = self._is_anchor(core, anchor)
        slower, own = (core - 1, anchor), (core, anchor)
        if rectify and slower not in self._output:
            return  # core-1 has not evaluated the anchor yet; its completion calls us again
        fine = solve(self._latent[node], self._output[node], step, target)
        if rectify:
            coarse_own = solve(self._latent[own], self._output[own], anchor, target)
            coarse_slower = solve(self._latent[slower], self._output[slower], anchor, target)
            latent = (fine - coarse_own) + coarse_slower  # the reference code's association
            depth = max(depth, self._round[slower])
            self.rectifications.append(Rectification(core, depth, anchor, target))
            self._use(own)
            self._use(slower)
        else:
            latent = fine
        self._use(node)
        if target == self.steps:
            self._arrive(Hit(core=core, round=depth, latent=latent), released)
        else:
            self._add_latent(core, target, latent, depth)

    def _arrive(self, hit: Hit, released: list[Hit]) -> None:
        """Publish hits in the spec's order, closing a round when its last hit is in."""
        if hit.round != self._hit_round[hit.core]:
            raise AssertionError(
                f"core {hit.core} hit at round {hit.round}, expected {self._hit_round[hit.core]}"
            )
        self._arrived[hit.core] = hit
        order = self._hit_order
        while self._next_hit < len(order) and order[self._next_hit] in self._arrived:
            core = order[self._next_hit]
            self._next_hit += 1
            last = self._next_hit == len(order)
            closes = last or self._hit_round[order[self._next_hit]] != self._hit_round[core]
            nxt = self._arrived.pop(core)
            released.append(nxt)
            if self._publish(nxt, closes_round=closes, last=last):
                for store in (self._latent, self._output, self._round, self._uses, self._arrived):
                    store.clear()
                return
