"""Recovery by lineage: what the broker re-runs when a worker is lost with results a request
still needs (``RequestSession.recover``, on the data plane).

``Directory.worker_lost`` names the lost results still needed; ``recovery_plan`` turns them into
the producer tasks to run again, each with its recorded input, recursively through results no
live worker holds, down to results held somewhere or the initial latent (``X0``), parents first
and none twice. A replay is the same evaluation on the same input bits, so its results are the
lost ones bit for bit; they re-enter the directory and never go back to the plan, which has
consumed them already. A request whose recovery would pass its bound fails with a typed error
(the failure table's ``RECOVERY_TOO_LARGE``); with no capable worker left it waits and fails as
today (``NO_WORKER``). Pure and sans-I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chords_mq.algorithms.base import Ref
from chords_mq.broker.directory import Directory, Initial, Lineage, out_of_place
from chords_mq.broker.failures import Failure
from chords_mq.broker.session import MAX_REPLAYS
from chords_mq.errors import ChordsError, PlanProtocolError

# The most tasks one request may run again over all its recoveries: past it, losing workers
# costs more than the request is worth, and the broker says so rather than grind on.
DEFAULT_MAX_REPLAYS = MAX_REPLAYS


class RecoveryFailed(ChordsError, RuntimeError):
    """Lost results cannot be recomputed now. ``failure`` is the failure table's row
    (``broker.failures.RULES``) the broker carries out for it."""

    failure: Failure

    def __init__(self, failure: Failure, text: str) -> None:
        super().__init__(text)
        self.failure = failure


class RecoveryTooLarge(RecoveryFailed):
    """Recomputing the lost results would take the request past its bound of replays."""

    def __init__(self, text: str) -> None:
        super().__init__(Failure.RECOVERY_TOO_LARGE, text)


@dataclass(frozen=True)
class RecoveryPlan:
    """The tasks to run again for ``lost``, parents first (``replays``: each its record, its
    input computed out of place), and the held results they read (``reads``), which must be
    kept until the replays have run."""

    lost: frozenset[Ref]
    replays: tuple[Lineage, ...]
    reads: frozenset[Ref]

    def __len__(self) -> int:
        return len(self.replays)

    @property
    def from_x0(self) -> bool:
        """Does a replay start from the initial latent?"""
        return any(isinstance(replay.input, Initial) for replay in self.replays)

    def needs(self) -> frozenset[Ref]:
        """Every result a replay reads, held now or made by an earlier replay: what the
        request needs (``directory.needed``) until the plan has run."""
        return frozenset(ref for replay in self.replays for ref in replay.parents())


def recovery_plan(
    directory: Directory,
    lost: Iterable[Ref],
    max_replays: int = DEFAULT_MAX_REPLAYS,
) -> RecoveryPlan:
    """The replays that recompute ``lost`` from what ``directory`` still holds.
    ``max_replays`` bounds the request's replays over all its recoveries (``Directory.replays``
    counts those run): past it, ``RecoveryTooLarge``; the search stops once past the bound.
    Who runs the replays is the dispatcher's choice: with no worker left they wait, and the
    request fails as any request without a worker does (``NO_WORKER``)."""
    budget = max_replays - directory.replays
    order: list[Lineage] = []
    reads: set[Ref] = set()
    seen: set[int] = set()  # tasks entered: each is replayed once
    wanted = frozenset(lost)
    gone = [ref for ref in wanted if ref not in directory]  # one held again needs nothing
    for root in sorted(gone, key=lambda ref: (ref.task, ref.target)):
        # depth first, iteratively: a task goes into ``order`` once all its parents are in
        stack: list[tuple[Lineage, list[Ref]]] = []
        _enter(directory, root, stack, seen, reads)
        while stack:
            if len(seen) > budget:  # every task entered is replayed
                raise RecoveryTooLarge(
                    f"recomputing {len(wanted)} lost results takes more than the "
                    f"{max(budget, 0)} replays left of the request's {max_replays}"
                )
            record, parents = stack[-1]
            if parents:
                _enter(directory, parents.pop(), stack, seen, reads)
                continue
            stack.pop()
            order.append(record)
    return RecoveryPlan(wanted, tuple(order), frozenset(reads))


def _enter(
    directory: Directory,
    ref: Ref,
    stack: list[tuple[Lineage, list[Ref]]],
    seen: set[int],
    reads: set[Ref],
) -> None:
    """Visit ``ref``: held, it is read as it is; else its producer goes on the stack, with
    the parents it still has to visit (once per task)."""
    if ref in directory:
        reads.add(ref)
        return
    record = directory.lineage(ref)
    if record is None:
        raise PlanProtocolError(f"result {ref} is held nowhere and no task recorded it")
    if record.task in seen:
        return
    seen.add(record.task)
    replay = Lineage(
        record.task, record.core, record.step, record.targets, out_of_place(record.input)
    )
    stack.append((replay, list(reversed(record.parents()))))
