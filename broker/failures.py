"""The failure policy, in one place: one row per way a request or a worker can go wrong, saying
how the broker notices it, what becomes of the job, what becomes of the worker, whether it
counts against the job's retries, and the error the request fails with.

``RULES`` is the policy; ``FailurePolicy.apply`` carries a row out (the broker core's handlers
call it and do nothing of their own), so changing a row changes what the broker does.
``docs/architecture.md`` quotes ``table_markdown()``, and a test holds it to the table. Rows
whose action is the request's alone (it waits for a worker, a client gone, the drain) are
carried out by ``broker.lifecycle``; they are here so the whole policy reads in one table.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from chords_mq.broker.bindings import Bindings
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.lifecycle import RequestLifecycle
from chords_mq.broker.metrics import CoreMetrics
from chords_mq.broker.outbox import Outbox
from chords_mq.broker.registry import Job, WorkerInfo, WorkerRegistry
from chords_mq.broker.session import RequestSession
from chords_mq.broker.sessions import SessionTable
from chords_mq.broker.trust import Trust
from chords_mq.broker.verify import invalidate
from chords_mq.wire import DisconnectMessage, Kind

log = logging.getLogger("chords.broker")


class Failure(enum.Enum):
    WORKER_LOST = "a worker is lost"
    MALFORMED = "a malformed message from a worker"
    BROKEN_ANSWER = "a RESULT that answers other tasks"
    STALE_ANSWER = "a stale answer"
    LATE_EVAL = "a late EVAL"
    LATE_EVAL_ALONE = "a late EVAL, no other worker"
    LATE_JOB = "a late PREPARE or DECODE"
    LATE_JOB_ALONE = "a late PREPARE or DECODE, no other worker"
    BAD_RESULT = "a bad RESULT"
    WORKER_ERROR = "FAILED worker_error"
    NOT_PREPARED = "FAILED not_prepared"
    INVALID_REQUEST = "FAILED invalid_request"
    BAD_PREPARED = "a bad PREPARED"
    X0_MISMATCH = "two initial latents"
    NO_MEDIA = "a DECODED without media"
    TOO_LARGE = "a request too large"
    NO_WORKER = "no capable worker"
    NO_HEALTHY_WORKER = "only bad results"
    RECOVERY_TOO_LARGE = "a recovery past its bound"
    LOST_INPUT = "FAILED lost_input"
    CORRUPT_INPUT = "FAILED corrupt_input, confirmed"
    CORRUPT_CLAIM = "FAILED corrupt_input"
    CLAIM_REFUTED = "FAILED corrupt_input, refuted"
    FALSE_CLAIMS = "false corrupt_input claims"
    CLAIM_DISBELIEVED = "FAILED corrupt_input, disbelieved"
    INPUTS_UNREACHABLE = "FAILED lost_input, too often"
    HOLDER_UNREACHABLE = "FAILED lost_input, from two principals"
    OUTVOTED = "a result outvoted"
    UNVERIFIABLE = "no majority"
    CLIENT_GONE = "a client gone"
    DRAIN_TIMEOUT = "the drain times out"
    WRONG_PORT = "the wrong port"


class JobAction(enum.Enum):
    RERUN = "runs again (next attempt) on any worker"
    RERUN_HELD = "every task it held runs again (next attempt)"
    COPY = "copied (next attempt); the first answer wins"
    RUN_ON = "runs on, uncopied"
    PREPARE_ANOTHER = "another worker is prepared (and asked for x0)"
    DROPPED = "the answer is dropped"
    RECOMPUTE = (
        "its worker's results no other worker confirmed, and all made from them, are "
        "recomputed by lineage (every request)"
    )
    NONE = "-"


class WorkerAction(enum.Enum):
    LOST = "out of the registry"
    DROP = "out of the registry, told to DISCONNECT"
    RELEASE = "released from the request"
    EXCLUDE = "released, never used for the request again"
    SUSPECT = "a suspect: strikes once another worker's result passes; quarantined at 2"
    MISSED = "a missed deadline; quarantined after 5 in a row"
    STRIKE = "a strike (and a clean record from zero); quarantined at 2"
    UNPREPARED = "prepared again before its next task"
    NONE = "-"


@dataclass(frozen=True)
class Rule:
    noticed: str  # how the broker notices it
    job: JobAction
    worker: tuple[WorkerAction, ...]
    counted: bool = False  # against --max-task-retries, per job (kind and id)
    fails: str | None = None  # the request's error code: past the retries, or at once
    at_once: bool = False  # fails the request at once (not after the retries)
    metric: str | None = None  # chords_worker_failures_total{reason}
    recheck: bool = False  # then the request checks it still has a worker it may use


F, J, W = Failure, JobAction, WorkerAction
RULES: dict[Failure, Rule] = {
    F.WORKER_LOST: Rule(
        "missed heartbeats (--liveness, stretched for a large answer), unreachable on a send, "
        "its DISCONNECT, or a HELLO again while it held work",
        J.RERUN_HELD,
        (W.LOST,),
    ),
    F.MALFORMED: Rule(
        "a message that does not decode, or a kind a worker may not send",
        J.RERUN_HELD,
        (W.DROP,),
    ),
    F.BROKEN_ANSWER: Rule(
        "a RESULT that answers other tasks than its EVAL carried",
        J.RERUN_HELD,
        (W.DROP,),
        metric="broken",
    ),
    F.STALE_ANSWER: Rule(
        "an answer of another epoch, or not to the worker's current job (kind, request, "
        "first task, attempt)",
        J.DROPPED,
        (W.NONE,),
    ),
    F.LATE_EVAL: Rule(
        "an EVAL still running after 2.5x its worker's expected time (at least 50 ms, plus "
        "its transfers at 100 MB/s)",
        J.COPY,
        (W.RELEASE, W.MISSED),
        metric="late",
    ),
    F.LATE_EVAL_ALONE: Rule(
        "the same, with no other worker of the model that could run a copy",
        J.RUN_ON,
        (W.NONE,),
        metric="late",
    ),
    F.LATE_JOB: Rule(
        "a PREPARE or DECODE still running after 2.5x what its worker (else its model's "
        "workers) took for one, kept within 0.5 s to 60 s (60 s before any is learnt), plus "
        "the request's latent at 100 MB/s",
        J.RERUN,
        (W.MISSED,),
        metric="late",
    ),
    F.LATE_JOB_ALONE: Rule(
        "the same, with no other worker of the model that could take it",
        J.RUN_ON,
        (W.NONE,),
        metric="late",
    ),
    F.BAD_RESULT: Rule(
        "a RESULT whose data fails the checks: NaN or Inf, not the request's dtype (the one "
        "PREPARED declares, else the first result's), a wrong shape or target",
        J.RERUN,
        (W.EXCLUDE, W.SUSPECT),
        counted=True,
        fails="bad_result",  # non_finite when NaN or Inf
        recheck=True,
    ),
    F.WORKER_ERROR: Rule(
        "FAILED worker_error or bad_message (the adapter raised)",
        J.RERUN,
        (W.NONE,),
        counted=True,
        fails="worker_error",
        metric="worker_error",
    ),
    F.NOT_PREPARED: Rule(
        "FAILED not_prepared: its cache evicted the request",
        J.RERUN,
        (W.UNPREPARED,),
        metric="worker_error",
    ),
    F.INVALID_REQUEST: Rule(
        "FAILED invalid_request: the request's parameters do not fit the model",
        J.NONE,
        (W.NONE,),
        fails="invalid_request",
        at_once=True,
        metric="worker_error",
    ),
    F.BAD_PREPARED: Rule(
        "a PREPARED without a finite floating-point x0 when one was asked for, an x0 that is "
        "not its digest or not the latent declared, a malformed declaration, or a solver spec "
        "that does not parse",
        J.PREPARE_ANOTHER,
        (W.EXCLUDE,),
        counted=True,
        fails="bad_prepare",
        metric="bad_prepare",
    ),
    F.X0_MISMATCH: Rule(
        "two prepared workers name different initial latents (x0_digest), or declare "
        "different latents or result dtypes",
        J.NONE,
        (W.NONE,),
        fails="x0_mismatch",
        at_once=True,
    ),
    F.NO_MEDIA: Rule(
        "a DECODED without media",
        J.RERUN,
        (W.NONE,),
        counted=True,
        fails="decode_failed",
    ),
    F.TOO_LARGE: Rule(
        "the latent PREPARED declares (or, undeclared, the initial latent) shows its working "
        "set is over --max-request-bytes, before any tensor of it is accepted",
        J.NONE,
        (W.NONE,),
        fails="too_large",
        at_once=True,
    ),
    F.NO_WORKER: Rule(
        "no registered worker it may use serves its model: its client is told it waits",
        J.NONE,
        (W.NONE,),
        fails="no_worker",  # after --worker-timeout (or its own wait_for_worker_s)
    ),
    F.NO_HEALTHY_WORKER: Rule(
        "every worker of its model gave it a bad result",
        J.NONE,
        (W.NONE,),
        fails="bad_result",  # non_finite when NaN or Inf
        at_once=True,
    ),
    F.RECOVERY_TOO_LARGE: Rule(
        "results a lost worker held that the request still needs would take more replays of "
        "their producers than its bound (--data-plane)",
        J.NONE,
        (W.NONE,),
        fails="recovery_too_large",
        at_once=True,
    ),
    F.LOST_INPUT: Rule(
        "FAILED lost_input: no holder of a task's input gave it (--data-plane); that holder "
        "counts as lost for it, and it is recomputed if nobody else holds it",
        J.RERUN,
        (W.NONE,),
        metric="lost_input",
    ),
    F.CORRUPT_CLAIM: Rule(
        "FAILED corrupt_input: the bytes a holder served for a task's input do not have the "
        "digest it reported (--data-plane). A fetcher's word, which may be a lie: the holder's "
        "copy counts as lost and is recomputed if nobody else holds it, the worker here is "
        "that holder (a suspect: its clean record starts again; it recomputes nothing more of "
        "the request), and once fetchers of two "
        "principals said so within 10 minutes a worker of a third principal probes its copy",
        J.RERUN,
        (W.NONE,),
        metric="corrupt_input",
    ),
    F.CORRUPT_INPUT: Rule(
        "a probe of the holder's copy (a worker of neither its principal nor a claimant's "
        "fetched it) got other bytes than the holder reported too; the worker here is that "
        "holder",
        J.NONE,
        (W.STRIKE,),
        metric="corrupt_confirmed",
    ),
    F.CLAIM_REFUTED: Rule(
        "a probe of the holder's copy got the bytes it reported: the worker here is a claimant "
        "(a suspect: its clean record starts again; the holder is not struck)",
        J.NONE,
        (W.NONE,),
        metric="corrupt_refuted",
    ),
    F.FALSE_CLAIMS: Rule(
        "probes refuted a claimant's corrupt_input claims about holders of 2 principals "
        "within an hour; the worker here is that claimant",
        J.NONE,
        (W.STRIKE,),
        metric="false_claims",
    ),
    F.CLAIM_DISBELIEVED: Rule(
        "FAILED corrupt_input about a holder that a probe found honest after an earlier claim "
        "of this claimant's about it, within the hour: the holder's copy stays (nothing is "
        "recomputed), and the worker here is the claimant (it cannot use that holder's copy)",
        J.RERUN,
        (W.EXCLUDE,),
        metric="corrupt_disbelieved",
    ),
    F.INPUTS_UNREACHABLE: Rule(
        "FAILED lost_input (or, with --verify off, corrupt_input) for more of one request's "
        "tasks than --max-lost-inputs: the worker here cannot reach the others' copies, or "
        "lies about them; the holder's copy stays (nothing is recomputed)",
        J.RERUN,
        (W.EXCLUDE,),
        metric="inputs_unreachable",
    ),
    F.HOLDER_UNREACHABLE: Rule(
        "FAILED lost_input naming one holder, from workers of two principals in one request "
        "(ahead of the row above): the worker here is that holder, whose copies nobody gets "
        "(a firewalled data port, say); its copies count as lost and are recomputed, its task "
        "there runs again elsewhere, and the claimants' claim is not held against them",
        J.NONE,
        (W.EXCLUDE,),
        metric="holder_unreachable",
    ),
    F.OUTVOTED: Rule(
        "a replica's digests disagree with its result and a third worker's side with the "
        "replica (--verify; workers of one device class)",
        J.RECOMPUTE,
        (W.EXCLUDE, W.STRIKE),
        metric="outvoted",
        recheck=True,
    ),
    F.UNVERIFIABLE: Rule(
        "the answers to one task disagree with no majority after 5, or no worker is left that "
        "could run another replica",
        J.NONE,
        (W.NONE,),
        fails="unverifiable",
        at_once=True,
    ),
    F.CLIENT_GONE: Rule(
        "its client is unreachable, or past its outbox's bound",
        J.NONE,
        (W.RELEASE,),
    ),
    F.DRAIN_TIMEOUT: Rule(
        "SIGTERM's --drain-timeout passed with it still running",
        J.NONE,
        (W.RELEASE,),
        fails="shutdown",
        at_once=True,
    ),
    F.WRONG_PORT: Rule(
        "a client's message at the worker port, or a worker's at the client port",
        J.NONE,
        (W.NONE,),
    ),
}


def table_markdown() -> str:
    """``RULES`` as the Markdown table ``docs/architecture.md`` quotes."""
    lines = [
        "| failure | noticed | the job | the worker | retries | the request fails with |",
        "|---|---|---|---|---|---|",
    ]
    for failure, rule in RULES.items():
        worker = "; ".join(action.value for action in rule.worker)
        counted = "counted" if rule.counted else "-"
        if rule.fails is None:
            fails = "-"
        elif rule.at_once:
            fails = f"`{rule.fails}`, at once"
        elif rule.counted:
            fails = f"`{rule.fails}`, past the retries"
        else:
            fails = f"`{rule.fails}`, after its wait"
        lines.append(
            f"| {failure.value} | {rule.noticed} | {rule.job.value} | {worker} | {counted} "
            f"| {fails} |"
        )
    return "\n".join(lines)


class FailurePolicy:
    """Carries out ``RULES``: the worker's actions, then the request's failure (at once, or
    past the job's retries), else the job's action."""

    def __init__(
        self,
        config: BrokerConfig,
        clock: Callable[[], float],
        registry: WorkerRegistry,
        sessions: SessionTable,
        bindings: Bindings,
        trust: Trust,
        lifecycle: RequestLifecycle,
        metrics: CoreMetrics,
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry = registry
        self.sessions = sessions
        self.bindings = bindings
        self.trust = trust
        self.lifecycle = lifecycle
        self.metrics = metrics

    def apply(
        self,
        out: Outbox,
        failure: Failure,
        *,
        identity: bytes | None = None,
        worker: WorkerInfo | None = None,
        session: RequestSession | None = None,
        job: Job | None = None,
        detail: str = "",
        code: str | None = None,
        metric: str | None = None,
        principal: str | None = None,
    ) -> None:
        """Carry out ``failure``'s row. ``detail`` is the reason (logged, and the request's
        error message if it fails); ``code`` and ``metric`` refine the row's (a bad result's
        ``non_finite``). ``principal``, without a worker or session: whom a probe's verdict
        strikes (it may have left or reconnected since)."""
        rule = RULES[failure]
        if metric or rule.metric:
            self.metrics.failures[metric or rule.metric or ""] += 1
        if principal is not None and worker is None and session is None:
            if WorkerAction.STRIKE in rule.worker:
                self.strike(out, principal, detail)
            return
        if worker is not None:
            identity = worker.identity
        actions = rule.worker
        if failure is Failure.LATE_EVAL and session is not None and session.named:
            # On the data plane a late worker keeps the request: releasing it would throw
            # away every result it holds (recomputed by lineage). It gets no work until it
            # answers all the same (its job is late), and its copy runs elsewhere.
            actions = tuple(a for a in actions if a is not WorkerAction.RELEASE)
        if rule.job is JobAction.RECOMPUTE and worker is not None:  # before it leaves
            for each in list(self.sessions.values()):
                invalidate(each, worker.principal)
        for action in actions:
            self._on_worker(out, action, identity, worker, session, job, detail, metric)
        if session is None or session.id not in self.sessions:
            return
        fails = code or rule.fails
        if fails is not None and rule.at_once:
            self.lifecycle.fail(out, session, fails, detail)
            return
        if rule.counted and job is not None and self._over_retries(session, job):
            assert fails is not None
            self.lifecycle.fail(out, session, fails, detail)
            return
        if job is not None:
            self._on_job(rule.job, session, job)
        if rule.recheck:
            self.lifecycle.check_capacity(out, session, self.clock())

    def _over_retries(self, session: RequestSession, job: Job) -> bool:
        """Count one failure of ``job`` (per kind and id); True once it exceeds the retries."""
        failures = session.failures.get(job.key, 0) + 1
        session.failures[job.key] = failures
        return failures > self.config.max_task_retries

    def _on_worker(
        self,
        out: Outbox,
        action: WorkerAction,
        identity: bytes | None,
        worker: WorkerInfo | None,
        session: RequestSession | None,
        job: Job | None,
        detail: str,
        reason: str | None,
    ) -> None:
        if action in (WorkerAction.LOST, WorkerAction.DROP):
            assert identity is not None
            self._lost(identity, detail)
            if action is WorkerAction.DROP:
                out.to_worker(identity, DisconnectMessage(reason=detail))
            return
        if action is WorkerAction.NONE or worker is None or session is None:
            return
        if action is WorkerAction.RELEASE:
            self.bindings.unbind(out, worker, session)
        elif action is WorkerAction.EXCLUDE:
            self.bindings.unbind(out, worker, session, exclude=True)
        elif action is WorkerAction.UNPREPARED:
            self.bindings.unbind(None, worker, session)
        elif action is WorkerAction.MISSED:
            self.trust.missed_deadline(worker, self.clock())
        elif action is WorkerAction.STRIKE:
            self.strike(out, worker.principal, detail)
        elif action is WorkerAction.SUSPECT:
            session.bad_results += 1
            session.last_bad = reason or "bad_result"
            # Which dtype is right is known only where PREPARED declared it.
            known = reason != "dtype" or (
                session.declared is not None and session.declared.result_dtype is not None
            )
            if known and job is not None:
                for task, _ in job.tasks:
                    session.suspects.setdefault(task.id, set()).add(worker.principal)

    def _lost(self, identity: bytes, reason: str) -> None:
        worker = self.registry.remove(identity)
        if worker is None:
            return
        log.warning("worker %s lost: %s", worker.name, reason)
        self.metrics.failures["lost"] += 1
        self.bindings.forget_worker(identity, self.sessions.values())
        for session in self.sessions.values():
            session.worker_lost(identity)

    def _on_job(self, action: JobAction, session: RequestSession, job: Job) -> None:
        if action is JobAction.RERUN:
            if job.kind is Kind.PREPARE:
                self.bindings.not_preparing(session, job.worker)
                if job.initial:
                    session.x0_from = None
            elif job.kind is Kind.DECODE and job.decode is not None:
                session.media.failed(job.decode.decode_id)
            for task, attempt in job.tasks:
                session.tasks.requeue(task.id, attempt)
        elif action is JobAction.COPY:
            for task, _ in job.tasks:
                session.tasks.speculate(task.id)  # a copy; the first answer of the two wins
        elif action is JobAction.PREPARE_ANOTHER:
            session.x0_from = None

    def strike(self, out: Outbox, principal: str, why: str) -> None:
        """A suspect confirmed (another worker's result for its task passed): a strike; a
        worker it quarantines gives back everything it holds."""
        for worker in self.trust.strike(principal, why):
            self.bindings.release_worker(out, worker, self.sessions.values())
