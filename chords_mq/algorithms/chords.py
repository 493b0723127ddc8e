"""CHORDS as a dataflow plan (CHORDS-SPEC sections 2 to 5).

Core k starts at step ``i_k`` from a coarse chain (one solver jump from core k-1's first point),
takes fine steps ``F``, and whenever core k-1 evaluates core k's anchor step ``a`` it is rectified:
``x = (F - G) + cur_G`` with ``G = S(own anchor, a -> target)`` and ``cur_G = S(core k-1 at a,
a -> target)``. In the reference code that happens "in the same round"; here it is a data
dependency, so the broker can run every task as soon as its inputs exist, in any order, and get
bit-identical hits. A task's depth in this graph equals the reference round it runs in.

Every solver jump is a *target* of the evaluation it reads: the task at ``(k, s)`` asks for the
fine step ``s + 1``, at core k's first point also the coarse init ``i_{k+1}`` (or N: the zero-th
hit), at one of core k's anchors the jump ``s + d_k`` (G), and at one of core k+1's anchors the
jump ``s + d_{k+1}`` (cur_G). The plan keeps only those results, never a model output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

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
    rectified,
)
from chords_mq.algorithms.init_sequence import validate_init_sequence
from chords_mq.algorithms.stopping import CoreIndex

Node = tuple[int, int]  # (core, anchor step)


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
    so a stop rule sees the same list whatever order tasks complete in. Results are dropped as
    soon as no later step can read them.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        steps: int,
        init_sequence: Sequence[int],
        stop: StopRule | None = None,
    ) -> None:
        super().__init__(steps, stop)
        starts = validate_init_sequence(init_sequence, steps)
        self.init_sequence: tuple[int, ...] = tuple(starts)
        self.cores = len(starts)
        self.rectifications: list[Rectification] = []
        # 1-based by core: _start[k] = i_k, _gap[k] = d_k = i_k - i_{k-1} (k >= 2).
        self._start = [0, *starts]
        self._gap = [0, 0] + [b - a for a, b in pairwise(starts)]
        # At a rectification (core k, anchor a), three results meet: G (core k's own jump from
        # a), cur_G (core k-1's jump from a, with its round) and F (core k's fine step into
        # a + d_k, with its round). Whichever arrives first waits here for the others.
        # (Each a tensor, or its name when the driver feeds names: see ``base``.)
        self._own: dict[Node, Value] = {}
        self._slower: dict[Node, tuple[Value, int]] = {}
        self._fine: dict[Node, tuple[Value, int, bool]] = {}  # + "held exclusively"
        rounds = hit_rounds(starts, steps)
        self._hit_round = rounds
        self._hit_order = sorted(rounds, key=lambda core: (rounds[core], core))
        self._next_hit = 0
        self._arrived: dict[int, Hit] = {}
        self._goal = self.goal_graph(stop)
        self._ranks = self._goal_ranks(self._goal)
        self._add_latent(1, 0, check_latent(x0), depth=0)

    # -- placement: which tasks the returned hit depends on ----------------------------------------

    def _parents(self, core: int, step: int) -> list[Node]:
        """The tasks whose results the latent of core ``core`` at ``step`` is made from."""
        if step == self._start[core]:
            return [] if core == 1 else [(core - 1, self._start[core - 1])]
        anchor = step - self._gap[core]
        if self._is_anchor(core, anchor):  # rectified: F, G and cur_G
            return [(core, step - 1), (core, anchor), (core - 1, anchor)]
        return [(core, step - 1)]

    @staticmethod
    def _goal_ranks(graph: dict[Node, list[Node]] | None) -> dict[Node, int] | None:
        """For a ``core-index:m`` stop, whose hits are known from the schedule: the upward rank
        of every task they depend on (the longest chain of evaluations from the task to one of
        them, itself included; ``goal_graph``). None for other stops: every hit may matter."""
        if graph is None:
            return None
        children: dict[Node, list[Node]] = {}
        for node, parents in graph.items():
            for parent in parents:
                children.setdefault(parent, []).append(node)
        ranks: dict[Node, int] = {}
        # steps only grow along an edge within a core, and a core's parents are the core below
        # at the same or an earlier step: (step, core) ascending is a topological order
        for node in sorted(graph, key=lambda n: (n[1], n[0]), reverse=True):
            ranks[node] = 1 + max((ranks[c] for c in children.get(node, ())), default=0)
        return ranks

    def goal_graph(self, stop: StopRule | None) -> dict[Node, list[Node]] | None:
        """For a ``core-index:m`` stop, the tasks the request's hits depend on, as (core, step)
        nodes, each with the nodes it reads (its parents); None for other stops. The request's
        hits are every hit released up to the returned one: the m-th real hit, and the hits
        of its round (a stop is checked once a round's hits are in). The dependency graph the
        broker places by (``rank``) and a placement optimum is computed on
        (``benchmarks/placement_optimum.py``)."""
        if not isinstance(stop, CoreIndex):
            return None
        real = [core for core in self._hit_order if core != 0]
        goal = real[min(max(stop.index, 1), len(real)) - 1]
        last = max(
            i for i, c in enumerate(self._hit_order) if self._hit_round[c] == self._hit_round[goal]
        )
        todo: list[Node] = []
        for core in self._hit_order[: last + 1]:
            if core == 0:  # the zero-th hit: the coarse jump of the fastest core's first task
                todo.append((self.cores, self._start[self.cores]))
            else:
                todo.extend(self._parents(core, self.steps))
        graph: dict[Node, list[Node]] = {}
        while todo:
            node = todo.pop()
            if node not in graph:
                graph[node] = self._parents(*node)
                todo.extend(graph[node])
        return graph

    def goal(self) -> dict[Node, list[Node]] | None:
        """See ``Plan.goal``: ``goal_graph`` of the plan's own stop (None unless core-index)."""
        return self._goal

    def readers(self, task: Task) -> dict[int, tuple[Node, ...]]:
        """See ``Plan.readers``: core k+1 reads two kinds of core k's results, its coarse init
        (the first task of core k+1) and each cur_G (the task of core k+1 at the rectified
        step, unless that step is a hit)."""
        core, step = task.core, task.step
        if core >= self.cores:
            return {}
        out: dict[int, tuple[Node, ...]] = {}
        if step == self._start[core]:
            out[self._coarse_target(core)] = ((core + 1, self._start[core + 1]),)
        if self._is_anchor(core + 1, step):
            target = step + self._gap[core + 1]
            if target < self.steps:
                out[target] = ((core + 1, target),)
        return out

    def rank(self, task: Task) -> int:
        if self._ranks is None:
            return 0
        return self._ranks.get((task.core, task.step), -1)

    def _stored(self) -> list[Latent]:
        return [
            *self._own.values(),
            *(t for t, _ in self._slower.values()),
            *(t for t, _, _ in self._fine.values()),
            *(h.latent for h in self._arrived.values()),
        ]

    def _release(self) -> None:
        for store in (self._own, self._slower, self._fine, self._arrived):
            store.clear()

    def _is_anchor(self, core: int, step: int) -> bool:
        """Is ``step`` an anchor of ``core``: a step where core-1's latent will rectify it?"""
        if not 2 <= core <= self.cores:
            return False
        start, gap = self._start[core], self._gap[core]
        return step >= start and (step - start) % gap == 0 and step + gap <= self.steps

    def _coarse_target(self, core: int) -> int:
        return self._start[core + 1] if core < self.cores else self.steps

    def _targets(self, core: int, step: int) -> tuple[int, ...]:
        """What core's task at ``step`` asks for (see the module's docstring), ascending."""
        targets = {step + 1}
        if step == self._start[core]:
            targets.add(self._coarse_target(core))
        if self._is_anchor(core, step):
            targets.add(step + self._gap[core])
        if self._is_anchor(core + 1, step):
            targets.add(step + self._gap[core + 1])
        return tuple(sorted(targets))

    def _add_latent(self, core: int, step: int, latent: Latent, depth: int) -> None:
        self._emit(core, step, depth + 1, latent, self._targets(core, step))

    def _follower(self, task: Task) -> tuple[int, int, tuple[int, ...]] | None:
        """Core's next step, unless it is a hit (step N) or a rectification target (it also
        reads core k-1's jump)."""
        core, step = task.core, task.step + 1
        if step >= self.steps or self._is_anchor(core, step - self._gap[core]):
            return None
        return (core, step, self._targets(core, step))

    def _on_results(self, task: Task, results: Results) -> list[Hit]:
        core, step, depth = task.core, task.step, task.round
        released: list[Hit] = []
        if step == self._start[core]:
            # The coarse chain: core's first evaluation spawns core+1 (or the zero-th hit).
            coarse = results[self._coarse_target(core)]
            if core < self.cores:
                self._add_latent(core + 1, self._start[core + 1], coarse, depth)
            else:
                self._arrive(Hit(core=0, round=depth, latent=coarse), released)
        if self.done:
            return released
        if self._is_anchor(core, step):
            self._own[(core, step)] = results[step + self._gap[core]]
        fine = results[step + 1]
        anchor = step + 1 - self._gap[core]
        if self._is_anchor(core, anchor):  # step + 1 is a rectification target of this core
            # The fine result may be rectified in place unless another role reads the same
            # target: the coarse init (i_{k+1} = step + 1), or cur_G of core k+1 (d_{k+1} = 1).
            # (G shares it when d_k = 1; it is then the same tensor, which ``rectified`` sees.)
            shared = (step == self._start[core] and self._coarse_target(core) == step + 1) or (
                self._is_anchor(core + 1, step) and self._gap[core + 1] == 1
            )
            self._fine[(core, anchor)] = (fine, depth, not shared)
            self._rectify(core, anchor, released)
        elif not self._followed_by(task.id):  # (else handed out already: a chain)
            self._next(core, step + 1, fine, depth, released)
        if self._is_anchor(core + 1, step) and not self.done:
            self._slower[(core + 1, step)] = (results[step + self._gap[core + 1]], depth)
            self._rectify(core + 1, step, released)
        return released

    def _rectify(self, core: int, anchor: int, released: list[Hit]) -> None:
        """Core's latent at anchor + d_k, once F and cur_G both exist (G always does by then)."""
        node = (core, anchor)
        if self.done or node not in self._fine or node not in self._slower:
            return
        fine, fine_depth, exclusive = self._fine.pop(node)
        slower, slower_depth = self._slower.pop(node)
        own = self._own.pop(node)
        target = anchor + self._gap[core]
        depth = max(fine_depth, slower_depth)
        self.rectifications.append(Rectification(core, depth, anchor, target))
        latent = rectified(fine, own, slower, exclusive)
        self._next(core, target, latent, depth, released)

    def _next(self, core: int, step: int, latent: Latent, depth: int, released: list[Hit]) -> None:
        if self.done:
            return
        if step == self.steps:
            self._arrive(Hit(core=core, round=depth, latent=latent), released)
        else:
            self._add_latent(core, step, latent, depth)

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
                return
