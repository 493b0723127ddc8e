"""Verification by redundancy: the broker runs a sample of tasks again on a second, independent
worker and compares the two results by digest, so a worker that returns wrong but finite results
is caught without any latent crossing the broker.

Every result a worker keeps comes with its digest (``HeldResult.digest``: blake2b-128 of dtype,
shape and bytes). A *replica* of a task is the same task on the same inputs, under an id of its
own (``REPLICA_BASE`` up), run by a worker of another principal and of the same device class
(``workers.device_class``: same device kind and torch build, so the same bits). Equal digests
agree; a mismatch is settled by a third worker (the majority of digests), and each outvoted
worker gets a strike (the failure table's ``OUTVOTED`` row): it leaves the request, and its
results that no other worker confirmed are recomputed elsewhere by lineage
(``broker.lineage``), with everything computed from them (``invalidate``).

How often a worker's task is replicated follows its clean record (``Records``), in the spirit of
BOINC's adaptive replication: every task of a new or struck worker, until
``verify_trusted_after`` of its results agreed with another worker's, and meanwhile its results
are *held*: the plan sees one only once a replica agrees, so a wrong value is never consumed.
Past that the rate halves every ``verify_half_life`` more agreements, down to
``verify_floor``, never zero; a sampled result goes to the plan at once and its replica
compares it later. ``--verify all`` holds every result; ``--verify off`` verifies nothing.
Sans-I/O: the core's handlers call this, it returns hits and the outvoted.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chords_mq.algorithms.base import Hit, Ref, Task, refs_of
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.wire.named import HeldResult

if TYPE_CHECKING:
    from chords_mq.broker.session import RequestSession

log = logging.getLogger("chords.broker")

# Replica ids: far above any plan's task ids (which count up from 0), below ``X0_REF``'s.
REPLICA_BASE = 1 << 61
MAX_ANSWERS = 5  # answers one task collects at most; past it with no majority it fails


@dataclass(frozen=True)
class Answer:
    """One worker's results for a task: who, and the digest of each target's result."""

    identity: bytes
    principal: str
    digests: tuple[str | None, ...]
    held: Mapping[int, HeldResult]

    @classmethod
    def of(cls, worker: WorkerInfo, held: Mapping[int, HeldResult]) -> Answer:
        digests = tuple(held[target].digest for target in sorted(held))
        return cls(worker.identity, worker.principal, digests, held)


@dataclass
class Check:
    """A task under verification: its answers so far, the one the plan was given (None while
    it is held), and its replica out (queued or running), if any."""

    task: Task
    device_class: str | None
    answers: list[Answer]
    published: Answer | None = None
    replica: int | None = None  # the id of the replica out

    def principals(self) -> set[str]:
        return {answer.principal for answer in self.answers}

    def fits(self, worker: WorkerInfo) -> bool:
        """May ``worker`` run this task's replica: another principal, the same class?"""
        return (
            worker.principal not in self.principals() and worker.device_class == self.device_class
        )

    def majority(self) -> tuple[tuple[str | None, ...], list[Answer]] | None:
        """The digests at least two answers give and more answers give than any other."""
        groups: dict[tuple[str | None, ...], list[Answer]] = {}
        for answer in self.answers:
            groups.setdefault(answer.digests, []).append(answer)
        ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
        if len(ranked[0][1]) < 2 or (len(ranked) > 1 and len(ranked[1][1]) == len(ranked[0][1])):
            return None
        return ranked[0]


@dataclass
class SessionChecks:
    """One request's verification: its checks (by task id), its replicas (replica id -> task
    id), who made each task's published results and which of them another worker confirmed."""

    checks: dict[int, Check] = field(default_factory=dict)
    replicas: dict[int, int] = field(default_factory=dict)
    made_by: dict[int, str] = field(default_factory=dict)  # task id -> principal
    confirmed: set[int] = field(default_factory=set)  # task ids another worker agreed with
    evaluations: int = 0  # replicas answered: the cost of verification
    next_replica: int = REPLICA_BASE
    awaited: set[int] = field(default_factory=set)  # audited tasks a hit waits for

    def is_replica(self, task: Task) -> bool:
        return task.id in self.replicas

    def urgent(self, task: Task) -> bool:
        """A replica of a held result (a chain waits for it), or of a published one that a
        hit waits for."""
        check = self.checks.get(self.replicas.get(task.id, -1))
        return check is not None and (check.published is None or check.task.id in self.awaited)

    def audited(self) -> set[int]:
        """The tasks whose published results wait for their replica."""
        return {task for task, check in self.checks.items() if check.published is not None}

    def fits(self, worker: WorkerInfo) -> Callable[[Task], bool]:
        """Which queued replicas ``worker`` may run."""

        def fits(task: Task) -> bool:
            check = self.checks.get(self.replicas.get(task.id, -1))
            return check is not None and check.fits(worker)

        return fits

    def waiting(self) -> list[Check]:
        """The checks whose replica is out."""
        return [check for check in self.checks.values() if check.replica is not None]


class Records:
    """Each principal's clean record: its results another worker's agreed with since its last
    strike (bounded, the oldest forgotten first), and the rate its tasks are replicated at."""

    def __init__(self, config: BrokerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng if rng is not None else random.Random(config.verify_seed)
        self.clean: OrderedDict[str, int] = OrderedDict()

    def rate(self, principal: str) -> float:
        """The fraction of its tasks replicated: 1 until ``verify_trusted_after`` clean
        results, then halving every ``verify_half_life`` more, down to ``verify_floor``."""
        config = self.config
        if config.verify == "off":
            return 0.0
        clean = self.clean.get(principal, 0)
        if config.verify == "all" or clean < config.verify_trusted_after:
            return 1.0
        halvings = (clean - config.verify_trusted_after) / max(config.verify_half_life, 1)
        return max(config.verify_floor, float(0.5**halvings))

    def holds(self, principal: str) -> bool:
        """Are its results held until a replica agrees (rate 1: new, struck, or ``all``)?"""
        return self.rate(principal) >= 1.0

    def sampled(self, principal: str) -> bool:
        rate = self.rate(principal)
        return rate >= 1.0 or (rate > 0.0 and self.rng.random() < rate)

    def agreed(self, principal: str) -> None:
        self.clean[principal] = self.clean.pop(principal, 0) + 1
        while len(self.clean) > 4 * self.config.max_workers:
            self.clean.popitem(last=False)

    def outvoted(self, principal: str) -> None:
        """A strike: its record starts again (every task replicated, results held)."""
        self.clean.pop(principal, None)


@dataclass
class Outcome:
    """What one answer led to: hits the plan released, the answers outvoted (each a strike),
    and a task whose answers no majority settles (its request fails)."""

    hits: list[Hit] = field(default_factory=list)
    outvoted: list[Answer] = field(default_factory=list)
    unsettled: Check | None = None
    task: int | None = None  # the task settled (its own id, not a replica's)


class Verification:
    """The broker's side: decides which results are replicated, holds or publishes them, and
    settles checks. ``registry``: who could run a replica."""

    def __init__(self, config: BrokerConfig, registry: WorkerRegistry, records: Records) -> None:
        self.config = config
        self.registry = registry
        self.records = records
        self.counts: dict[str, int] = {}  # replicas, agreed, mismatches, outvoted, unverifiable

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def answered(
        self,
        session: RequestSession,
        worker: WorkerInfo,
        task: Task,
        held: Mapping[int, HeldResult],
        now: float,
    ) -> Outcome:
        """``worker``'s checked results for ``task`` (a plan task, a replay or a replica)."""
        checks = session.verifying
        original = checks.replicas.pop(task.id, None)
        answer = Answer.of(worker, held)
        session.tasks.answered(task.id)
        if original is not None:
            checks.evaluations += 1
            check = checks.checks.get(original)
            if check is None or check.replica != task.id:
                session.drop_later(worker.identity, _refs(task))  # a check ended meanwhile
                return Outcome()
            check.replica = None
            session.drop_later(worker.identity, _refs(task))  # held under the replica's id
            check.answers.append(answer)
            return self._settle(session, check, now)
        if self.config.verify == "off" or not self.records.sampled(worker.principal):
            return Outcome(hits=self._publish(session, task, answer))
        check = Check(task, worker.device_class, [answer])
        if not self._can_replicate(session, check, now):
            self._count("unverifiable")
            return Outcome(hits=self._publish(session, task, answer))
        checks.checks[task.id] = check
        self._replicate(session, check)  # queued first: its inputs stay needed
        if self.records.holds(worker.principal):
            return Outcome()  # held: the plan sees it once a replica agrees
        check.published = answer
        return Outcome(hits=self._publish(session, task, answer))

    def _publish(self, session: RequestSession, task: Task, answer: Answer) -> list[Hit]:
        session.verifying.made_by[task.id] = answer.principal
        session.verifying.confirmed.discard(task.id)
        return session.complete_held(task, answer.held, answer.identity)

    def _replicate(self, session: RequestSession, check: Check) -> None:
        """Queue a replica of ``check``'s task under a new id (its answers are held there)."""
        checks = session.verifying
        replica = checks.next_replica
        checks.next_replica += 1
        checks.replicas[replica] = check.task.id
        check.replica = replica
        session.tasks.push(dataclasses.replace(check.task, id=replica))
        self._count("replicas")

    def _can_replicate(self, session: RequestSession, check: Check, now: float) -> bool:
        """Is a worker there that may run ``check``'s replica (its model, not quarantined nor
        late, not excluded from the request, another principal, the same device class)?"""
        return any(
            worker.identity not in session.excluded
            and not worker.quarantined(now)  # (nor late: it may never answer)
            and check.fits(worker)
            for worker in self.registry.serving(session.model, now)
        )

    def _settle(self, session: RequestSession, check: Check, now: float) -> Outcome:
        checks = session.verifying
        winner = check.majority()
        if winner is None:
            if len(check.answers) == 2:
                self._count("mismatches")
                log.warning(
                    "request %s task %d: two workers' results differ; a third settles it",
                    session.id,
                    check.task.id,
                )
            if len(check.answers) >= MAX_ANSWERS or not self._can_replicate(session, check, now):
                del checks.checks[check.task.id]
                return Outcome(unsettled=check)
            self._replicate(session, check)
            return Outcome()
        digests, agree = winner
        del checks.checks[check.task.id]
        losers = [answer for answer in check.answers if answer.digests != digests]
        for answer in agree:
            self.records.agreed(answer.principal)
        self._count("agreed")
        outcome = Outcome(outvoted=losers, task=check.task.id)
        if check.published is None:
            first = agree[0]  # the original: it holds the results under the task's own id
            if first is check.answers[0]:
                outcome.hits = self._publish(session, check.task, first)
                checks.confirmed.add(check.task.id)
            else:  # the original was outvoted: the task runs again, under its own id
                session.tasks.again(check.task)
        elif check.published.digests == digests:
            checks.confirmed.add(check.task.id)
        # (a published answer outvoted: its results are invalidated with its worker's others)
        if losers:
            self._count("outvoted")
        return outcome

    def unverifiable(self, session: RequestSession, now: float) -> tuple[list[Hit], list[Check]]:
        """Checks whose replica no worker there may run any more (the pool changed): a single
        answer is published unverified; answers that disagree are unsettled (the request
        fails). Returns the hits released and the unsettled checks."""
        hits: list[Hit] = []
        unsettled = []
        checks = session.verifying
        for check in checks.waiting():
            if self._can_replicate(session, check, now):
                continue
            assert check.replica is not None
            session.tasks.cancel(check.replica)
            checks.replicas.pop(check.replica, None)
            del checks.checks[check.task.id]
            self._count("unverifiable")
            if len(check.answers) > 1:
                unsettled.append(check)
            elif check.published is None:
                hits += self._publish(session, check.task, check.answers[0])
        return hits, unsettled


def _refs(task: Task) -> tuple[Ref, ...]:
    return tuple(Ref(task.id, target) for target in task.targets)


def holder_gone(session: RequestSession, identity: bytes) -> None:
    """``identity`` holds nothing of the request any more: a check held on its results (not
    given to the plan) is given up, and its task runs again (its replica's answer is stale)."""
    checks = session.verifying
    for check in list(checks.checks.values()):
        if check.published is None and check.answers[0].identity == identity:
            del checks.checks[check.task.id]
            if check.replica is not None:
                session.tasks.cancel(check.replica)
                checks.replicas.pop(check.replica, None)
            session.tasks.again(check.task)


def invalidate(session: RequestSession, principal: str) -> frozenset[Ref]:
    """``principal`` was outvoted: every result of the request it made that no other worker
    confirmed is wrong until shown otherwise, and so is everything computed from one. All of
    them are let go wherever held (DROP), tasks that read them run again, hits made of them are
    decoded again, and what the request still needs of them is recomputed by lineage, as lost
    results are. Returns the results invalidated."""
    checks = session.verifying
    roots = {
        task
        for task, maker in checks.made_by.items()
        if maker == principal and task not in checks.confirmed
    }
    if not roots or not session.named or session.plan is None:
        return frozenset()
    directory = session.directory
    bad_tasks = roots | directory.descendants(roots)
    bad: set[Ref] = set()
    for task in bad_tasks:
        checks.made_by.pop(task, None)
        check = checks.checks.pop(task, None)
        if check is not None and check.replica is not None:
            session.tasks.cancel(check.replica)
            checks.replicas.pop(check.replica, None)
        record = directory.record_of(task)
        if record is not None:
            bad.update(record.results())
    for ref in bad:
        for holder in directory.holders(ref):
            session.drop_later(holder, (ref,))
        directory.forget_everywhere(ref)

    def reads_bad(task: Task) -> bool:
        return not bad.isdisjoint(refs_of(task.latent))

    for check in list(checks.checks.values()):  # held on results computed from wrong inputs
        if reads_bad(check.task):
            del checks.checks[check.task.id]
            if check.replica is not None:
                session.tasks.cancel(check.replica)
                checks.replicas.pop(check.replica, None)
            for answer in check.answers:
                if answer is check.answers[0]:
                    session.drop_later(answer.identity, _refs(check.task))
            session.tasks.again(check.task)
    session.tasks.redo(reads_bad)
    session.media.redo(lambda hit: not bad.isdisjoint(refs_of(hit.latent)))
    session.recover(frozenset(ref for ref in bad if ref in session.needed()))
    log.warning(
        "request %s: %d results of %s and %d computed from them are recomputed",
        session.id,
        len(roots),
        principal,
        len(bad_tasks) - len(roots),
    )
    return frozenset(bad)
