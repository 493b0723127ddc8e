"""An independent, literal transcription of CHORDS-SPEC section 2 (round-by-round).

It shares no code with chords_mq.algorithms: it keeps per-core state (current point, anchor,
last evaluation) and runs synchronous rounds exactly as the spec's pseudo-code does, so the
dataflow ChordsPlan can be checked against it hit by hit and round by round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class _Core:
    k: int
    t: int
    x: Tensor
    anchor_t: int
    anchor_x: Tensor
    anchor_v: Tensor | None = None
    eval_t: int | None = None
    eval_x: Tensor | None = None
    eval_v: Tensor | None = None


@dataclass
class ReferenceRun:
    hits: list[tuple[int, int, Tensor]] = field(default_factory=list)  # (core, round, latent)
    calls: list[list[tuple[int, int]]] = field(default_factory=list)  # per round: (step, core)
    rectifications: list[tuple[int, int, int, int]] = field(default_factory=list)
    stopped_round: int | None = None


def run_reference(
    x0: Tensor,
    steps: int,
    init: list[int],
    solver: Callable[[Tensor, Tensor, int, int], Tensor],
    f: Callable[[Tensor, int], Tensor],
    stop: Callable[[list[tuple[int, int, Tensor]]], bool] | None = None,
) -> ReferenceRun:
    n, big_k = steps, len(init)
    run = ReferenceRun()
    alive = [_Core(k=1, t=0, x=x0, anchor_t=0, anchor_x=x0)]
    spawned = 1
    r = 0
    while alive:
        r += 1
        # (1) every alive core evaluates its current point
        for c in alive:
            v = f(c.x, c.t)
            c.eval_t, c.eval_x, c.eval_v = c.t, c.x, v
            if c.t == c.anchor_t:
                c.anchor_v = v
        run.calls.append([(c.t, c.k) for c in alive])
        by_k = {c.k: c for c in alive}
        # (2) advance
        newborn = []
        for c in alive:
            if c.k == spawned and c.eval_t == init[c.k - 1]:
                if c.k < big_k:
                    nxt = init[c.k]
                    x = solver(c.eval_x, c.eval_v, c.eval_t, nxt)
                    newborn.append(_Core(k=c.k + 1, t=nxt, x=x, anchor_t=nxt, anchor_x=x))
                else:
                    run.hits.append((0, r, solver(c.eval_x, c.eval_v, c.eval_t, n)))
            target = c.eval_t + 1
            x_new = solver(c.eval_x, c.eval_v, c.eval_t, target)
            below = by_k.get(c.k - 1)
            if c.k >= 2 and below is not None and below.eval_t == c.anchor_t:
                x_new = (
                    x_new
                    - solver(c.anchor_x, c.anchor_v, c.anchor_t, target)
                    + solver(below.eval_x, below.eval_v, c.anchor_t, target)
                )
                run.rectifications.append((c.k, r, c.anchor_t, target))
                c.anchor_t, c.anchor_x, c.anchor_v = target, x_new, None
            c.t, c.x = target, x_new
        alive.extend(newborn)
        spawned += len(newborn)
        # (3) hits, ascending k
        finished = [c for c in alive if c.t == n]
        for c in finished:
            run.hits.append((c.k, r, c.x))
        alive = [c for c in alive if c.t != n]
        # (4) stop rule, only in a round with a real hit
        if finished and stop is not None and stop(run.hits):
            run.stopped_round = r
            break
    return run
