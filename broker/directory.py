"""Where a request's results are, by name: the broker's side of the data plane
(``RequestSession.directory``; with ``--no-data-plane``, ``broker.results.ResultStore`` holds the
tensors instead).

Results stay on the workers that computed them, and the broker keeps only this: for each
``Ref``, the workers holding it, and for each task the record of how its results were made
(``Lineage``: the task, its step, core, targets and its input, a ``Ref``, an operation over
``Ref``s, or the initial latent ``X0``). From that it tells who holds what, what may be let go
(no plan name and no queued or running task's input needs it), the bytes each worker holds, and,
when a worker is lost, which of the results it held the request still needs. Lineage records are
kept after their results are let go: ``broker.lineage`` recomputes a lost result from them. Pure
and sans-I/O: no tensors, no sockets, no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from chords_mq.algorithms.base import Latent, Parareal, Rectify, Ref, Task, refs_of
from chords_mq.errors import PlanProtocolError


@dataclass(frozen=True)
class Initial:
    """The initial latent ``x0``: the broker keeps it, or a worker regenerates it from the
    request's seed. Never lost, so a recomputation always ends at it at the latest."""


X0 = Initial()
# What a task's input is made of, by name.
Source = Ref | Rectify | Parareal | Initial


def source_of(latent: Latent) -> Source:
    """A task's input by name. Fed names, a plan's only tensor input is the initial latent
    (``TaskLedger.held_tensors``), so a tensor here is ``X0``."""
    return X0 if isinstance(latent, torch.Tensor) else latent


def out_of_place(source: Source) -> Source:
    """``source`` computed without overwriting its first operand: the same bits
    (``algorithms.base.rectified``), and a result a replay reads stays intact for whoever else
    reads it."""
    if isinstance(source, Rectify | Parareal) and source.exclusive:
        return dataclasses.replace(source, exclusive=False)
    return source


@dataclass(frozen=True)
class Lineage:
    """How one task's results were made: what re-running it needs."""

    task: int
    core: int
    step: int
    targets: tuple[int, ...]
    input: Source

    @classmethod
    def of(cls, task: Task) -> Lineage:
        return cls(task.id, task.core, task.step, task.targets, source_of(task.latent))

    def results(self) -> tuple[Ref, ...]:
        """The results the task makes, one per target."""
        return tuple(Ref(self.task, target) for target in self.targets)

    def parents(self) -> tuple[Ref, ...]:
        """The results its input is made from (none for ``X0``)."""
        return () if isinstance(self.input, Initial) else refs_of(self.input)

    def same_task(self, other: Lineage) -> bool:
        """Is ``other`` a record of the same task (a replay: its input maybe out of place)?"""
        return dataclasses.replace(other, input=out_of_place(other.input)) == dataclasses.replace(
            self, input=out_of_place(self.input)
        )


def needed(
    names: Iterable[Ref], inputs: Iterable[Latent] = (), hits: Iterable[Latent] = ()
) -> frozenset[Ref]:
    """The results a request still needs: those its plan names (``TaskLedger.names``), those
    the inputs of its queued, running and late tasks are made from, and those of its hits not
    sent yet (waiting for media, say)."""
    refs = set(names)
    for value in (*inputs, *hits):
        refs.update(refs_of(value))
    return frozenset(refs)


class Directory:
    """One request's results: who holds each, its bytes, and the lineage of every task."""

    def __init__(self) -> None:
        self._lineage: dict[int, Lineage] = {}  # task id -> its record (kept once let go)
        self._holders: dict[Ref, set[bytes]] = {}  # only results held somewhere
        self._bytes: dict[Ref, int] = {}
        # the digest each holder reported of what it computed (a fetcher checks its copy);
        # none with --verify off, where results carry no digest and fetches check nothing
        self._digests: dict[tuple[Ref, bytes], str] = {}
        self.replays = 0  # tasks recorded again: results recomputed after a loss

    def __contains__(self, ref: object) -> bool:
        """Is ``ref`` held by some worker?"""
        return ref in self._holders

    def __len__(self) -> int:
        """How many results are held somewhere."""
        return len(self._holders)

    # -- what is where ---------------------------------------------------------------------------

    def record(
        self,
        lineage: Lineage,
        holder: bytes,
        nbytes: int,
        digests: Mapping[int, str | None] | None = None,
    ) -> tuple[Ref, ...]:
        """``holder`` computed a task's results (``nbytes`` each) and keeps them; returns their
        names. ``digests``: what it reported of each target's result, by target. A task
        recorded before is a replay: the same task (its input maybe computed out of place),
        counted in ``replays``; its results are not the plan's again."""
        if nbytes < 0:
            raise PlanProtocolError(f"task {lineage.task}: {nbytes} bytes")
        known = self._lineage.get(lineage.task)
        if known is None:
            self._lineage[lineage.task] = lineage
        elif known.same_task(lineage):
            self.replays += 1
        else:
            raise PlanProtocolError(f"task {lineage.task} recorded as {known}, then {lineage}")
        refs = self._lineage[lineage.task].results()
        for ref in refs:
            self._holders.setdefault(ref, set()).add(holder)
            self._bytes[ref] = nbytes
            digest = None if digests is None else digests.get(ref.target)
            if digest is not None:
                self._digests[ref, holder] = digest
        return refs

    def digest(self, ref: Ref, holder: bytes) -> str | None:
        """The digest ``holder`` reported of ``ref`` (None: none reported, or not held)."""
        return self._digests.get((ref, holder))

    def copied(self, ref: Ref, holder: bytes) -> None:
        """``holder`` keeps a copy of a held result too (it pulled it for a task)."""
        holders = self._holders.get(ref)
        if not holders:
            raise PlanProtocolError(f"result {ref} is not held: nobody to copy it from")
        holders.add(holder)

    def evaluated(self, value: Latent, holder: bytes) -> None:
        """``holder`` computed a task's input ``value`` from results it holds: an exclusive
        operation ran in its own copy of the first operand (``algorithms.base.rectified``),
        which no longer holds that result."""
        if isinstance(value, Rectify | Parareal) and value.exclusive:
            self.forget(holder, (value.fine,))

    def holders(self, ref: Ref) -> frozenset[bytes]:
        return frozenset(self._holders.get(ref, ()))

    def nbytes(self, ref: Ref) -> int:
        """The bytes of a held result (0: held by nobody)."""
        return self._bytes.get(ref, 0)

    def held_by(self, holder: bytes) -> frozenset[Ref]:
        return frozenset(ref for ref, holders in self._holders.items() if holder in holders)

    def lineage(self, ref: Ref) -> Lineage | None:
        """The record of the task that made ``ref``, held or not; None if none recorded it."""
        record = self._lineage.get(ref.task)
        return record if record is not None and ref.target in record.targets else None

    def bytes_per_holder(self) -> dict[bytes, int]:
        """The bytes of results each worker holds for the request."""
        per: dict[bytes, int] = {}
        for ref, holders in self._holders.items():
            for holder in holders:
                per[holder] = per.get(holder, 0) + self._bytes[ref]
        return per

    def missing(self, wanted: Iterable[Ref]) -> frozenset[Ref]:
        """The results of ``wanted`` some task made that no worker holds now."""
        return frozenset(
            r for r in wanted if r not in self._holders and self.lineage(r) is not None
        )

    # -- letting go ------------------------------------------------------------------------------

    def drop_candidates(self, wanted: Iterable[Ref]) -> dict[bytes, frozenset[Ref]]:
        """What each worker may let go: every result it holds that ``wanted`` (``needed``)
        does not name."""
        keep = frozenset(wanted)
        per: dict[bytes, set[Ref]] = {}
        for ref, holders in self._holders.items():
            if ref not in keep:
                for holder in holders:
                    per.setdefault(holder, set()).add(ref)
        return {holder: frozenset(refs) for holder, refs in per.items()}

    def forget(self, holder: bytes, refs: Iterable[Ref]) -> None:
        """``holder`` no longer keeps ``refs`` (let go, or overwritten in place)."""
        for ref in refs:
            holders = self._holders.get(ref)
            if holders is None:
                continue
            holders.discard(holder)
            self._digests.pop((ref, holder), None)
            if not holders:
                del self._holders[ref]
                del self._bytes[ref]

    def keep_only(self, wanted: Iterable[Ref]) -> Mapping[bytes, frozenset[Ref]]:
        """Let go of every result ``wanted`` does not name; returns what each worker is to drop."""
        candidates = self.drop_candidates(wanted)
        for holder, refs in candidates.items():
            self.forget(holder, refs)
        return candidates

    def worker_lost(self, holder: bytes, wanted: Iterable[Ref]) -> frozenset[Ref]:
        """``holder`` is gone with everything it held: returns the results now held nowhere
        that ``wanted`` (``needed``) names, the ones to recompute (``broker.lineage``). A result
        another worker still holds is not lost; one nothing needs is simply gone."""
        keep = frozenset(wanted)
        held = self.held_by(holder)
        self.forget(holder, held)
        return frozenset(ref for ref in held if ref in keep and ref not in self._holders)

    # -- verification (``broker.verify``) --------------------------------------------------------

    def record_of(self, task: int) -> Lineage | None:
        """The record of ``task``, its results held or not."""
        return self._lineage.get(task)

    def descendants(self, tasks: Iterable[int]) -> frozenset[int]:
        """The recorded tasks whose input was computed, directly or through others, from a
        result of ``tasks`` (not ``tasks`` themselves): what a wrong result spoilt."""
        spoilt = set(tasks)
        found: set[int] = set()
        records = sorted(self._lineage.values(), key=lambda r: r.task)  # parents first, mostly
        changed = True
        while changed:  # at most once more per record found
            changed = False
            for record in records:
                if record.task not in spoilt and any(p.task in spoilt for p in record.parents()):
                    spoilt.add(record.task)
                    found.add(record.task)
                    changed = True
        return frozenset(found)

    def ancestors(self, refs: Iterable[Ref]) -> frozenset[int]:
        """The recorded tasks ``refs`` were computed from, themselves included."""
        seen: set[int] = set()
        stack = [ref.task for ref in refs]
        while stack:
            task = stack.pop()
            record = self._lineage.get(task)
            if task in seen or record is None:
                continue
            seen.add(task)
            stack.extend(parent.task for parent in record.parents())
        return frozenset(seen)

    def forget_everywhere(self, ref: Ref) -> None:
        """Nobody holds ``ref`` any more (its value is wrong); its lineage stays, to recompute
        it."""
        for holder in self._holders.pop(ref, ()):
            self._digests.pop((ref, holder), None)
        self._bytes.pop(ref, None)
