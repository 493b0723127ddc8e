"""A request from its acceptance to its end, as its client sees it: hits in release order
(after their media, when it asked for pictures), progress, the notice that it waits for a
worker, and its last message (DONE or ERROR), which also releases every worker that holds it.

Each step moves the session through its declared states (``broker.states``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from chords_mq.algorithms.base import Hit, as_tensor
from chords_mq.broker.bindings import Bindings
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.metrics import CoreMetrics
from chords_mq.broker.outbox import Outbox
from chords_mq.broker.registry import WorkerRegistry
from chords_mq.broker.session import PendingHit, RequestSession
from chords_mq.broker.sessions import SessionTable
from chords_mq.broker.states import RequestEvent, RequestState
from chords_mq.wire import DTYPE_NAMES, DoneMessage, ErrorMessage, HitMessage, ProgressMessage

log = logging.getLogger("chords.broker")


class RequestLifecycle:
    def __init__(
        self,
        config: BrokerConfig,
        clock: Callable[[], float],
        sessions: SessionTable,
        registry: WorkerRegistry,
        bindings: Bindings,
        metrics: CoreMetrics,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sessions = sessions
        self.registry = registry
        self.bindings = bindings
        self.metrics = metrics

    # -- hits and progress ---------------------------------------------------------------------

    def released(self, out: Outbox, session: RequestSession, hits: list[Hit]) -> None:
        """Hits the plan just released: out at once, or (output media) once decoded."""
        if session.wants_media or session.named:
            # HITs go out once decoded (by name: once a worker holding their inputs computed
            # them), still in order
            session.media.add(hits)
            return
        for hit in hits:
            self._send_hit(out, session, hit, None)

    def media_arrived(
        self,
        out: Outbox,
        session: RequestSession,
        decode_id: int,
        media: torch.Tensor | None,
        latent: torch.Tensor | None = None,
        parts: int | None = None,
    ) -> None:
        """A decode answered (``parts``: its latent went to the client in that many PARTs):
        the hits now deliverable go out, in release order."""
        pending: list[PendingHit] = session.media.arrived(decode_id, media, latent, parts)
        for item in pending:
            hit = (
                item.hit
                if item.latent is None
                else dataclasses.replace(item.hit, latent=item.latent)
            )
            pieces = None if item.parts is None else (item.parts, item.decode_id)
            self._send_hit(out, session, hit, item.media, pieces)

    def _send_hit(
        self,
        out: Outbox,
        session: RequestSession,
        hit: Hit,
        media: torch.Tensor | None,
        parts: tuple[int, int] | None = None,
    ) -> None:
        """A HIT to the client; ``parts``: its latent went before it in that many PARTs, of
        that decode (the client assembles the pieces of that decode only)."""
        session.hits_sent += 1
        if hit.core != 0:  # the zero-th hit is the coarse chain's, not a core's
            session.core_hits += 1
            self.metrics.hit(session.core_hits, session.elapsed())
        whole = session.spec.output != "media" and parts is None
        dtype = session.result_dtype
        message = HitMessage(
            core=hit.core,
            round=hit.round,
            steps=session.spec.steps,
            elapsed_s=session.elapsed(),
            latent=as_tensor(hit.latent) if whole else None,
            media=media,
            parts=None if parts is None else parts[0],
            shape=None if parts is None else list(session.latent_shape),
            dtype=None if parts is None or dtype is None else DTYPE_NAMES[dtype],
            request=session.client_id,
            task=None if parts is None else parts[1],
        )
        out.to_client(session.client, message)

    def after_progress(self, out: Outbox, session: RequestSession) -> None:
        """After a result or a decode: DONE if every hit is delivered, else (at most every
        ``progress_interval_s``) a PROGRESS."""
        if session.done:
            session.transition(RequestEvent.DELIVERED)
            done = DoneMessage(stats=session.stats(), request=session.client_id)
            self.finish(out, session, done)
            return
        plan = session.plan
        if plan is not None and plan.done and session.state is RequestState.RUNNING:
            session.transition(RequestEvent.RELEASED)  # every hit out of the plan; media due
        now = self.clock()
        if session.latent_bytes >= 8 << 20 or session.evaluations % 16 == 0:
            session.held_bytes()  # samples the peak (stats' peak_bytes): always for big latents
        if now - session.last_progress >= self.config.progress_interval_s:
            session.held_bytes()
            self.progress(out, session)

    def progress(self, out: Outbox, session: RequestSession) -> None:
        """A PROGRESS to the request's client; while it waits for a worker, it says so
        (``waiting``: the model, since when, and how long before it fails)."""
        now = self.clock()
        session.last_progress = now
        waiting = None
        if session.no_worker_since is not None:
            fails_at = session.no_worker_since + self.patience(session)
            waiting = {
                "for": "worker",
                "model": session.model,
                "since_s": round(now - session.no_worker_since, 3),
                "fails_in_s": round(max(0.0, fails_at - now), 3),
            }
        body = session.progress()
        message = ProgressMessage(**body, waiting=waiting, request=session.client_id)
        out.to_client(session.client, message)

    # -- waiting for a worker ------------------------------------------------------------------

    def patience(self, session: RequestSession) -> float:
        """How long ``session`` waits for a worker: its own ``wait_for_worker_s``, else
        ``--worker-timeout``."""
        if session.wait_for_worker_s is not None:
            return session.wait_for_worker_s
        return self.config.worker_timeout_s

    def check_capacity(self, out: Outbox, session: RequestSession, now: float) -> None:
        """Is a worker there for ``session``? If none is, its client is told at once and the
        request fails after its patience; if every one there gave it bad results, at once."""
        serving = self.registry.serving(session.model, now)
        capable = [w for w in serving if w.identity not in session.excluded]
        if capable:
            if session.no_worker_since is not None:  # one (re)joined: the wait is over
                session.no_worker_since = None
                self.progress(out, session)
            return
        if serving and session.last_bad:  # every worker there is gave it a bad result
            code = "non_finite" if session.last_bad == "non_finite" else "bad_result"
            self.fail(
                out,
                session,
                code,
                f"no healthy worker produced a usable result ({session.bad_results} bad results, "
                f"last: {session.last_bad}); the request itself may diverge",
            )
            return
        patience = self.patience(session)
        if session.no_worker_since is None:
            session.no_worker_since = now
            # Tell the client at once: its request waits, and fails after ``patience``.
            log.info(
                "request %s waits for a worker of model %r (up to %gs)",
                session.id,
                session.model,
                patience,
            )
            self.progress(out, session)
        elif now - session.no_worker_since > patience:
            self.fail(
                out,
                session,
                "no_worker",
                f"no worker serves model {session.model!r} (waited {patience:g}s)",
            )

    # -- the end -------------------------------------------------------------------------------

    def fail(self, out: Outbox, session: RequestSession, code: str, text: str) -> None:
        log.warning("request %s failed (%s): %s", session.id, code, text)
        self.finish(out, session, ErrorMessage(code=code, message=text, request=session.client_id))

    def cancel(self, out: Outbox, session: RequestSession, tell_client: bool = True) -> None:
        """The client cancelled (DONE with ``cancelled``), or is gone (nothing to tell)."""
        stats = {**session.stats(), "cancelled": True}
        final = DoneMessage(stats=stats, request=session.client_id) if tell_client else None
        self.finish(out, session, final)

    def finish(
        self, out: Outbox, session: RequestSession, final: DoneMessage | ErrorMessage | None
    ) -> None:
        """End the request with ``final`` (None: a client gone, nobody to tell)."""
        if not self.sessions.remove(session):
            return  # already over
        if final is None or (isinstance(final, DoneMessage) and final.stats.get("cancelled")):
            outcome = "cancelled"
            session.transition(RequestEvent.CANCELLED)
        elif isinstance(final, DoneMessage):
            outcome = "done"  # DELIVERED already moved it to DONE
        else:
            outcome = final.code
            session.transition(RequestEvent.FAILED)
        self.metrics.requests[(session.spec.method, outcome)] += 1
        self.metrics.finished_evaluations += session.evaluations
        self.metrics.finished_retries += session.retries
        self.bindings.release_session(out, session)
        if final is not None:
            out.to_client(session.client, final)
