"""Verification by redundancy: the broker runs a sample of tasks again on a second, independent
worker and compares the two results by digest, so a worker that returns wrong but finite results
is caught without any latent crossing the broker.

Every result a worker keeps comes with its digest (``HeldResult.digest``: SHA-256/128 of dtype,
shape and bytes). A *replica* of a task is the same task on the same inputs, under an id of its
own (``REPLICA_BASE`` up), run by a worker of another principal and of the same device class
(``workers.device_class``: same device kind and torch build, so the same bits). Equal digests
agree; a mismatch is settled by a third worker (the majority of digests), and each outvoted
worker gets a strike (the failure table's ``OUTVOTED`` row): it leaves the request, and its
results that no other worker confirmed are recomputed elsewhere by lineage
(``broker.lineage``), with everything computed from them (``invalidate``).

Across device classes the bits differ, so the comparison is by value (``broker.tolerance``):
when no worker of the original's class may run a replica but one of another class may (its
HELLO lists the capability "compare"), the replica runs there and keeps its results; the broker
then asks the replica's worker to fetch the original's results over the data plane and report
how far apart each pair is (COMPARE -> COMPARED; still no latent crosses the broker), and two
answers within the tolerance for the request's model and the results' dtype agree. Each new
answer is compared so with every earlier one of another class whose digests differ (one
COMPARE at a time); two answers of one class still agree only bitwise. The majority is then
taken over those agreements, and a disagreement goes to a third worker as a mismatch of digests
does. A comparison that cannot be made (a result not fetched, either worker gone, neither able
to compare, the comparing worker late or quarantined, or no answer in
``job_deadline_ceiling_s``) is no verdict on either answer: a third answer may settle the check,
and a strike needs a pair judged apart. A replica's answer never judged whose worker left the
request abstains (its results went with it: nothing could judge it), so the others' majority
settles the check without it; an original never abstains (the plan may hold its results).

How often a worker's task is replicated follows its clean record (``Records``), in the spirit of
BOINC's adaptive replication: every task of a new or struck worker, until
``verify_trusted_after`` of its results agreed with another worker's, and meanwhile its results
are *held*: the plan sees one only once a replica agrees, so a wrong value is never consumed.
Past that the rate halves every ``verify_half_life`` more agreements, down to
``verify_floor``, never zero; a sampled result goes to the plan at once and its replica
compares it later. ``--verify all`` holds every result; ``--verify off`` verifies nothing.

Off the data plane (``--no-data-plane``, and plans that read their latents' values, such as
ParaDIGMS) the results come through the broker as tensors: the same rates pick the sampled
ones, the broker digests a sampled result and its replicas' itself (``Answer.of_tensors``) and
compares them bitwise in one device class, or within the tolerance across two with
``algorithms.distance`` (no COMPARE: the replica's worker need not be able to compare). Every
sampled result is held there, whatever its worker's record, since no lineage could undo one the
plan took in; held results count in the request's bytes (``SessionChecks.tensors``). A worker
outvoted after unsampled results of its went into such a plan fails the request
(``SessionChecks.tainted``, typed ``unverifiable``): nothing can recompute them there.
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

import torch

from chords_mq.algorithms.base import Hit, Ref, Task, refs_of
from chords_mq.algorithms.distance import distance
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.tolerance import Tolerances
from chords_mq.wire import DTYPE_NAMES
from chords_mq.wire.base import tensor_digest
from chords_mq.wire.messages import ComparedMessage, CompareMessage
from chords_mq.wire.named import HeldResult, Holder, NamedInput, NamedRef

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
    # None only with --verify off (results carry no digest there), where nothing is compared:
    # ``RequestSession.check_held`` refuses a result without one while verifying
    digests: tuple[str | None, ...]
    held: Mapping[int, HeldResult]
    device_class: str | None = None
    held_as: int = 0  # the task id its worker keeps the results under (a replica's own)
    # Off the data plane: the results themselves, which came through the broker (the broker
    # digests them, compares them itself, and holds them until the check ends)
    tensors: Mapping[int, torch.Tensor] | None = None

    @classmethod
    def of(cls, worker: WorkerInfo, held: Mapping[int, HeldResult], held_as: int = 0) -> Answer:
        digests = tuple(held[target].digest for target in sorted(held))
        return cls(worker.identity, worker.principal, digests, held, worker.device_class, held_as)

    @classmethod
    def of_tensors(
        cls, worker: WorkerInfo, results: Mapping[int, torch.Tensor], held_as: int = 0
    ) -> Answer:
        """Results that came through the broker (off the data plane), digested here."""
        held = {
            target: HeldResult(
                DTYPE_NAMES[tensor.dtype],
                tuple(tensor.shape),
                tensor.numel() * tensor.element_size(),
                True,  # (checked finite already)
                tensor_digest(tensor),
            )
            for target, tensor in results.items()
        }
        answer = cls.of(worker, held, held_as)
        return dataclasses.replace(answer, tensors=dict(results))

    def refs(self) -> tuple[Ref, ...]:
        return tuple(Ref(self.held_as, target) for target in sorted(self.held))


@dataclass
class Check:
    """A task under verification: its answers so far, the one the plan was given (None while
    it is held), and its replica out (queued or running), if any."""

    task: Task
    device_class: str | None
    answers: list[Answer]
    published: Answer | None = None
    replica: int | None = None  # the id of the replica out
    # Across device classes: replicas may run on another class (none of this one could), and
    # the answers of two classes agree within the tolerance, as a COMPARE judged them.
    cross: bool = False
    judged: dict[tuple[int, int], bool] = field(default_factory=dict)  # answer indices
    # pairs whose COMPARE failed or went unanswered: no verdict on either answer
    unknown: set[tuple[int, int]] = field(default_factory=set)
    comparing: tuple[int, int] | None = None  # (earlier, newer): the COMPARE out
    comparer: bytes = b""  # the worker asked (the newer answer's, else the earlier's)
    compare_since: float = 0.0

    def principals(self) -> set[str]:
        return {answer.principal for answer in self.answers}

    def fits(self, worker: WorkerInfo) -> bool:
        """May ``worker`` run this task's replica: another principal, and the same class (or,
        ``cross``, one that can compare)?"""
        if worker.principal in self.principals():
            return False
        return worker.device_class == self.device_class or (
            self.cross and (worker.compares or self.local)
        )

    @property
    def local(self) -> bool:
        """Off the data plane: the broker holds every answer's results and compares them
        itself (no COMPARE, so a replica's worker need not be able to compare)."""
        return self.answers[0].tensors is not None

    def dtype(self) -> str:
        return self.answers[0].held[min(self.answers[0].held)].dtype

    def unjudged(self) -> tuple[int, int] | None:
        """A pair of answers of two classes, their digests different, not compared yet."""
        for newer, answer in enumerate(self.answers):
            for earlier in range(newer):
                other = self.answers[earlier]
                if (
                    other.device_class != answer.device_class
                    and other.digests != answer.digests
                    and (earlier, newer) not in self.judged
                    and (earlier, newer) not in self.unknown
                ):
                    return earlier, newer
        return None

    def same(self, first: int, second: int) -> bool:
        """Do two answers agree: the same digests, or judged within the tolerance?"""
        pair = (min(first, second), max(first, second))
        return self.answers[first].digests == self.answers[second].digests or self.judged.get(
            pair, False
        )

    def differ(self, first: int, second: int) -> bool:
        """Is there a verdict that two answers differ: other digests in one class, or a
        COMPARE that judged them apart (a pair never compared, or whose COMPARE failed or went
        unanswered, is no verdict)?"""
        pair = (min(first, second), max(first, second))
        one, other = self.answers[first], self.answers[second]
        if one.digests == other.digests:
            return False
        return one.device_class == other.device_class or self.judged.get(pair) is False

    def majority(self) -> tuple[tuple[str | None, ...], list[Answer]] | None:
        """The answers at least two of which agree and that more answers agree with than with
        any other (grouped by agreement: digests, or a tolerance across classes); the
        digests of the group's first."""
        groups: list[list[int]] = []
        for index in range(len(self.answers)):
            for group in groups:
                if any(self.same(index, member) for member in group):
                    group.append(index)
                    break
            else:
                groups.append([index])
        ranked = sorted(groups, key=len, reverse=True)
        if len(ranked[0]) < 2 or (len(ranked) > 1 and len(ranked[1]) == len(ranked[0])):
            return None
        agree = [self.answers[index] for index in ranked[0]]
        return agree[0].digests, agree


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
    # off the data plane: why the plan holds results of a worker outvoted since (it fails)
    tainted: str | None = None

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

    def compared(self) -> frozenset[Ref]:
        """The published results of checks across classes: a COMPARE may fetch them."""
        return frozenset(
            ref for check in self.checks.values() if check.cross for ref in _refs(check.task)
        )

    def waiting(self) -> list[Check]:
        """The checks whose replica is out."""
        return [check for check in self.checks.values() if check.replica is not None]

    def tensors(self) -> list[torch.Tensor]:
        """Off the data plane: the results the checks hold here (the held original's and the
        replicas'), which count against the request's byte budget."""
        return [
            tensor
            for check in self.checks.values()
            for answer in check.answers
            if answer.tensors is not None
            for tensor in answer.tensors.values()
        ]


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
    compare: tuple[bytes, CompareMessage] | None = None  # to send: (the worker, the COMPARE)
    late: bytes | None = None  # a comparer past its COMPARE's deadline (late for itself alone)


class Verification:
    """The broker's side: decides which results are replicated, holds or publishes them, and
    settles checks. ``registry``: who could run a replica."""

    def __init__(self, config: BrokerConfig, registry: WorkerRegistry, records: Records) -> None:
        self.config = config
        self.registry = registry
        self.records = records
        self.counts: dict[str, int] = {}  # replicas, agreed, mismatches, outvoted, unverifiable
        self.tolerances = Tolerances.parse(config.verify_tolerance)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def answered(
        self,
        session: RequestSession,
        worker: WorkerInfo,
        task: Task,
        held: Mapping[int, HeldResult] | None,
        now: float,
        tensors: Mapping[int, torch.Tensor] | None = None,
    ) -> Outcome:
        """``worker``'s checked results for ``task`` (a plan task, a replay or a replica):
        ``held`` on the data plane, else the ``tensors`` themselves (off it: digested here only
        if sampled, and every sampled one held, since no lineage could undo one published)."""
        checks = session.verifying
        original = checks.replicas.pop(task.id, None)
        if tensors is not None and original is None and not self._sample(worker):
            return Outcome(hits=self._publish(session, task, _unchecked(worker, tensors)))
        if tensors is not None:
            answer = Answer.of_tensors(worker, tensors, task.id)
        else:
            assert held is not None
            answer = Answer.of(worker, held, task.id)
        session.tasks.answered(task.id)
        if original is not None:
            checks.evaluations += 1
            check = checks.checks.get(original)
            if check is None or check.replica != task.id:
                session.drop_later(worker.identity, _refs(task))  # a check ended meanwhile
                return Outcome()
            check.replica = None
            if not check.cross:
                session.drop_later(worker.identity, _refs(task))  # held under the replica's id
            check.answers.append(answer)  # (across classes: kept until the check ends)
            return self._next(session, check, now)
        if tensors is None and not self._sample(worker):
            return Outcome(hits=self._publish(session, task, answer))
        check = Check(task, worker.device_class, [answer])
        if not self._can_replicate(session, check, now):
            self._count("unverifiable")
            return Outcome(hits=self._publish(session, task, answer))
        checks.checks[task.id] = check
        self._replicate(session, check)  # queued first: its inputs stay needed
        if self.records.holds(worker.principal) or answer.tensors is not None:
            return Outcome()  # held: the plan sees it once a replica agrees
        check.published = answer
        return Outcome(hits=self._publish(session, task, answer))

    def _sample(self, worker: WorkerInfo) -> bool:
        return self.config.verify != "off" and self.records.sampled(worker.principal)

    def _publish(self, session: RequestSession, task: Task, answer: Answer) -> list[Hit]:
        session.verifying.made_by[task.id] = answer.principal
        session.verifying.confirmed.discard(task.id)
        if answer.tensors is not None:  # off the data plane: the plan is given the tensors
            return session.complete(task, answer.tensors)
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
        late, not excluded from the request, another principal, the same device class)? If
        none of the class is but one of another class that can compare is, and the results'
        dtype has a tolerance, the check goes across classes (``cross``)."""
        others = [
            worker
            for worker in self.registry.serving(session.model, now)
            if worker.identity not in session.excluded
            and not worker.quarantined(now)  # (nor late: it may never answer)
            and worker.principal not in check.principals()
        ]
        if any(check.fits(worker) for worker in others):
            return True
        if self.tolerances.of(session.model, check.dtype()) is None:
            return False
        if any(worker.compares or check.local for worker in others):
            check.cross = True
            return True
        return False

    def _next(self, session: RequestSession, check: Check, now: float) -> Outcome:
        """Compare the next pair of answers of two classes (a COMPARE), else settle."""
        pair = check.unjudged()
        if pair is None:
            return self._settle(session, check, now)
        newer, earlier = (check.answers[index] for index in reversed(pair))
        if newer.tensors is not None and earlier.tensors is not None:
            # off the data plane the broker holds both: it compares them itself
            agree = all(
                self.tolerances.agree(session.model, check.dtype(), *distance(a, b))
                for a, b in zip(_ordered(newer.tensors), _ordered(earlier.tensors), strict=True)
            )
            check.judged[pair] = agree
            self._count("compared_agree" if agree else "compared_differ")
            return self._next(session, check, now)
        comparer = self.registry.get(newer.identity)
        source = self.registry.get(earlier.identity)
        if comparer is not None and source is not None and not comparer.compares:
            comparer, source, newer, earlier = source, comparer, earlier, newer  # the other asks
        if comparer is None or not comparer.compares or source is None or source.data is None:
            # it cannot be compared: no verdict on either answer, as a COMPARE that failed
            check.unknown.add(pair)
            self._count("uncompared")
            return self._next(session, check, now)
        key = source.principal[4:] if source.principal.startswith("key:") else None
        theirs = tuple(
            NamedInput("ref", (NamedRef(ref, (Holder(source.data, key, digest),)),))
            for ref, digest in zip(earlier.refs(), earlier.digests)
        )
        message = CompareMessage(
            mine=newer.refs(),
            theirs=theirs,
            dtype=check.dtype(),
            request=session.id,
            task=check.task.id,
        )
        check.comparing, check.comparer, check.compare_since = pair, comparer.identity, now
        self._count("compares")
        return Outcome(compare=(comparer.identity, message))

    def compared(
        self, session: RequestSession, worker: WorkerInfo, message: ComparedMessage, now: float
    ) -> Outcome | None:
        """A COMPARE's answer: the pair agrees if every distance is within the tolerance for
        the request's model and the results' dtype. None: stale (no such COMPARE out)."""
        check = session.verifying.checks.get(message.task if message.task is not None else -1)
        if check is None or check.comparing is None or check.comparer != worker.identity:
            return None
        dtype = check.dtype()
        if message.error is not None or len(message.distances) != len(check.answers[0].held):
            # not a verdict on the other worker: the pair stays unjudged, a third answer may
            # settle the check; the comparer's own failure is logged for it alone
            log.warning(
                "request %s task %d: %s could not compare: %s",
                session.id,
                check.task.id,
                worker.name,
                (message.error or "distances for other results")[:200],
            )
            check.unknown.add(check.comparing)
            check.comparing = None
            self._count("uncompared")
            return self._next(session, check, now)
        agree = all(
            self.tolerances.agree(session.model, dtype, max_rel, rms_rel)
            for max_rel, rms_rel in message.distances
        )
        check.judged[check.comparing] = agree
        check.comparing = None
        self._count("compared_agree" if agree else "compared_differ")
        return self._next(session, check, now)

    def stalled(self, session: RequestSession, now: float) -> list[Outcome]:
        """COMPARES that will not be answered (the comparing worker gone, quarantined or late,
        or past ``job_deadline_ceiling_s``) are no verdict on either answer: the pair stays
        unjudged and a third answer may settle the check; what that leads to."""
        outcomes = []
        for check in list(session.verifying.checks.values()):
            if check.comparing is None:
                continue
            ceiling = self.config.job_deadline_ceiling_s
            if self.registry.answering(check.comparer, check.compare_since, now, ceiling):
                continue
            comparer = self.registry.get(check.comparer)
            log.warning(
                "request %s task %d: COMPARE to %s went unanswered",
                session.id,
                check.task.id,
                "a worker gone" if comparer is None else comparer.name,
            )
            check.unknown.add(check.comparing)
            check.comparing = None
            self._count("uncompared")
            outcome = self._next(session, check, now)
            if comparer is not None and not comparer.quarantined(now):
                outcome.late = comparer.identity
            outcomes.append(outcome)
        return outcomes

    def _end(self, session: RequestSession, check: Check) -> None:
        """The check is over: replicas' results kept for a comparison are let go."""
        if check.cross:
            for answer in check.answers[1:]:
                session.drop_later(answer.identity, answer.refs())

    def _settle(self, session: RequestSession, check: Check, now: float) -> Outcome:
        checks = session.verifying
        winner = check.majority()
        if winner is not None and not self._verdict(session, check, winner[1]):
            winner = None  # an answer outside the majority was never judged apart from it
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
                self._end(session, check)
                return Outcome(unsettled=check)
            self._replicate(session, check)
            return Outcome()
        _, agree = winner
        del checks.checks[check.task.id]
        self._end(session, check)
        inside = [i for i, answer in enumerate(check.answers) if any(a is answer for a in agree)]
        losers = [  # (one judged apart from the majority; one that agrees with it is no loser)
            answer
            for index, answer in enumerate(check.answers)
            if index not in inside and any(check.differ(index, other) for other in inside)
        ]
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
        elif any(answer is check.published for answer in agree):
            checks.confirmed.add(check.task.id)
        # (a published answer outvoted: its results are invalidated with its worker's others)
        if losers:
            self._count("outvoted")
        return outcome

    def _verdict(self, session: RequestSession, check: Check, agree: list[Answer]) -> bool:
        """Is every answer outside ``agree`` either judged apart from one of it (a strike) or
        agreeing with one of it, and the original (answer 0) not left unjudged? A COMPARE that
        failed or went unanswered strikes nobody. A replica's answer left unjudged whose worker
        is gone (or left the request) abstains: its results went with it, so nothing could
        ever judge it, and the others' majority settles the check without it (no strike). The
        original never abstains: the plan may hold its results (a held one's check ended when
        its worker went, ``holder_gone``, and its task runs again)."""
        inside = [i for i, answer in enumerate(check.answers) if any(a is answer for a in agree)]
        abstained = 0
        for index in range(len(check.answers)):
            if index in inside:
                continue
            if any(check.differ(index, other) for other in inside):
                continue
            if index == 0:
                return False
            if any(check.same(index, other) for other in inside):
                continue
            if not self._gone(session, check.answers[index]):
                return False
            abstained += 1  # a replica whose worker left: its answer is set aside
        for _ in range(abstained):
            self._count("abstained")
        return True

    @staticmethod
    def _gone(session: RequestSession, answer: Answer) -> bool:
        """Has ``answer``'s worker left the request (lost: no request counts it prepared any
        more; or released or excluded from it), so its results, and any judgement of them,
        went with it?"""
        return answer.identity not in session.prepared

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
            self._end(session, check)
            self._count("unverifiable")
            if len(check.answers) > 1:
                unsettled.append(check)
            elif check.published is None:
                hits += self._publish(session, check.task, check.answers[0])
        return hits, unsettled


def _refs(task: Task) -> tuple[Ref, ...]:
    return tuple(Ref(task.id, target) for target in task.targets)


def _ordered(tensors: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[target] for target in sorted(tensors)]


def _unchecked(worker: WorkerInfo, tensors: Mapping[int, torch.Tensor]) -> Answer:
    """Results off the data plane that no replica checks: not digested (only who made them)."""
    return Answer(worker.identity, worker.principal, (), {}, worker.device_class, 0, tensors)


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
    if not roots or session.plan is None:
        return frozenset()
    if not session.named:  # off the data plane the plan took them in: nothing recomputes them
        checks.tainted = (
            f"a worker outvoted since had put {len(roots)} unchecked results into the plan "
            "(off the data plane they cannot be recomputed)"
        )
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
