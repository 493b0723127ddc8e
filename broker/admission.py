"""Whether a new request may run here, and with how many cores.

A SUBMIT past a limit gets a typed ``busy`` refusal with a retry hint (``busy_retry_s``): the
broker's request limit, the client's, and the ready tasks waiting for workers over every
request. A request's own wait for a worker is checked, and a model no worker serves fails at
once (``no_worker``, naming the served models) unless the request asks to wait, or the broker
has just started (its workers are registering again). The cores policy decides K.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.peers import Peer, PeerLog
from chords_mq.broker.registry import WorkerRegistry
from chords_mq.broker.sessions import SessionTable
from chords_mq.request import RequestSpec
from chords_mq.wire import ErrorMessage

log = logging.getLogger("chords.broker")

MAX_WAIT_S = 86400.0  # the longest wait for a worker a request may ask for


class Admission:
    def __init__(
        self,
        config: BrokerConfig,
        clock: Callable[[], float],
        sessions: SessionTable,
        registry: WorkerRegistry,
        peer_log: PeerLog,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sessions = sessions
        self.registry = registry
        self.peer_log = peer_log
        self.started = clock()  # workers register again soon after a (re)start

    def refusal(
        self, peer: Peer, request_id: str, spec: RequestSpec, wait: float | None
    ) -> ErrorMessage | None:
        """Why ``spec`` may not run now (the ERROR to send), or None if it may."""
        config = self.config
        if len(self.sessions) >= config.max_sessions:
            return self._busy(peer, request_id, f"the broker runs {config.max_sessions} requests")
        if self.sessions.running_for(peer.principal) >= config.max_client_requests:
            why = f"this client has {config.max_client_requests} requests running (the limit)"
            return self._busy(peer, request_id, why)
        queued = self.sessions.queued_tasks()
        if queued + spec.resolved_cores() > config.max_queued_tasks:
            return self._busy(peer, request_id, f"{queued} tasks are waiting for workers")
        if wait is not None and not 0 <= wait <= MAX_WAIT_S:
            why = f"wait_for_worker_s must be 0..{MAX_WAIT_S:g} seconds, got {wait!r}"
            return ErrorMessage(code="invalid_request", message=why, request=request_id)
        now = self.clock()
        if (
            wait is None
            and not self.registry.serving(spec.model, now)
            # past the window in which a restarted broker's workers register again (their
            # silence timeout, then a HELLO per heartbeat)
            and now - self.started >= 4 * config.liveness * config.heartbeat_s
        ):
            served = sorted({w.model for w in self.registry.workers.values()})
            listed = ", ".join(repr(m) for m in served) if served else "none"
            why = (
                f"no worker serves model {spec.model!r}; the models served here: {listed} "
                "(a request may ask to wait for one: wait_for_worker_s)"
            )
            return ErrorMessage(code="no_worker", message=why, request=request_id)
        return None

    def _busy(self, peer: Peer, request_id: str, why: str) -> ErrorMessage:
        self.peer_log.warning(("busy", peer.principal), "refused a request: %s", why)
        return ErrorMessage(
            code="busy", message=why, retry_after_s=self.config.busy_retry_s, request=request_id
        )

    def grant(self, spec: RequestSpec) -> RequestSpec:
        """The cores policy. ``adaptive``: a request gets about the model's workers divided by
        the requests that will share them (itself included), never below 1 (the sequential
        solve) nor above what it asked; a lone request gets its full K (even more cores than
        workers). With no worker yet it keeps what it asked (it waits for workers either way)."""
        if self.config.cores_policy != "adaptive":
            return spec
        workers = len(self.registry.serving(spec.model, self.clock()))
        if workers == 0:
            return spec
        sharing = 1 + self.sessions.of_model(spec.model)
        if sharing == 1:
            return spec  # alone: its full K, even past the pool's size (as it asked)
        return spec.granted(max(1, workers // sharing))
