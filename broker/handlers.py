"""One handler per message kind, by side: what the broker does with a worker's HELLO, PREPARED,
RESULT, DECODED, FAILED, HEARTBEAT and DISCONNECT, and with a client's SUBMIT, CANCEL, STATUS
and HEARTBEAT. Each takes the outbox, the sender (``Peer``) and the kind's own type, and keeps
nothing between calls; every failure goes through the failure policy (``broker.failures``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch

from chords_mq.algorithms.base import Hit, Ref, Task, all_finite
from chords_mq.broker.failures import Failure
from chords_mq.broker.links import host_of
from chords_mq.broker.outbox import Outbox
from chords_mq.broker.peers import Peer
from chords_mq.broker.probes import Outcome as ProbeOutcome
from chords_mq.broker.probes import Verdict
from chords_mq.broker.registry import Job, WorkerInfo
from chords_mq.broker.session import Declared, RequestSession
from chords_mq.broker.verify import Outcome, invalidate
from chords_mq.errors import BadResult, ChordsError, PlanProtocolError
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import Solver, solver_from_spec
from chords_mq.wire import (
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    HEARTBEAT_IDS,
    PROTOCOL_VERSION,
    STATUS_PAGE,
    AcceptedMessage,
    CancelMessage,
    ComparedMessage,
    DecodedMessage,
    DisconnectMessage,
    FailedMessage,
    HeartbeatMessage,
    HelloMessage,
    Kind,
    Message,
    PartMessage,
    PreparedMessage,
    ReleaseMessage,
    ResultMessage,
    StatusMessage,
    SubmitMessage,
    WelcomeMessage,
    tensor_digest,
)
from chords_mq.wire.base import is_uint
from chords_mq.wire.named import X0_REF, HeldResult

if TYPE_CHECKING:
    from chords_mq.broker.core import BrokerCore

log = logging.getLogger("chords.broker")
# Principals whose workers could not get one holder's copies in a request before the holder,
# not they, leaves it (``WorkerHandlers._unreachable``).
UNREACHABLE_PRINCIPALS = 2

Handler = Callable[[Outbox, Peer, Any], None]


class WorkerHandlers:
    """A worker's messages. Answers (PREPARED, RESULT, DECODED, FAILED) count only if they
    answer the worker's current job; anything else is stale and dropped."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self.by_kind: dict[Kind, Handler] = {
            Kind.HELLO: self._hello,
            Kind.HEARTBEAT: self._heartbeat,
            Kind.PREPARED: self._prepared,
            Kind.RESULT: self._result,
            Kind.DECODED: self._decoded,
            Kind.PART: self._part,
            Kind.FAILED: self._failed,
            Kind.COMPARED: self._compared,
            Kind.DISCONNECT: self._disconnect,
        }

    def _hello(self, out: Outbox, peer: Peer, message: HelloMessage) -> None:
        core, identity = self.core, peer.identity
        if message.protocol != PROTOCOL_VERSION:
            reason = f"protocol version {message.protocol} != {PROTOCOL_VERSION}"
            out.to_worker(identity, DisconnectMessage(reason=reason))
            return
        fields = ("worker", "model", "device", "dtype", "data", "device_class")
        too_long = [name for name in fields if len(getattr(message, name) or "") > 255]
        refusal = None
        if too_long:
            refusal = f"HELLO fields {too_long} are longer than 255 characters"
        elif message.data is not None and not message.data.startswith("tcp://"):
            refusal = f"HELLO: the data endpoint {message.data!r} is not tcp://HOST:PORT"
        if refusal is not None:
            core.peer_log.warning(("worker", identity), "refused a HELLO: %s", refusal)
            out.to_worker(identity, DisconnectMessage(reason=refusal))
            return
        previous = core.registry.get(identity)
        session_id = message.session or ""
        welcome = WelcomeMessage(
            heartbeat_ms=int(core.config.heartbeat_s * 1000), pool_keys=core.pool_keys
        )
        if (
            previous is not None
            and session_id
            and previous.session == session_id
            and previous.principal == peer.principal
        ):  # the same socket said HELLO again (a burst queued during a partition): idempotent
            previous.last_seen = core.clock()
            out.to_worker(identity, welcome)
            return
        if previous is None and len(core.registry.workers) >= core.config.max_workers:
            reason = f"busy: this broker takes at most {core.config.max_workers} workers"
            core.peer_log.warning(("busy", peer.principal), "refused a worker: %s", reason)
            out.to_worker(identity, DisconnectMessage(reason=reason))
            return
        if previous is not None and (
            previous.job is not None or previous.prepared or previous.principal != peer.principal
        ):
            # It reconnected while we thought it busy: whatever it held is gone.
            core.failures.apply(
                out, Failure.WORKER_LOST, identity=identity, detail="said HELLO again"
            )
        core.registry.hello(self._registration(peer, message, previous, session_id))
        out.to_worker(identity, welcome)

    def _registration(
        self,
        peer: Peer,
        message: HelloMessage,
        previous: WorkerInfo | None,
        session_id: str,
    ) -> WorkerInfo:
        core = self.core
        if previous is not None and previous.principal == peer.principal:
            alias = previous.alias  # a repeated HELLO (no WELCOME yet): the same worker
        else:
            alias = core.registry.new_alias()
        quarantined_until, strikes = core.trust.standing(peer.principal)
        info = WorkerInfo(
            peer.identity,
            message.worker,
            message.model,
            message.device,
            message.dtype,
            max(1, message.max_batch),
            last_seen=core.clock(),
            principal=peer.principal,
            alias=alias,
            quarantined_until=quarantined_until,
            bad_results=strikes,
            session=session_id,
            solver=message.solver,
            data=message.data,
            device_class=message.device_class,
            compares="compare" in (message.capabilities or ()),
            probes="probe" in (message.capabilities or ()),
            parts="parts" in (message.capabilities or ()),
        )
        log.info("worker %s joined: model %s on %s", info.name, info.model, info.device)
        if info.quarantined(core.clock()):
            log.warning("worker %s is quarantined (bad results): it gets no work", info.name)
        return info

    def _known(self, peer: Peer, message: Message) -> WorkerInfo | None:
        """The registered worker this message is from, if it is of the current epoch."""
        worker = self.core.registry.get(peer.identity)
        if worker is None or message.epoch != self.core.epoch:
            return None
        worker.last_seen = self.core.clock()
        return worker

    def _heartbeat(self, out: Outbox, peer: Peer, message: HeartbeatMessage) -> None:
        if self._known(peer, message) is None:
            reason = "unknown worker: send HELLO"
            out.to_worker(peer.identity, DisconnectMessage(reason=reason))

    def _disconnect(self, out: Outbox, peer: Peer, message: DisconnectMessage) -> None:
        if self.core.registry.get(peer.identity) is not None:
            detail = message.reason or "disconnected"
            self.core.failures.apply(
                out, Failure.WORKER_LOST, identity=peer.identity, detail=detail
            )

    def _job_of(self, peer: Peer, message: Message, kind: Kind) -> tuple[WorkerInfo, Job] | None:
        """The worker and its current job, which ``message`` is about; None if it is about
        nothing current (an old epoch, an old attempt, an old job): it is dropped."""
        worker = self._known(peer, message)
        job = worker.job if worker is not None else None
        if (
            worker is None
            or job is None
            or (kind is not Kind.FAILED and job.kind is not kind)
            or job.request != message.request
            or job.task != message.task
            or job.attempt != message.attempt
        ):
            return None  # Failure.STALE_ANSWER: dropped
        return worker, job

    def _answer(self, peer: Peer, message: Message, kind: Kind) -> tuple[WorkerInfo, Job] | None:
        """As ``_job_of``, for an answer: the job is cleared."""
        found = self._job_of(peer, message, kind)
        if found is not None:
            found[0].job = None
        return found

    def _answered(
        self, peer: Peer, message: Message, kind: Kind, ends: bool = True
    ) -> tuple[WorkerInfo, Job, RequestSession] | None:
        """As ``_answer``, with the request the job was for; None if that has ended too.
        ``ends`` False: a message that does not end the job (a PART), which stays."""
        found = self._answer(peer, message, kind) if ends else self._job_of(peer, message, kind)
        if found is None:
            return None
        worker, job = found
        session = self.core.sessions.get(job.request)
        return None if session is None else (worker, job, session)

    def _prepared(self, out: Outbox, peer: Peer, message: PreparedMessage) -> None:
        answered = self._answer(peer, message, Kind.PREPARE)
        if answered is None:
            return
        worker, job = answered
        core = self.core
        # what a PREPARE takes (late or not), for its deadline (``broker.deadlines``)
        core.deadlines.observe(worker, Kind.PREPARE, core.clock() - job.sent_at)
        session = core.sessions.get(job.request)
        if session is None:
            out.to_worker(peer.identity, ReleaseMessage(request=job.request))
            return
        core.bindings.bind(worker, session)  # so that whatever follows releases it too
        if not self._declared_fits(out, session, worker, job, message):
            return
        digest = message.x0_digest
        if session.x0_digest is not None:
            self._same_x0(out, session, worker.name, digest)
            return
        if not job.initial:
            session.digests[peer.identity] = (worker.name, digest)  # compared once x0 arrives
            return
        declared = session.declared
        if job.x0:
            try:
                x0, solver = _initial(message)
            except ChordsError as exc:
                self._bad_prepared(out, session, worker, job, str(exc))
                return
            shown = (tuple(x0.shape), x0.dtype)
            if declared is not None and shown != (declared.shape, declared.dtype):
                why = f"x0 is {list(x0.shape)} {x0.dtype}, not the latent PREPARED declared"
                self._bad_prepared(out, session, worker, job, why)
                return
            if self._too_large(out, session, x0.untyped_storage().nbytes()):  # undeclared
                return
        elif declared is None or not digest:
            self._x0_after_all(session, peer.identity, worker.name, digest)  # an older worker
            return
        else:
            # x0 stays on its worker (as on every prepared worker): the plan starts from a
            # stand-in of the declared shape and dtype, and x0 never crosses the broker
            try:
                solver = solver_from_spec(message.solver.fields, message.solver.tensors)
            except ChordsError as exc:
                self._bad_prepared(out, session, worker, job, str(exc))
                return
            x0 = torch.empty(declared.shape, dtype=declared.dtype, device="meta")
        # The data plane needs a data endpoint on every worker of the request (a worker of
        # protocol 7 always has one; the broker-core tests' fake workers may not).
        with_data = session.prepared | session.preparing | {worker.identity}
        session.data_plane = session.data_plane and all(
            (info := core.registry.get(identity)) is not None and info.data is not None
            for identity in with_data
        )
        try:
            started = session.start(x0, solver)
        except ChordsError as exc:
            self._bad_prepared(out, session, worker, job, str(exc))
            return
        if not started:  # the plan reads x0's values after all
            self._x0_after_all(session, peer.identity, worker.name, digest)
            return
        session.x0_digest, session.x0_source = digest, worker.name
        if not x0.is_meta:
            core.count_latents(session, x0.untyped_storage().nbytes())  # x0 crosses once
        early, session.digests = session.digests, {}
        for other in early:
            if other in session.prepared and session.id in core.sessions:
                self._same_x0(out, session, early[other][0], early[other][1])

    def _declared_fits(
        self,
        out: Outbox,
        session: RequestSession,
        worker: WorkerInfo,
        job: Job,
        message: PreparedMessage,
    ) -> bool:
        """Check the latent a PREPARED declares before any tensor of it is looked at: its
        size against the budget (too_large), the same latent as every other prepared worker
        declares (x0_mismatch); the first declaration sets the request's result dtype.
        False: the request or this worker is done with (a PREPARED that declares nothing, an
        older worker's, passes: x0's own size is checked)."""
        try:
            declared = _declared(message)
        except InvalidRequest as exc:
            self._bad_prepared(out, session, worker, job, str(exc))
            return False
        if declared is None:
            return True
        if self._too_large(out, session, declared.nbytes):
            return False
        if session.declared is None:
            session.declared = declared
            if session.result_dtype is None:
                session.result_dtype = declared.result_dtype
            return True
        if declared != session.declared:
            detail = (
                f"workers declare different latents for this request ({_shown(session.declared)}"
                f"; {worker.name}: {_shown(declared)}): their model, weights or device disagree"
            )
            self.core.failures.apply(out, Failure.X0_MISMATCH, session=session, detail=detail)
            return False
        return True

    @staticmethod
    def _x0_after_all(session: RequestSession, identity: bytes, name: str, digest: str) -> None:
        """A first PREPARED without x0's values, and the plan cannot start without them (an
        undeclared latent, a plan that reads its hits): the next PREPARE asks for x0 (the
        same worker, if it is idle first); this one's digest is compared once x0 arrives."""
        session.x0_values = True
        session.x0_from = None
        session.digests[identity] = (name, digest)

    def _too_large(self, out: Outbox, session: RequestSession, latent_bytes: int) -> bool:
        """Fail the request (too_large) if its working set of ``latent_bytes`` latents is over
        ``--max-request-bytes``."""
        config = self.core.config
        latents = session.spec.working_set_latents()
        working_set = latent_bytes * latents
        if working_set <= config.max_request_bytes:
            return False
        detail = (
            f"the request would hold about {working_set / 2**20:.0f} MiB of latents "
            f"({latents} x {latent_bytes / 2**20:.1f} MiB); this broker admits "
            f"{config.max_request_bytes / 2**20:.0f} MiB (--max-request-bytes)"
        )
        self.core.failures.apply(out, Failure.TOO_LARGE, session=session, detail=detail)
        return True

    def _same_x0(self, out: Outbox, session: RequestSession, name: str, digest: str) -> None:
        """Every worker prepared for a request must start it from the same initial latent, bit
        for bit; otherwise the request stops, naming both workers."""
        if digest != session.x0_digest:
            detail = (
                f"workers {session.x0_source} and {name} computed different initial latents for "
                "this request (their model, weights or device disagree); it cannot run on both"
            )
            self.core.failures.apply(out, Failure.X0_MISMATCH, session=session, detail=detail)

    def _bad_prepared(
        self, out: Outbox, session: RequestSession, worker: WorkerInfo, job: Job, why: str
    ) -> None:
        log.warning("worker %s sent request %s a bad PREPARED: %s", worker.name, session.id, why)
        self.core.failures.apply(
            out,
            Failure.BAD_PREPARED,
            worker=worker,
            session=session,
            job=job,
            detail=f"worker {worker.name}: {why}",
        )

    def _result(self, out: Outbox, peer: Peer, message: ResultMessage) -> None:
        answered = self._answered(peer, message, Kind.EVAL)
        if answered is None:
            return
        worker, job, session = answered
        if job.chain and len(job.tasks) > 1:  # a chain's RESULT answers its head alone
            whole, job = job, dataclasses.replace(job, tasks=job.tasks[:1])
            went_in = self._head_result(out, worker, job, session, message)
            self._chain_goes_on(worker, whole, session, went_in)
            return
        self._head_result(out, worker, job, session, message)

    def _chain_goes_on(
        self, worker: WorkerInfo, whole: Job, session: RequestSession, went_in: bool
    ) -> None:
        """A chain's head answered: the rest stays the worker's job (it runs them next) while
        the head's result went in and each of the rest still runs there; else they run again
        elsewhere or, not ready yet, are taken back (``RequestSession.take_back``)."""
        core = self.core
        rest = whole.tasks[1:]
        if session.id not in core.sessions:
            return
        goes_on = (
            went_in
            and worker.job is None
            and core.registry.get(worker.identity) is worker
            and all(session.current(task.id, a) is task for task, a in rest)
            and worker.identity in session.prepared
        )
        if not goes_on:
            session.take_back(rest)
            return
        each = core.registry.expected(worker, (session.latent_bytes, 1))
        worker.job = dataclasses.replace(
            whole,
            tasks=rest,
            sent_at=core.clock(),
            expected_s=None if each is None else each * len(rest),
            chain=len(rest) > 1,
        )

    def _head_result(
        self,
        out: Outbox,
        worker: WorkerInfo,
        job: Job,
        session: RequestSession,
        message: ResultMessage,
    ) -> bool:
        """The RESULT of ``job`` (of a chain, its head alone: ``_chain_goes_on`` decides the
        rest). True if its result went in."""
        core = self.core
        if job.tasks:  # the speed model: what one EVAL of this size took, seen from here
            seconds = own = core.clock() - job.sent_at
            if message.fetched:  # its inputs' transfers teach the links (``broker.links``)
                core.links.learn(host_of(worker.data, worker.identity), message.fetched)
                if core.dispatcher.links is not None:  # placement counts them: compute only
                    fetched_s = sum(fetch.seconds for fetch in message.fetched)
                    own = max(seconds - fetched_s, seconds / 10)
            worker.observe((session.latent_bytes, len(job.tasks)), own, cold=bool(message.cold))
            core.metrics.task_seconds.observe(seconds)
            if not job.late:
                worker.missed = 0
        try:
            current = _current_results(session, job, message)
        except BadResult as exc:  # well-formed, but wrong data: a faulty GPU, or a bad actor
            self._bad_result(out, session, worker, job, exc)
            return False
        except PlanProtocolError as exc:  # a broken worker
            log.error("worker %s sent a bad answer: %s", worker.name, exc)
            core.failures.apply(out, Failure.BROKEN_ANSWER, worker=worker, detail=str(exc))
            return False
        if session.named and worker.identity not in session.prepared:
            current = []  # released from the request (late, say): it keeps none of it
        if not current:
            return False  # stale: re-run elsewhere already
        if not session.named:
            core.count_latents(
                session, sum(t.numel() * t.element_size() for _, r in current for t in r.values())
            )
        worker.completed += len(current)
        session.forwards += 1
        compute_s = message.compute_s or 0.0
        session.compute_s += float(compute_s) if math.isfinite(compute_s) else 0.0
        for task, results in current:
            for suspect in session.suspects.pop(task.id, ()):
                why = f"its result for task {task.id} of {session.id} was bad"
                core.failures.strike(out, suspect, why)
            if session.named or session.verify:  # (verified: ``broker.verify``)
                hits = self._verified(out, session, worker, task, results)
                if session.id not in core.sessions:
                    return True
            else:
                hits = session.complete(task, results)
            core.lifecycle.released(out, session, hits)
        core.lifecycle.after_progress(out, session)
        return True

    def _verified(
        self,
        out: Outbox,
        session: RequestSession,
        worker: WorkerInfo,
        task: Task,
        results: Mapping[int, HeldResult] | Mapping[int, torch.Tensor],
    ) -> list[Hit]:
        """Results through verification (held by name, or off the data plane the tensors):
        the hits the plan released, if any; an outvoted worker's strike, and a task no
        majority settles, through the failure table."""
        core = self.core
        now = core.clock()
        if session.named:
            held = cast(Mapping[int, HeldResult], results)
            outcome = core.verification.answered(session, worker, task, held, now)
        else:
            tensors = cast(Mapping[int, torch.Tensor], results)
            outcome = core.verification.answered(session, worker, task, None, now, tensors)
        return self.verified(out, session, outcome, task.id)

    def verified(
        self, out: Outbox, session: RequestSession, outcome: Outcome, task: int
    ) -> list[Hit]:
        """What a check's step led to: a COMPARE to send, strikes, a task unsettled (the
        failure table), and the hits released."""
        core = self.core
        if outcome.compare is not None:
            out.to_worker(*outcome.compare)
        late = None if outcome.late is None else core.registry.get(outcome.late)
        if late is not None:  # its COMPARE missed the deadline: a missed deadline of its own
            core.trust.missed_deadline(late, core.clock())
        for answer in outcome.outvoted:
            settled = task if outcome.task is None else outcome.task
            self.outvoted(out, session, answer.identity, answer.principal, settled)
        if outcome.unsettled is not None:
            detail = (
                f"the results of task {outcome.unsettled.task.id} from "
                f"{len(outcome.unsettled.answers)} workers disagree, with no majority"
            )
            core.failures.apply(out, Failure.UNVERIFIABLE, session=session, detail=detail)
        return outcome.hits

    def _probe(
        self, out: Outbox, session: RequestSession, holder: WorkerInfo, ref: Ref, digest: str | None
    ) -> None:
        """Fetchers of two principals say ``holder`` served other bytes of ``ref`` than
        ``digest``: a worker of a third principal fetches its copy (``broker.probes``)."""
        core = self.core
        dtype = DTYPE_NAMES.get(session.result_dtype) if session.result_dtype else None
        sent = core.probes.start(
            holder,
            core.trust.claimants(holder.principal),
            session.id,
            ref,
            digest,
            dtype or "float32",  # (the prober takes what arrives, of any dtype)
        )
        if sent is not None:
            out.to_worker(*sent)

    def judged(self, out: Outbox, verdict: Verdict) -> None:
        """A probe's verdict through the failure table: confirmed, the holder is struck;
        refuted, each claimant is a suspect and one refuted about holders of two principals is
        struck; no verdict, nobody (the claims stay, and a later one may probe again)."""
        core, probe = self.core, verdict.probe
        detail = f"probe of {probe.ref} at worker {probe.holder_name}: {verdict.why}"
        if verdict.outcome is ProbeOutcome.NO_VERDICT:
            return
        core.trust.judged(probe.holder)
        if verdict.outcome is ProbeOutcome.CONFIRMED:
            log.error("worker %s served corrupt data, confirmed: %s", probe.holder_name, detail)
            core.failures.apply(out, Failure.CORRUPT_INPUT, principal=probe.holder, detail=detail)
            return
        log.warning("corrupt_input claims refuted: %s; the claimants are suspects", detail)
        for claimant in sorted(probe.claimants):
            core.verification.records.outvoted(claimant)
            core.failures.apply(out, Failure.CLAIM_REFUTED, principal=claimant, detail=detail)
        for claimant in verdict.struck:
            core.failures.apply(out, Failure.FALSE_CLAIMS, principal=claimant, detail=detail)

    def _compared(self, out: Outbox, peer: Peer, message: ComparedMessage) -> None:
        """A COMPARE's distances (``broker.verify``, across device classes), or a probe's
        digests (``broker.probes``); stale ones are dropped."""
        core = self.core
        worker = self._known(peer, message)
        if worker is None:
            return
        verdict = core.probes.answered(worker, message)
        if verdict is not None:
            self.judged(out, verdict)
            return
        session = core.sessions.get(message.request or "")
        if session is None:
            return
        outcome = core.verification.compared(session, worker, message, core.clock())
        if outcome is None:
            return
        hits = self.verified(out, session, outcome, message.task or 0)
        if session.id not in core.sessions:
            return
        core.lifecycle.released(out, session, hits)
        core.lifecycle.after_progress(out, session)

    def outvoted(
        self, out: Outbox, session: RequestSession, identity: bytes, principal: str, task: int
    ) -> None:
        """Other workers' digests outvoted this worker's result (the failure table's row; a
        worker gone meanwhile still gets the strike, and its results are recomputed)."""
        core = self.core
        core.verification.records.outvoted(principal)
        why = f"its result for task {task} of {session.id} was outvoted by two other workers'"
        core.peer_log.warning(("outvoted", principal), "worker %s: %s", principal[:64], why)
        info = core.registry.get(identity)
        session.tasks.worker_lost(identity)  # what it runs for the request runs elsewhere
        session.media.worker_lost(identity)
        if info is not None and info.principal == principal:
            core.failures.apply(out, Failure.OUTVOTED, worker=info, session=session, detail=why)
            return
        for each in list(core.sessions.values()):
            invalidate(each, principal)
        core.failures.strike(out, principal, why)

    def _bad_result(
        self, out: Outbox, session: RequestSession, worker: WorkerInfo, job: Job, exc: BadResult
    ) -> None:
        """A result that failed the checks: the plan never sees it (the failure policy's
        BAD_RESULT row)."""
        self.core.peer_log.warning(
            ("bad", worker.principal),
            "worker %s: bad result (%s) for request %s: %s",
            worker.name,
            exc.reason,
            session.id,
            exc,
        )
        self.core.failures.apply(
            out,
            Failure.BAD_RESULT,
            worker=worker,
            session=session,
            job=job,
            detail=f"{job.kind.value} {job.task}: {exc} (from every worker tried)",
            code="non_finite" if exc.reason == "non_finite" else None,
            metric=exc.reason,
        )

    def _decoded(self, out: Outbox, peer: Peer, message: DecodedMessage) -> None:
        answered = self._answered(peer, message, Kind.DECODE)
        if answered is None or answered[1].decode is None:
            return
        worker, job, session = answered
        assert job.decode is not None
        core = self.core
        # what a DECODE takes (late or not), for its deadline
        core.deadlines.observe(worker, Kind.DECODE, core.clock() - job.sent_at)
        if session.wants_media and message.media is None:
            detail = "workers returned no media for a hit"
            core.failures.apply(out, Failure.NO_MEDIA, session=session, job=job, detail=detail)
            return
        latent = message.latent
        if job.stream is not None:  # its pieces went on to the client as they came
            if not session.media.decoding(job.decode.decode_id, worker.identity):
                return  # the hit was redone meanwhile: its pieces were dropped, and so is this
            stream, expected = job.stream, _hit_digest(session, job.decode.hit)
            why, reason = stream.finish(message.parts), "parts"
            digest = stream.digest()
            if why is None and expected is not None and digest is not None and digest != expected:
                why = f"DECODE {job.decode.decode_id}: a hit's latent other than its holders'"
                reason = "digest"
            if why is not None:
                self._bad_result(out, session, worker, job, BadResult(reason, why))
                return
            decode_id = job.decode.decode_id
            core.lifecycle.media_arrived(out, session, decode_id, message.media, parts=stream.parts)
            core.lifecycle.after_progress(out, session)
            return
        if session.named and session.spec.output != "media":
            if latent is None or not _is_hit_latent(session, latent):
                detail = "workers returned no usable latent for a hit"
                core.failures.apply(out, Failure.NO_MEDIA, session=session, job=job, detail=detail)
                return
            core.count_latents(session, latent.numel() * latent.element_size())
            expected = _hit_digest(session, job.decode.hit)
            if expected is not None and tensor_digest(latent) != expected:  # (not what is held)
                why = f"DECODE {job.decode.decode_id}: a hit's latent other than its holders'"
                self._bad_result(out, session, worker, job, BadResult("digest", why))
                return
        core.lifecycle.media_arrived(out, session, job.decode.decode_id, message.media, latent)
        core.lifecycle.after_progress(out, session)

    def _part(self, out: Outbox, peer: Peer, message: PartMessage) -> None:
        """A piece of the hit's latent a DECODE asked in pieces (``broker.parts``): checked,
        then sent on to the client at once. A bad piece ends the decode as a bad result (the
        hit is decoded elsewhere; its first piece tells the client to start over)."""
        current = self._answered(peer, message, Kind.DECODE, ends=False)
        if current is None:
            return
        worker, job, session = current
        assert job.decode is not None
        if not session.media.decoding(job.decode.decode_id, worker.identity):
            return  # a decode the hit no longer waits for (redone under another id): dropped
        wrong = (
            "a PART for a DECODE that asked for the latent whole"
            if job.stream is None
            else job.stream.take(message)
        )
        if wrong is not None:
            worker.job = None  # (its DECODED, if it comes, is stale)
            why = f"DECODE {job.decode.decode_id}: {wrong}"
            self._bad_result(out, session, worker, job, BadResult("parts", why))
            return
        self.core.count_latents(session, message.data.numel())
        session.parts_sent += 1
        piece = PartMessage(
            index=message.index,
            parts=message.parts,
            data=message.data,
            core=job.decode.hit.core,
            request=session.client_id,
            task=job.decode.decode_id,  # the client keeps one decode's pieces per core
        )
        out.to_client(session.client, piece)

    def _unreachable(
        self, out: Outbox, session: RequestSession, holder: WorkerInfo, claimant: WorkerInfo
    ) -> bool:
        """``claimant`` could not get a copy ``holder`` keeps for ``session`` (FAILED
        lost_input). Once workers of two principals could not, in the request, the holder is
        the one that fails them (a firewalled data port, a dead data thread): it leaves the
        request (the failure table's "FAILED lost_input, from two principals"), its copies are
        recomputed, and its task of the request runs again elsewhere. True then. One
        principal's claims alone never make a holder leave: past ``--max-lost-inputs`` the
        claimant does ("FAILED lost_input, too often")."""
        if holder.identity not in session.prepared:
            return False  # gone from the request already: its copies count as lost anyway
        by = session.unreachable.setdefault(holder.identity, set())
        by.add(claimant.principal)
        if len(by) < UNREACHABLE_PRINCIPALS:
            return False
        del session.unreachable[holder.identity]
        job = holder.job
        detail = f"workers of {len(by)} principals could not get its copies"
        self.core.failures.apply(
            out, Failure.HOLDER_UNREACHABLE, worker=holder, session=session, detail=detail
        )
        if job is not None and job.request == session.id:  # what it runs there runs again
            session.worker_lost(holder.identity)
            holder.job = None  # (its answer, if any, is stale)
        return True

    def _failed(self, out: Outbox, peer: Peer, message: FailedMessage) -> None:
        answered = self._answered(peer, message, Kind.FAILED)
        if answered is None:
            return
        worker, job, session = answered
        core = self.core
        named = list(message.tasks)
        asked = job.tasks[:1] if job.chain else job.tasks  # (a chain fails at its head)
        if job.kind is Kind.EVAL and named and named != [(t.id, a) for t, a in asked]:
            log.warning("worker %s: FAILED names other tasks than its EVAL", worker.name)
        failure = {
            "invalid_request": Failure.INVALID_REQUEST,
            "not_prepared": Failure.NOT_PREPARED,  # its cache evicted the request
        }.get(message.code, Failure.WORKER_ERROR)
        by_name = message.code in ("lost_input", "corrupt_input") and session.named
        lost = _lost_ref(message) if by_name else None
        if lost is not None:  # no holder gave an input: that holder lost it, recompute it
            # A claim nothing can confirm or refute (no holder gave it; or, verifying nothing,
            # a copy with no digest) is counted: past the bound it costs no recomputation.
            # (Verifying, a corrupt_input claim goes to a probe: ``broker.probes``.)
            unprovable = message.code == "lost_input" or not session.verify
            holder = core.registry.by_data(message.lost_holder)
            # the holder leaves, not the claimant, once two principals could not get its
            # copies: then the claim is not held against the claimant
            blamed = (
                message.code == "lost_input"
                and holder is not None
                and holder is not worker
                and self._unreachable(out, session, holder, worker)
            )
            claims = session.lost_inputs.get(worker.identity, 0) + (unprovable and not blamed)
            session.lost_inputs[worker.identity] = claims
            leaves: tuple[Failure, str] | None = None  # the copy stays, the claimant goes
            if unprovable and claims > core.config.max_lost_inputs:
                leaves = (Failure.INPUTS_UNREACHABLE, f"{claims} inputs {worker.name} lacked")
            elif (
                message.code == "corrupt_input"
                and holder is not None
                and core.probes.disbelieved(worker.principal, holder.principal)
            ):  # a probe refuted its word about this holder
                why = f"from {worker.name}, refuted about {holder.name}"
                leaves = (Failure.CLAIM_DISBELIEVED, why)
            if leaves is not None:
                failure, why = leaves
                detail = f"{message.message[:300]} ({why})"
                core.failures.apply(
                    out, failure, worker=worker, session=session, job=job, detail=detail
                )
                return
            # what the holder reported of it, before its copy is forgotten: a probe checks it
            reported = None if holder is None else session.directory.digest(lost, holder.identity)
            # No digest named for that copy (--verify off: results carry none, the pool is
            # trusted): its fetcher checked nothing, so there is nothing to confirm or refute: no
            # suspect, no claim, no probe, no strike; the copy counts as lost, as lost_input's.
            checked = (session.x0_digest or None) if lost == X0_REF else reported
            session.input_lost(lost, None if holder is None else holder.identity)
            failure = Failure.LOST_INPUT
            if message.code == "corrupt_input" and checked is None:
                log.info("worker %s: corrupt_input of a copy with no digest: lost", worker.name)
            elif message.code == "corrupt_input":  # it served other bytes than it reported
                why = f"{message.message[:300]} (served to {worker.name})"
                if holder is not None:  # a suspect again: its tasks are replicated from zero
                    session.accuse(holder.identity)  # and it recomputes nothing of this request
                    core.verification.records.outvoted(holder.principal)
                    if core.trust.corrupt_claim(holder.principal, worker.principal):
                        self._probe(out, session, holder, lost, reported)  # two principals say so
                    key = ("corrupt", holder.principal)
                    core.peer_log.warning(
                        key, "worker %s served corrupt data: %s", holder.name, why
                    )
                # one fetcher's word, which may be a lie: only a probe's verdict strikes
                core.failures.apply(
                    out, Failure.CORRUPT_CLAIM, worker=holder, session=session, job=job, detail=why
                )
                return
        if failure is Failure.WORKER_ERROR:
            core.peer_log.warning(
                ("failed", worker.principal),
                "worker %s failed %s %s: %s",
                worker.name,
                job.kind.value,
                job.request,
                message.message[:500],
            )
        core.failures.apply(
            out, failure, worker=worker, session=session, job=job, detail=message.message
        )


def _initial(message: PreparedMessage) -> tuple[Any, Solver]:
    """The initial latent and the solver of a PREPARED asked for x0; InvalidRequest (or the
    solver's own error) if either is unusable."""
    x0 = message.x0
    if x0 is None or not x0.is_floating_point():
        raise InvalidRequest("PREPARED carries no floating-point initial latent x0")
    if not all_finite(x0):
        raise InvalidRequest("the initial latent x0 has NaN or Inf")
    if tensor_digest(x0) != message.x0_digest:
        raise InvalidRequest("x0_digest is not the digest of the x0 it sent")
    return x0, solver_from_spec(message.solver.fields, message.solver.tensors)


def _declared(message: PreparedMessage) -> Declared | None:
    """The latent a PREPARED declares (None if it declares none); InvalidRequest if the
    declaration is malformed."""
    if message.shape is None and message.dtype is None and message.result_dtype is None:
        return None
    shape, dtype = message.shape, DTYPES.get(message.dtype or "")
    if not (
        isinstance(shape, list)
        and 1 <= len(shape) <= DEFAULT_LIMITS.max_ndim
        and all(is_uint(size) and size > 0 for size in shape)
    ):
        raise InvalidRequest(f"PREPARED declares a malformed latent shape {str(shape)[:100]}")
    if dtype is None or not dtype.is_floating_point:
        raise InvalidRequest(f"PREPARED declares a latent dtype {str(message.dtype)[:40]!r}")
    result = None
    if message.result_dtype is not None:
        result = DTYPES.get(message.result_dtype)
        if result is None or not result.is_floating_point:
            raise InvalidRequest(
                f"PREPARED declares a result dtype {str(message.result_dtype)[:40]!r}"
            )
    return Declared(tuple(shape), dtype, result)


def _shown(declared: Declared) -> str:
    result = "" if declared.result_dtype is None else f", results {declared.result_dtype}"
    return f"{list(declared.shape)} {declared.dtype}{result}"


def _current_results(
    session: RequestSession, job: Job, message: ResultMessage
) -> list[tuple[Any, Any]]:
    """The RESULT's entries that answer a current attempt, each checked (BadResult if its data
    fails; PlanProtocolError if it answers other tasks than its EVAL carried, or by tensors
    what was asked by name, or the other way round)."""
    entries = message.entries
    if [(e.task, e.attempt) for e in entries] != [(t.id, a) for t, a in job.tasks]:
        raise PlanProtocolError("RESULT answers other tasks than its EVAL carried")
    current: list[tuple[Any, Any]] = []
    for entry in entries:
        if (entry.held is not None) != session.named:
            raise PlanProtocolError(
                "RESULT by name for an EVAL of tensors"
                if entry.held is not None
                else "RESULT of tensors for an EVAL by name"
            )
        task = session.current(entry.task, entry.attempt)
        if task is None:
            continue
        if entry.held is not None:
            session.check_held(task, entry.held)
            current.append((task, entry.held))
        else:
            session.check(task, entry.results)
            current.append((task, entry.results))
    return current


def _lost_ref(message: FailedMessage) -> Ref | None:
    """The input a FAILED lost_input names, if it is a well-formed [task, target]."""
    ref = message.lost_ref
    if not (isinstance(ref, list) and len(ref) == 2 and all(is_uint(v) for v in ref)):
        return None
    return Ref(ref[0], ref[1])


def _hit_digest(session: RequestSession, hit: Hit) -> str | None:
    """The digest a DECODE by name must return a hit's latent with, where the hit is one held
    result (a ``Ref``): the one its holders reported (verified as any result is). None for an
    operation on several (its decoder computes it: not checked) or no digest known (with
    --verify off results carry none: the pool is trusted, the latent is not checked)."""
    if not isinstance(hit.latent, Ref):
        return None
    directory = session.directory
    digests = {directory.digest(hit.latent, holder) for holder in directory.holders(hit.latent)}
    digests.discard(None)
    return digests.pop() if len(digests) == 1 else None


def _is_hit_latent(session: RequestSession, latent: Any) -> bool:
    """A hit's latent from a DECODE by name: the request's shape and dtype, finite."""
    return (
        tuple(latent.shape) == session.latent_shape
        and (session.result_dtype is None or latent.dtype == session.result_dtype)
        and all_finite(latent)
    )


class ClientHandlers:
    """A client's messages. A client sees, cancels and resubmits only its own requests (an
    admin key's STATUS: everyone's)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self.by_kind: dict[Kind, Handler] = {
            Kind.SUBMIT: self._submit,
            Kind.CANCEL: self._cancel,
            Kind.STATUS: self._status,
            Kind.HEARTBEAT: self._heartbeat,
        }

    def _submit(self, out: Outbox, peer: Peer, message: SubmitMessage) -> None:
        core, identity, request_id = self.core, peer.identity, message.request
        if request_id is None:
            out.client_error(identity, "bad_message", "SUBMIT needs a request id", None)
            return
        if core.draining:
            out.client_error(identity, "draining", "the broker is shutting down", request_id)
            return
        existing = core.sessions.owned(peer.principal, request_id)
        if existing is not None:  # the owner's resubmission (maybe from a new connection)
            existing.client = identity
            existing.hit_parts = bool(message.hit_parts)
            out.to_client(identity, self._accepted(existing))
            return
        try:
            spec = RequestSpec.from_dict(message.spec)
        except (InvalidRequest, TypeError) as exc:
            out.client_error(identity, "invalid_request", str(exc), request_id)
            return
        wait = message.wait_for_worker_s
        refusal = core.admission.refusal(peer, request_id, spec, wait)
        if refusal is not None:
            out.to_client(identity, refusal)
            return
        asked = spec.resolved_cores()
        spec = core.admission.grant(spec)
        session = RequestSession(
            core.sessions.new_id(),
            identity,
            spec,
            core.clock,
            core.config.max_request_bytes,
            peer.principal,
            request_id,
            asked_cores=asked,
            wait_for_worker_s=None if wait is None else float(wait),
            data_plane=core.config.data_plane,
            max_replays=core.config.max_replays,
            verify=core.config.verify != "off",
        )
        session.hit_parts = bool(message.hit_parts)
        core.sessions.add(session)
        log.info(
            "request %s (%s): %s %s, %d steps, %d of %d cores",
            session.id,
            request_id[:64],
            spec.model,
            spec.method,
            spec.steps,
            spec.resolved_cores(),
            asked,
        )
        out.to_client(identity, self._accepted(session))

    def _accepted(self, session: RequestSession) -> AcceptedMessage:
        spec = session.spec
        sequence = spec.resolved_init_sequence()
        return AcceptedMessage(
            steps=spec.steps,
            method=spec.method,
            hit_rounds=[list(pair) for pair in spec.expected_hit_rounds()],
            init_sequence=None if sequence is None else list(sequence),
            cores=spec.resolved_cores(),  # granted (the cores policy)
            requested_cores=session.asked_cores,
            workers=len(self.core.registry.serving(spec.model, self.core.clock())),
            request=session.client_id,
        )

    def _cancel(self, out: Outbox, peer: Peer, message: CancelMessage) -> None:
        session = self.core.sessions.owned(peer.principal, message.request)
        if session is not None:
            self.core.lifecycle.cancel(out, session)

    def _status(self, out: Outbox, peer: Peer, message: StatusMessage) -> None:
        """The workers (by alias, unless asked by an admin) and the asker's own requests (an
        admin's: everyone's), one page of ``STATUS_PAGE`` each from ``offset``."""
        core, admin = self.core, peer.admin
        offset = max(0, message.offset or 0)
        now = core.clock()
        workers = list(core.registry.workers.values())
        sessions = [s for s in core.sessions.values() if admin or s.owner == peer.principal]
        page = slice(offset, offset + STATUS_PAGE)
        shown = []
        for session in sessions[page]:
            summary = session.summary()
            summary["id"] = session.client_id
            if admin:
                summary["owner"] = session.owner
            shown.append(summary)
        reply = StatusMessage(
            workers=[w.summary(now, admin) for w in workers[page]],
            sessions=shown,
            status_epoch=core.epoch,
            offset=offset,
            workers_total=len(workers),
            sessions_total=len(sessions),
            role=peer.role,
        )
        out.to_client(peer.identity, reply)

    def _heartbeat(self, out: Outbox, peer: Peer, message: HeartbeatMessage) -> None:
        """Answer with the request ids (of those the client lists) the broker does not run."""
        listed = (message.in_flight or [])[:HEARTBEAT_IDS]
        missing = [
            rid
            for rid in listed
            if isinstance(rid, str) and self.core.sessions.owned(peer.principal, rid) is None
        ]
        out.to_client(peer.identity, HeartbeatMessage(missing=missing))
