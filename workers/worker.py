"""chords-worker: one process per device; holds one model and runs the broker's tasks.

A DEALER socket with a stable routing id talks to the broker. One compute thread owns the hot
path: it receives a task, runs the model and every solver step the task targets on the device,
and sends the result, with no hand-off to another thread or event loop. The main thread only
sends heartbeats, so they go on during long forwards. A lock serialises the two threads' use of
the socket (ZeroMQ allows a socket to move between threads behind a full memory barrier), and
neither holds it while waiting: the compute thread sleeps in ``select`` on the socket's
descriptor and on a wake-up pipe the heartbeat thread writes after each send.
Per-request contexts live in a bounded LRU cache. If the broker goes silent or restarts (new
epoch), the worker opens a fresh socket and says HELLO again. Its data endpoint (a
``DataServer`` over its ``LatentStore``, on its own thread and port) is announced in HELLO; in a
CURVE pool it admits only the pool's worker keys, which the broker hands out (WELCOME, POOL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import select
import signal
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import click
import torch
import zmq

from chords_mq import __version__
from chords_mq.algorithms.base import Ref, all_finite
from chords_mq.algorithms.base import evaluate as evaluate_latent
from chords_mq.algorithms.distance import distance
from chords_mq.keys import CurveClient, KeyFileError, curve_client, is_loopback
from chords_mq.logs import log_options, setup_logging
from chords_mq.options import (
    DAEMON_CONTEXT,
    ENDPOINT,
    METRICS_BIND,
    MILLISECONDS,
    ConfigError,
    EndpointError,
    ExitCode,
    config_from_options,
    config_option,
    config_options,
    endpoint,
    option,
)
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import Solver, solver_spec
from chords_mq.transport import (
    NOW,
    PeerCongested,
    dealer,
    decode_frames,
    readable,
    send_now,
    stable_identity,
)
from chords_mq.wire import (
    DTYPE_NAMES,
    DTYPES,
    PROTOCOL_VERSION,
    ComparedMessage,
    CompareMessage,
    DecodedMessage,
    DecodeMessage,
    DisconnectMessage,
    DropMessage,
    ErrorMessage,
    EvalMessage,
    HeartbeatMessage,
    HelloMessage,
    Message,
    PartMessage,
    PoolMessage,
    PreparedMessage,
    PrepareMessage,
    ReleaseMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    WelcomeMessage,
    WireError,
    failed_for,
    split_bytes,
    tensor_digest,
)
from chords_mq.wire.named import MAX_FETCHED, X0_REF, Fetched, HeldResult, Holder, NamedInput
from chords_mq.workers.dataplane import (
    DataClient,
    DataPlaneError,
    DataServer,
    LatentSpec,
    Pusher,
    PushJob,
    advertised_endpoint,
    default_data_bind,
)
from chords_mq.workers.device_class import device_class
from chords_mq.workers.faults import (
    FAULT_SPECS,
    Fault,
    FaultSpecError,
    FaultyResults,
    parse_fault,
    with_fault,
)
from chords_mq.workers.metrics import WorkerMetrics
from chords_mq.workers.models import ModelAdapter, load_model, source_options
from chords_mq.workers.models.base import evaluate
from chords_mq.workers.store import LatentStore, PushedCopies

log = logging.getLogger("chords.worker")

# The slowest transfer rate the worker allows for before it calls a silent broker gone: the
# broker's heartbeats queue behind a large message on the same connection.
TRANSFER_FLOOR_BYTES_S = 100e6
# How long a piece of a hit's latent (PART) waits for the broker's queue beyond the time its
# bytes take at the transfer floor, before the worker gives the decode up (the broker's
# deadline then gives it to another worker).
PART_WAIT_S = 5.0
UNWELCOME_S = 5.0  # say so when a broker does not answer our HELLO for this long
# The wait for one holder of an input before trying the next: this, plus the latent's bytes at
# the transfer floor (a dead holder costs about this much, a large latent gets its time).
FETCH_TIMEOUT_S = 1.0
# The latent kinds (shape, dtype, tasks) a worker remembers having run: its first forward of
# each is cold (``ResultMessage.cold``), so a process serving many sizes stops saying so.
WARM_KINDS = 64


class LostInput(Exception):
    """No holder of an input gave it: the broker recomputes it (FAILED lost_input)."""

    code = "lost_input"

    def __init__(self, ref: Ref, holder: str, why: str) -> None:
        super().__init__(
            f"input {ref.task}:{ref.target} not fetched from {holder or 'anyone'}: {why}"
        )
        self.ref, self.holder = ref, holder


class CorruptInput(LostInput):
    """No holder gave an input with the digest it reported, and ``holder`` served other bytes:
    the broker strikes that holder and recomputes the input (FAILED corrupt_input)."""

    code = "corrupt_input"


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's settings, each default once (``chords-worker``'s options come from here)."""

    heartbeat_s: float = field(
        default=0.25, metadata=option(name="heartbeat-ms", unit=MILLISECONDS, min=20)
    )
    cache_size: int = field(
        default=16, metadata=option("Prepared requests kept per worker.", min=1)
    )
    broker_timeout_s: float = 2.0  # broker silence before reconnecting (+ its largest transfer)
    data_bind: str | None = field(
        default=None,
        metadata=option(
            "Serve this worker's results to the pool's other workers here (default: the "
            "address this host reaches --broker from, on a port the system picks; off "
            "loopback it needs CURVE or --insecure)."
        ),
    )
    advertise: str | None = field(
        default=None,
        metadata=option(
            "HOST:PORT other workers reach the data endpoint at, if not the bound address "
            "(NAT, several interfaces)."
        ),
    )


@dataclass
class CachedRequest:
    """A request this worker has prepared: the adapter's context, the solver, the grid size."""

    context: Any
    solver: Solver
    steps: int


class Worker:
    """The worker's state: one adapter, one compute thread, a cache of prepared requests."""

    def __init__(
        self,
        broker: str,
        adapter: ModelAdapter,
        model: str,
        device: str,
        config: WorkerConfig | None = None,
        curve: CurveClient | None = None,
        data: DataServer | None = None,
        data_endpoint: str | None = None,
        fault: Fault | None = None,
        name: str | None = None,
    ) -> None:
        config = config or WorkerConfig()
        # An emulated fault (``--fault``, tests only): what it does to results and PREPAREs.
        self.fault = fault
        self.faulty = FaultyResults(fault) if fault is not None and fault.changes_results else None
        self.broker = broker
        self.curve = curve
        self.data = data  # the data endpoint, started; closed when run() ends
        if data is not None and fault is not None and fault.serve_zeros:
            data.serve_fault = torch.zeros_like
        # What HELLO announces (peers connect there): the server's advertised endpoint unless
        # the caller knows better (a wildcard bind).
        self.data_endpoint = data_endpoint or (data.advertised if data is not None else None)
        self.adapter = adapter
        self.model = model
        self.device = device
        # The results it computed (by name, protocol 7), served by ``data``; and the client
        # that pulls other workers' results (made on first use, by the compute thread).
        self.store = data.store if data is not None else LatentStore(device)
        self._client: DataClient | None = None
        self._fetched: list[Fetched] = []  # the current EVAL's fetches, for its RESULT
        # Results other workers pushed here for EVALs that will read them (the data server
        # keeps them), and the thread that pushes ours (made on first use).
        self.inbox: PushedCopies | None = None if data is None else data.inbox
        self._pusher: Pusher | None = None
        self.pulled = 0  # inputs fetched from a holder (tests: 0 where every push came)
        # The (shape, dtype, tasks) this process has run a forward of: the first of each is
        # cold (``ResultMessage.cold``). At most WARM_KINDS; past that none is called cold.
        self.warm: set[tuple[tuple[int, ...], torch.dtype, int]] = set()
        self.identity = stable_identity("worker", device)
        # What HELLO says it is called (``--worker-name``; by default, one name per process).
        self.name = name or self.identity.decode()
        self.heartbeat_s = config.heartbeat_s
        self.metrics: WorkerMetrics | None = None  # --metrics-bind
        self.broker_timeout_s = config.broker_timeout_s
        self.cache: OrderedDict[tuple[int, str], CachedRequest] = OrderedDict()
        self.cache_size = config.cache_size
        # OpenMP thread counts are per thread: give the compute thread the process's setting,
        # or its reductions (so its bits) differ from a user's own run at that count.
        self.threads = torch.get_num_threads()
        self.epoch = 0
        self.session = ""  # new per socket: the broker tells a repeated HELLO from a new one
        self.unwelcome_since: float | None = None  # saying HELLO without a WELCOME since
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # whoever touches the socket holds this
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock: zmq.Socket[Any] | None = None
        self.fd = -1  # the socket's descriptor, for select
        self.largest_in = 0  # bytes of the largest message the broker has sent us
        self._stop_requested = False
        self.fatal: str | None = None  # why the worker cannot go on (main exits with it)
        self.crashed = False  # the compute thread failed (main exits 1)
        # The heartbeat thread's sends can consume the socket's edge-triggered readiness, so
        # it wakes the compute thread through this pipe after each one.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # -- lifecycle (main thread) -----------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``: the compute thread works, this thread sends heartbeats."""
        compute = threading.Thread(target=self._serve, name="compute", daemon=True)
        compute.start()
        next_beat = time.monotonic() + self.heartbeat_s
        try:
            while not self._stop_requested and not self.stopping.is_set() and compute.is_alive():
                time.sleep(min(0.05, self.heartbeat_s))
                if time.monotonic() >= next_beat:
                    next_beat += self.heartbeat_s
                    if self.epoch:
                        self._send(HeartbeatMessage(epoch=self.epoch), wake=True)
        finally:
            self.stopping.set()
            if self.fatal is None:  # (at the client port a DISCONNECT is one more bad message)
                self._send(DisconnectMessage(reason="worker shutting down", epoch=self.epoch))
            compute.join(timeout=5.0)  # a forward in progress may still finish and answer
            self.close()

    def close(self) -> None:
        """Let go of the sockets, the data server, the data client, the pusher and the wake
        pipe (``run`` ends so; a worker driven in process, as tests do, calls it itself)."""
        with self.lock:
            if self.sock is not None:
                self.sock.close(0)
                self.sock = None
        self.ctx.destroy(linger=0)
        if self.data is not None:
            self.data.close()
        if self._client is not None:
            self._client.close()
        if self._pusher is not None:
            self._pusher.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def stop(self) -> None:
        """Ask ``run`` to stop (safe from a signal handler: it only sets a flag)."""
        self._stop_requested = True

    def _send(self, message: Message, wake: bool = False) -> None:
        with self.lock:
            if self.sock is None:
                return
            try:
                send_now(self.sock, message)
            except PeerCongested:  # not connected (yet), or the broker is not reading
                log.debug("could not send %s to %s now; dropped", message.kind, self.broker)
            except zmq.ZMQError as exc:  # the socket is closing under a stop
                log.debug("could not send %s: %s", message.kind, exc)
        if wake:  # a full pipe means the compute thread is awake anyway
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"!")

    # -- the compute thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while not self.stopping.is_set():
                with self.lock:
                    if self.sock is not None:
                        self.sock.close(0)
                    self.sock = dealer(self.ctx, self.broker, self.identity, curve=self.curve)
                    self.session = uuid.uuid4().hex[:16]
                    self.fd = int(self.sock.getsockopt(zmq.FD))
                self.epoch = 0
                self._session()
        except Exception:  # a bug here must end the process loudly, not hang it
            log.exception("the compute thread failed")
            self.crashed = True
            self.stopping.set()

    def _receive(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next message, or None after ``timeout_s`` without one. The lock is held only to
        look at the socket, never while waiting."""
        with self.lock:
            assert self.sock is not None
            if self._readable():
                frames: list[zmq.Frame] = self.sock.recv_multipart(NOW, copy=False)
                return frames
        ready, _, _ = select.select([self.fd, self._wake_r], [], [], timeout_s)
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        with self.lock:
            if self._readable():
                frames = self.sock.recv_multipart(NOW, copy=False)
                return frames
        return None

    def _readable(self) -> bool:
        return readable(self.sock)

    def _session(self) -> None:
        """One connection: HELLO, then serve until the broker goes silent or asks us to leave."""
        self._hello()
        last_heard = last_hello = time.monotonic()
        if self.unwelcome_since is None:
            self.unwelcome_since = last_hello
        wait_s = min(self.heartbeat_s, 0.1)
        while not self.stopping.is_set():
            frames = self._receive(wait_s)
            now = time.monotonic()
            if frames is None:
                allowed = self.broker_timeout_s + self.largest_in / TRANSFER_FLOOR_BYTES_S
                if now - last_heard > allowed:
                    log.warning(
                        "broker %s silent for %.1fs; reconnecting", self.broker, now - last_heard
                    )
                    return
                if self.epoch == 0 and now - last_hello >= self.heartbeat_s:
                    self._hello()  # no WELCOME yet: the broker may not be up
                    last_hello = now
                since = self.unwelcome_since
                if self.epoch == 0 and since is not None and now - since > UNWELCOME_S:
                    self.unwelcome_since = now  # again in UNWELCOME_S if still unanswered
                    log.warning(
                        "no WELCOME from the broker at %s in %.0fs: is it running, and if it "
                        "uses --curve, does it list this worker's key in KEYS/workers/ and is "
                        "--broker-key its public key?",
                        self.broker,
                        now - since,
                    )
                continue
            last_heard = now
            self.largest_in = max(self.largest_in, sum(len(f) for f in frames))
            try:
                message = decode_frames(frames)
            except WireError as exc:
                log.error("dropped a malformed message from the broker: %s", exc)
                continue
            if not self._handle(message):
                return

    def _hello(self) -> None:
        self._send(
            HelloMessage(
                worker=self.name,
                model=self.model,
                device=self.device,
                dtype=self.adapter.dtype,
                max_batch=self.adapter.max_batch,
                version=__version__,
                protocol=PROTOCOL_VERSION,
                capabilities=["eval", "decode", "compare", "probe", "parts"],
                session=self.session,
                solver=getattr(self.adapter, "solver_note", None),
                device_class=device_class(self.device),
                data=self.data_endpoint,
            )
        )

    def _pool_keys(self, keys: tuple[str, ...] | None) -> None:
        """The pool's worker keys from the broker: the only peers the data server admits."""
        if keys is None or self.data is None:
            return
        self.data.set_pool_keys(key.encode() for key in keys)
        log.debug("the data endpoint admits %d pool worker key(s)", len(keys))

    def _handle(self, message: Message) -> bool:
        """Handle one broker message; False means: drop this connection and register again."""
        if isinstance(message, EvalMessage):  # the hot path first
            self._steps(message)
        elif isinstance(message, WelcomeMessage):
            # Every HELLO said before the first WELCOME is answered: one line per registration.
            if message.epoch != self.epoch:
                log.info("registered with broker %s (epoch %d)", self.broker, message.epoch)
            self.epoch = message.epoch
            self.unwelcome_since = None
            self._pool_keys(message.pool_keys)
        elif isinstance(message, PoolMessage):  # the broker re-read its allow-list
            self._pool_keys(message.pool_keys)
            log.info("the pool's worker keys changed: %d now", len(message.pool_keys))
        elif isinstance(message, ErrorMessage) and message.code == "wrong_port":
            # --broker names the broker's client port: no retry can help, so stop and say so.
            self.fatal = f"{self.broker}: {message.message} (--broker)"
            self.stopping.set()
            return False
        elif isinstance(message, DisconnectMessage):
            if message.shutdown:  # an orderly stop: we wait for it to come back
                log.info("broker %s is shutting down; reconnecting until it is back", self.broker)
            else:
                log.warning(
                    "broker %s asked us to re-register: %s", self.broker, message.reason or ""
                )
            time.sleep(0.05)
            return False
        elif isinstance(message, HeartbeatMessage):
            if self.epoch and message.epoch != self.epoch:
                log.warning(
                    "broker %s restarted (epoch %d -> %d); registering again",
                    self.broker,
                    self.epoch,
                    message.epoch,
                )
                return False
        elif isinstance(message, PrepareMessage) and self.fault and self.fault.silent_prepare:
            log.debug("--fault silent-prepare: PREPARE of %s left unanswered", message.request)
        elif isinstance(message, DecodeMessage) and message.parts:
            self._send_parts(self._job(message), message.parts)
        elif isinstance(message, (PrepareMessage, DecodeMessage)):
            self._send(self._job(message))
        elif isinstance(message, ReleaseMessage):
            self.cache.pop((message.epoch, message.request or ""), None)
            self.store.release(message.request or "")
            if self.inbox is not None:
                self.inbox.forget(message.request or "")
        elif isinstance(message, DropMessage):
            self.store.drop(message.request or "", message.refs)
            if self.inbox is not None:
                self.inbox.discard(message.request or "", message.refs)
        elif isinstance(message, CompareMessage):
            self._send(self._compare(message))
        else:
            log.error("unexpected %s from the broker", message.kind.value)
        return True

    def _send_parts(self, answer: Message, asked: int) -> None:
        """A DECODED whose latent the broker asked for in pieces: each piece as a PART
        (``wire.part_bounds``), then the DECODED with their count and no latent, so the broker
        sends the first piece on to the client while the rest cross (one hop of a big hit's
        latent, not two). A piece the socket cannot take is waited for, never dropped: a
        missing piece would read as a lie."""
        if not isinstance(answer, DecodedMessage) or answer.latent is None:
            self._send(answer)  # a FAILED, say
            return
        try:
            pieces = split_bytes(answer.latent, asked)
        except WireError:  # (no bytes to split): whole, as the broker will tell
            self._send(answer)
            return
        for index, data in enumerate(pieces):
            piece = PartMessage(index=index, parts=len(pieces), data=data)
            if not self._send_waiting(piece.ids(answer)):
                return  # (the broker's deadline gives the decode to another worker)
        self._send(dataclasses.replace(answer, latent=None, parts=len(pieces)))

    def _send_waiting(self, message: Message) -> bool:
        """Send ``message``, waiting while the broker's queue is full (up to the time its bytes
        take at the transfer floor, and ``PART_WAIT_S`` more); False if it could not go."""
        size = sum(t.nbytes for t in message.tensors.values())
        allowed = PART_WAIT_S + size / TRANSFER_FLOOR_BYTES_S
        give_up = time.monotonic() + allowed
        while not self.stopping.is_set():
            with self.lock:
                if self.sock is None:
                    return False
                try:
                    send_now(self.sock, message)
                    return True
                except PeerCongested:
                    pass
                except zmq.ZMQError as exc:  # the socket is closing under a stop
                    log.debug("could not send %s: %s", message.kind, exc)
                    return False
            if time.monotonic() >= give_up:
                log.warning(
                    "the broker took no %s in %.1fs; the decode is left to another worker",
                    message.kind.value,
                    allowed,
                )
                return False
            time.sleep(0.005)
        return False

    def _steps(self, message: EvalMessage) -> None:
        """An EVAL: one job, or a chain (issue 25, item 6: one core's consecutive steps,
        ``EvalMessage.steps``), each step run as its own EVAL in order and answered as soon as
        it finishes, so the next starts without a round trip through the broker; each reads
        the one before's fine result from the store. A failed step ends the chain (the broker
        runs the rest again or takes them back)."""
        for step in message.steps():
            answer = self._job(step)
            self._send(answer)
            if not isinstance(answer, ResultMessage) or self.stopping.is_set():
                return
            if step.push:
                self._push(step)

    def _push(self, message: EvalMessage) -> None:
        """Hand the results the EVAL says to push (``EvalMessage.push``) to the push thread,
        after its RESULT went out: their readers' workers get them while this one computes
        on. Each reader pulls what never arrives."""
        request = message.request or ""
        if self._pusher is None:
            key_pair = None if self.curve is None else (self.curve.public, self.curve.secret)
            self._pusher = Pusher(key_pair, FETCH_TIMEOUT_S, TRANSFER_FLOOR_BYTES_S)
        for push in message.push or ():
            if not self.store.holds(request, push.ref):
                continue
            tensor = self.store.get(request, push.ref)
            for to in push.to:
                if to.endpoint == self.data_endpoint:
                    continue
                key = None if to.key is None else to.key.encode()
                self._pusher.submit(PushJob(to.endpoint, key, request, push.ref, tensor))

    def _job(self, message: PrepareMessage | EvalMessage | DecodeMessage) -> Message:
        """Run one PREPARE / EVAL / DECODE here, in the compute thread; the answer to send."""
        key = (message.epoch, message.request or "")
        out: Message
        try:
            if isinstance(message, PrepareMessage):
                out = self._prepare(message, key)
            elif key not in self.cache:
                out = failed_for(message, "not_prepared", "request not prepared on this worker")
            elif isinstance(message, EvalMessage):
                out = self._eval(message, self.cache[key])
                self.cache.move_to_end(key)
            else:
                out = self._decode(message, self.cache[key])
        except LostInput as exc:  # (or CorruptInput)
            out = failed_for(message, exc.code, str(exc))
            out = dataclasses.replace(
                out, lost_ref=[exc.ref.task, exc.ref.target], lost_holder=exc.holder or None
            )
        except InvalidRequest as exc:
            out = failed_for(message, "invalid_request", str(exc))
        except WireError as exc:
            out = failed_for(message, "bad_message", str(exc))
        except Exception as exc:  # an adapter failure is a value for the broker, not a crash
            log.exception("%s failed", message.kind.value)
            out = failed_for(message, "worker_error", f"{type(exc).__name__}: {exc}")
            if self.metrics is not None:
                self.metrics.failures.inc()
        return out.ids(message)

    def _prepare(self, message: PrepareMessage, key: tuple[int, str]) -> PreparedMessage:
        started = time.perf_counter()
        request = RequestSpec.from_dict(message.spec)
        prepared = self.adapter.prepare(request)
        self.cache[key] = CachedRequest(prepared.context, prepared.solver, request.steps)
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            evicted, _ = self.cache.popitem(last=False)
            self.store.release(evicted[1])
            if self.inbox is not None:
                self.inbox.forget(evicted[1])
        # Every prepared worker keeps x0 (the same bits: the broker compares digests), so a
        # task starting from it runs here without a transfer.
        self.store.put(key[1], X0_REF, prepared.x0)
        if self.inbox is not None:  # pushed copies of its results may come: what they must be
            made = prepared.result_dtype or prepared.x0.dtype
            self.inbox.expect(key[1], made, tuple(prepared.x0.shape))
        fields, tensors = solver_spec(prepared.solver)
        x0 = prepared.x0
        # Past the broker's budget x0 stays here, undigested: the broker refuses the request
        # from the declared shape and dtype, and no tensor it would refuse crosses.
        limit = message.max_latent_bytes
        withheld = limit is not None and x0.untyped_storage().nbytes() > limit
        result_dtype = prepared.result_dtype
        return PreparedMessage(
            solver=SolverSpec(fields, tensors),
            x0_digest="" if withheld else tensor_digest(x0),
            x0=x0 if message.initial and not withheld else None,
            prepare_s=time.perf_counter() - started,
            shape=list(x0.shape),
            dtype=DTYPE_NAMES.get(x0.dtype),
            result_dtype=None if result_dtype is None else DTYPE_NAMES.get(result_dtype),
        )

    def _eval(self, message: EvalMessage, prepared: CachedRequest) -> ResultMessage:
        """One forward for all of the EVAL's tasks (usually one), each at its own step, then
        every target's solver result on this device."""
        for entry in message.entries:
            if entry.step >= prepared.steps or entry.targets[-1] > prepared.steps:
                raise WireError(
                    f"task {entry.task}: step {entry.step} -> {list(entry.targets)} is outside "
                    f"the request's {prepared.steps} steps"
                )
        request = message.request or ""
        latents = list(message.latents)
        self._fetched = []
        if message.inputs is not None:  # by name: inputs from the store or from their holders
            like = self._like(request, message.dtype)
            pushed = frozenset(message.pushed or ())
            copies: dict[Ref, torch.Tensor] = {}  # pushed copies taken: one may feed two inputs
            try:
                latents = [
                    self._resolve(request, value, like, pushed, copies) for value in message.inputs
                ]
            except LostInput:  # (CorruptInput is one)
                # the broker stops counting a copy pushed here once an EVAL names it: the ones
                # this EVAL will not read now (the retry fetches) go, not held until RELEASE
                if self.inbox is not None and pushed:
                    self.inbox.discard(request, pushed - copies.keys())
                raise
        cold = False
        if latents:
            kind = (tuple(latents[0].shape), latents[0].dtype, len(latents))
            cold = kind not in self.warm and len(self.warm) < WARM_KINDS
            if cold:
                self.warm.add(kind)
        started = time.perf_counter()
        results = evaluate(
            self.adapter,
            prepared.context,
            prepared.solver,
            latents,
            [entry.step for entry in message.entries],
            [entry.targets for entry in message.entries],
        )
        compute_s = time.perf_counter() - started
        if self.faulty is not None:  # --fault cast or bitflip: sent and kept as changed
            results = [
                self.faulty.apply(request, e.task, e.attempt, r)
                for e, r in zip(message.entries, results)
            ]
        if self.metrics is not None:
            self.metrics.forward.observe(compute_s)
            self.metrics.tasks.inc(len(message.entries))
        if message.inputs is not None:  # kept here; the broker gets what was checked of each
            digest = message.digests is not False
            entries = tuple(
                ResultEntry(e.task, e.attempt, {}, self._keep(request, e.task, r, digest))
                for e, r in zip(message.entries, results)
            )
        else:
            entries = tuple(
                ResultEntry(e.task, e.attempt, r) for e, r in zip(message.entries, results)
            )
        return ResultMessage(  # with the EVAL's ids: ``_job`` then has nothing to copy
            entries=entries,
            compute_s=compute_s,
            fetched=tuple(self._fetched) if self._fetched else None,
            cold=True if cold else None,
            epoch=message.epoch,
            request=message.request,
            task=message.task,
            attempt=message.attempt,
        )

    def _compare(self, message: CompareMessage) -> ComparedMessage:
        """Verification across device classes: fetch the other worker's results and tell how
        far each is from ours (``algorithms.distance``); an error if one cannot be had."""
        request = message.request or ""
        if not message.mine:
            return self._probe(message)
        like = self._like(request, message.dtype)
        distances = []
        try:
            for ref, theirs in zip(message.mine, message.theirs, strict=True):
                if not self.store.holds(request, ref):
                    raise LookupError(f"result {ref.task}:{ref.target} is not held here")
                named = theirs.refs[0]
                other = self._fetch(request, named.ref, named.holders, like)
                distances.append(distance(self.store.get(request, ref), other))
        except (LostInput, LookupError) as exc:  # (CorruptInput too)
            return ComparedMessage(error=str(exc)[:500]).ids(message)
        return ComparedMessage(distances=tuple(distances)).ids(message)

    def _probe(self, message: CompareMessage) -> ComparedMessage:
        """A probe (``broker.probes``): fetch each result of ``theirs`` as its holder serves it
        (any dtype and shape: what arrived is what is judged) and tell the digest of each; the
        broker compares them with what the holder reported. An error if one cannot be had."""
        request = message.request or ""
        digests = []
        try:
            for theirs in message.theirs:
                named = theirs.refs[0]
                digests.append(tensor_digest(self._fetch(request, named.ref, named.holders, None)))
        except LostInput as exc:
            return ComparedMessage(error=str(exc)[:500]).ids(message)
        return ComparedMessage(digests=tuple(digests)).ids(message)

    def _keep(
        self, request: str, task: int, results: dict[int, torch.Tensor], digest: bool = True
    ) -> dict[int, HeldResult]:
        """Keep one task's results in the store; what was checked of each, for the RESULT
        (with its digest unless the EVAL said ``digests`` False: nothing is verified)."""
        held = {}
        for target, tensor in results.items():
            self.store.put(request, Ref(task, target), tensor)
            held[target] = HeldResult(
                DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)),
                tuple(tensor.shape),
                tensor.numel() * tensor.element_size(),
                all_finite(tensor),
                tensor_digest(tensor) if digest else None,  # compared with a replica's
            )
        return held

    def _like(self, request: str, dtype: str | None) -> LatentSpec | None:
        """What a fetched result must be: the request's result dtype, x0's shape."""
        if dtype not in DTYPES or not self.store.holds(request, X0_REF):
            return None
        return LatentSpec(DTYPES[dtype], tuple(self.store.get(request, X0_REF).shape))

    def _resolve(
        self,
        request: str,
        value: NamedInput,
        like: LatentSpec | None,
        pushed: frozenset[Ref] = frozenset(),
        copies: dict[Ref, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The tensor ``value`` stands for: held results used in place, pushed copies (of
        ``pushed``) used once they are here, the others fetched from a holder (the next one if
        it does not answer), then the plan's arithmetic (``algorithms.base.evaluate``, out of
        place: held results stay intact)."""
        tensors: dict[Ref, torch.Tensor] = {}
        for named in value.refs:
            if self.store.holds(request, named.ref):  # (a no-op .to on the device tier)
                tensors[named.ref] = self.store.get(request, named.ref).to(self.store.device)
                continue
            if named.ref in pushed:
                copy = None if copies is None else copies.get(named.ref)
                if copy is None:
                    copy = self._pushed(request, named.ref, named.holders, like)
                if copy is not None:
                    if copies is not None:
                        copies[named.ref] = copy
                    tensors[named.ref] = copy
                    continue
            spec = None if named.ref == X0_REF else like
            tensors[named.ref] = self._fetch(request, named.ref, named.holders, spec)
        return evaluate_latent(value.latent(), tensors.__getitem__)

    def _pushed(
        self, request: str, ref: Ref, holders: tuple[Holder, ...], like: LatentSpec | None
    ) -> torch.Tensor | None:
        """The copy of ``ref`` its producer pushed here, waiting for it while it is on its way
        (at most as long as a fetch from one holder waits); None if none came or it is not the
        holders' (their digest where the broker named one, else a holder's CURVE key): the
        caller fetches it. The copy is freed here once read."""
        if self.inbox is None:
            return None
        latent = 0
        if self.store.holds(request, X0_REF):
            latent = self.store.get(request, X0_REF).nbytes
        started = time.perf_counter()
        got = self.inbox.take(request, ref, FETCH_TIMEOUT_S + 2 * latent / TRANSFER_FLOOR_BYTES_S)
        waited = time.perf_counter() - started
        if holders and len(self._fetched) < MAX_FETCHED:
            # the wait is the transfer's, not the compute's: the broker's speed model takes it
            # off as it takes off a fetch (no bytes: the links learn nothing from a part-wait)
            self._fetched.append(Fetched(holders[0].endpoint, 0, waited))
        if got is None:
            return None
        tensor, sender = got
        if like is not None and (tensor.dtype, tuple(tensor.shape)) != (like.dtype, like.shape):
            return None
        digests = {holder.digest for holder in holders if holder.digest is not None}
        if digests:
            if tensor_digest(tensor) not in digests:
                log.warning("pushed copy of %s has not a holder's digest: fetched instead", ref)
                return None
        elif sender is not None and sender not in {holder.key for holder in holders}:
            log.warning("pushed copy of %s came from no holder of it: fetched instead", ref)
            return None
        log.debug("input %s: the pushed copy", ref)
        return tensor.to(self.store.device)

    def _fetch(self, request: str, ref: Ref, holders: Any, like: LatentSpec | None) -> torch.Tensor:
        if self._client is None:
            key_pair = None if self.curve is None else (self.curve.public, self.curve.secret)
            self._client = DataClient(key_pair=key_pair, timeout_s=FETCH_TIMEOUT_S)
        last, why = "", "no holder named"
        corrupt, mismatch = "", ""  # a holder whose bytes did not have the digest it reported
        latent = 0  # bytes of one latent (x0's; a result is at most twice that, float64)
        if self.store.holds(request, X0_REF):
            latent = self.store.get(request, X0_REF).nbytes
        wait = FETCH_TIMEOUT_S + 2 * latent / TRANSFER_FLOOR_BYTES_S
        for holder in holders:
            if holder.endpoint == self.data_endpoint:
                continue  # ours, and not held any more
            last = holder.endpoint
            key = None if holder.key is None else holder.key.encode()
            self.pulled += 1
            started = time.perf_counter()
            try:
                got = self._client.fetch(
                    holder.endpoint, request, [ref], like, server_key=key, timeout_s=wait
                )
            except DataPlaneError as exc:
                why = str(exc)
                log.warning("fetch of %s from %s failed: %s", ref, holder.endpoint, exc)
                continue
            seconds = time.perf_counter() - started  # what the broker learns the link from
            if holder.digest is not None and tensor_digest(got[ref]) != holder.digest:
                corrupt = last = holder.endpoint
                why = mismatch = f"what it served has not the digest it reported {holder.digest}"
                log.warning("fetch of %s from %s: %s", ref, holder.endpoint, why)
                continue
            if len(self._fetched) < MAX_FETCHED:
                self._fetched.append(Fetched(holder.endpoint, got[ref].nbytes, seconds))
            return got[ref].to(self.store.device)
        if corrupt:
            raise CorruptInput(ref, corrupt, mismatch)
        raise LostInput(ref, last, why)

    def _decode(self, message: DecodeMessage, prepared: CachedRequest) -> DecodedMessage:
        """Decode a hit to pixels; by name, compute its latent first (and send it back if
        asked: the hit's latent goes to the client through the broker)."""
        started = time.perf_counter()
        request = message.request or ""
        if message.value is not None:
            latent = self._resolve(request, message.value, None)
        else:
            assert message.latent is not None
            latent = message.latent
        media = None
        if message.value is None or message.media:
            media = self.adapter.decode(prepared.context, latent).to("cpu")
        elapsed = time.perf_counter() - started
        back = latent.to("cpu") if message.want_latent else None
        return DecodedMessage(media=media, compute_s=elapsed, latent=back)


def _parse_device(device: str | None, gpu: int | None) -> str:
    if gpu is not None:
        if device not in (None, "cuda"):
            raise click.UsageError("--gpu selects a CUDA device; do not combine it with --device")
        if not torch.cuda.is_available():
            raise click.UsageError(f"--gpu {gpu}: CUDA is not available on this machine")
        return f"cuda:{gpu}"
    return device or "cpu"


@click.command(context_settings={"help_option_names": ["-h", "--help"], **DAEMON_CONTEXT})
@config_option
@click.option(
    "--broker",
    type=ENDPOINT,
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="The broker's worker endpoint.",
)
@click.option(
    "--model",
    default="synthetic",
    show_default=True,
    help="synthetic, digits[:PATH], or a local diffusers pipeline folder.",
)
@click.option(
    "--name", default=None, help="Serve the model under this name (default: folder name)."
)
@source_options
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Load a pipeline in this dtype (default: as saved).",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="NAME",
    help="A diffusers scheduler class to use instead of the folder's, made from its config "
    "(e.g. DDIMScheduler, EulerDiscreteScheduler).",
)
@click.option("--gpu", type=click.IntRange(min=0), default=None, help="CUDA device index.")
@click.option("--device", default=None, help="Torch device instead of --gpu, e.g. cpu.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch (default: torch's own default, as a plain Python process "
    "uses; core 1 is bitwise a pipeline run at the same count).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="synthetic model: emulate a forward of this many milliseconds.",
)
@click.option(
    "--fault",
    callback=lambda _ctx, _param, value: _fault_option(value),
    default=None,
    metavar="SPEC",
    help="synthetic model, for tests: emulate a faulty GPU or peer. nan, inf, zeros: every "
    "model output is that; hang: every forward hangs; scale:F: every model output times F; "
    "cast:DTYPE: results sent and kept in DTYPE; bitflip:P[:SEED]: one random bit of a "
    "result flipped with probability P; silent-prepare: PREPAREs are never answered "
    "(heartbeats go on).",
)
@click.option(
    "--curve-secret",
    type=click.Path(dir_okay=False),
    envvar="CHORDS_CURVE_SECRET",
    default=None,
    help="This worker's CURVE key pair (NAME.key_secret from chords keygen).",
)
@click.option(
    "--broker-key",
    type=click.Path(dir_okay=False),
    envvar="CHORDS_BROKER_KEY",
    default=None,
    help="The broker's public key (broker.key); with --curve-secret.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Bind a non-loopback --data-bind without CURVE: any peer that reaches it is trusted.",
)
@click.option(
    "--worker-name",
    default=None,
    metavar="NAME",
    callback=lambda _ctx, _param, value: _worker_name(value),
    help="The name this worker registers under (default: one per process). Without CURVE the "
    "broker keeps its strikes, quarantine and learnt speed under NAME and its host across "
    "restarts (weak: anyone can claim a name); give each worker of a host its own.",
)
@config_options(WorkerConfig)  # --heartbeat-ms, --cache-size, --data-bind, --advertise
@click.option(
    "--metrics-bind",
    type=METRICS_BIND,
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus /metrics here (forward times, tasks, device memory).",
)
@log_options
@click.version_option(__version__, prog_name="chords-worker")
def main(
    broker: str,
    model: str,
    name: str | None,
    family: str | None,
    registry: str | None,
    dtype: str | None,
    scheduler: str | None,
    gpu: int | None,
    device: str | None,
    threads: int | None,
    latency_ms: float,
    fault: Fault | None,
    curve_secret: str | None,
    broker_key: str | None,
    insecure: bool,
    worker_name: str | None,
    metrics_bind: tuple[str, int] | None,
    log_level: str,
    log_format: str,
    **settings: Any,
) -> None:
    """Run one chords-mq worker: one device, one model, tasks from the broker."""
    setup_logging("chords-worker", log_level, log_format)
    config = config_from_options(WorkerConfig, settings)
    resolved = _parse_device(device, gpu)
    if threads is not None:
        torch.set_num_threads(threads)
    options: dict[str, Any] = {}
    if model == "synthetic":
        options["latency_ms"] = latency_ms
        options["fault"] = None if fault is None else fault.adapter_fault
    elif latency_ms or fault:
        raise click.UsageError("--latency-ms and --fault only apply to --model synthetic")
    try:
        curve = curve_client(curve_secret, broker_key)
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None
    data = _data_server(broker, config, curve, insecure, resolved)
    try:  # the data endpoint is closed however this ends
        try:
            entry, adapter = load_model(
                model,
                resolved,
                registry=registry,
                dtype=dtype,
                family=family,
                scheduler=scheduler,
                **options,
            )
        except (ValueError, OSError, AttributeError) as exc:
            raise click.UsageError(str(exc)) from None
        adapter = with_fault(adapter, fault)
        served = name or entry.name
        note = getattr(adapter, "solver_note", None)
        solver = f", scheduler {note}" if note else ""
        log.info("serving %s (%s%s) on %s", served, type(adapter).__name__, solver, resolved)
        worker = Worker(
            broker,
            adapter,
            served,
            resolved,
            config=config,
            curve=curve,
            data=data,
            data_endpoint=_announced(data, broker, config.advertise),
            name=worker_name,
            fault=fault,
        )
        if metrics_bind is not None:
            worker.metrics = WorkerMetrics(resolved, served)
            try:
                worker.metrics.serve(*metrics_bind)
            except OSError as exc:
                raise ConfigError(f"--metrics-bind: cannot listen: {exc.strerror}") from None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: worker.stop())
        # torch, diffusers and the model are a million long-lived objects: keep the cyclic
        # collector from walking them again and again while tasks run.
        gc.collect()
        gc.freeze()
        worker.run()
        if worker.fatal is not None:
            raise ConfigError(worker.fatal)
        if worker.crashed:
            raise SystemExit(ExitCode.FAILED)
    finally:
        data.close()  # (run() closed it already, unless the start failed)


def _fault_option(value: str | None) -> Fault | None:
    """``--fault SPEC`` parsed (``workers.faults``); a bad SPEC is a usage error."""
    if value is None:
        return None
    try:
        return parse_fault(value)
    except FaultSpecError as exc:
        raise click.BadParameter(f"{exc} (SPEC: {', '.join(FAULT_SPECS)})") from None


def _data_server(
    broker: str, config: WorkerConfig, curve: CurveClient | None, insecure: bool, device: str
) -> DataServer:
    """The worker's data endpoint, bound and serving its (empty) store: ``--data-bind`` or
    the address this host reaches the broker from; off loopback only with CURVE (the worker's
    own key pair) or ``--insecure``, as the broker's bind guard."""
    try:
        bind = config.data_bind or default_data_bind(broker)
        _check_data_bind(bind)
        advertised_endpoint(bind, config.advertise)  # a bad --advertise fails before binding
    except DataPlaneError as exc:
        raise ConfigError(str(exc)) from None
    if curve is None and not insecure and not is_loopback(bind):
        raise click.UsageError(
            f"refusing to bind the data endpoint {bind} without --curve-secret FILE: off "
            "loopback every peer must authenticate (--insecure accepts any peer that reaches it)"
        )
    exposed = [endpoint for endpoint in (broker, bind) if not is_loopback(endpoint)]
    if curve is None and exposed:
        log.warning(
            "INSECURE: %s off loopback without CURVE (--insecure). Any host that reaches them "
            "can read and replace this worker's results, and knock it off the broker if it "
            "learns its routing id. Use --curve-secret and --broker-key off loopback (README, "
            "'Across machines').",
            " and ".join(exposed),
        )
    key_pair = None if curve is None else (curve.public, curve.secret)
    server = DataServer(
        LatentStore(device),
        bind,
        key_pair=key_pair,
        insecure=insecure,
        advertise=config.advertise,
        inbox=PushedCopies(),
    )
    try:
        server.start()
    except DataPlaneError as exc:
        raise ConfigError(f"--data-bind: {exc}") from None
    return server


def _worker_name(value: str | None) -> str | None:
    """``--worker-name``: 1 to 128 printable characters, no spaces."""
    if value is not None and not (
        0 < len(value) <= 128 and value.isprintable() and not any(c.isspace() for c in value)
    ):
        raise click.BadParameter(f"{value[:140]!r} is not 1 to 128 printable characters")
    return value


def _check_data_bind(bind: str) -> None:
    """``--data-bind`` is a TCP endpoint; port 0 (or ``*``) lets the system pick one."""
    scheme, _, rest = bind.partition("://")
    if scheme != "tcp":
        raise DataPlaneError(f"--data-bind {bind!r}: other workers reach it over tcp://")
    host, sep, port = rest.rpartition(":")
    try:
        endpoint(f"tcp://{host}:*" if sep and port == "0" else bind)
    except EndpointError as exc:
        raise DataPlaneError(f"--data-bind: {exc}") from None


WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


def _announced(server: DataServer, broker: str, advertise: str | None) -> str:
    """The data endpoint HELLO announces: ``--advertise``, else the bound endpoint; a bind on
    every interface announces the address this host reaches the broker from (nobody can
    connect to 0.0.0.0)."""
    announced = server.advertised
    host, _, port = server.endpoint.removeprefix("tcp://").rpartition(":")
    if advertise is None and host in WILDCARDS:
        reach = default_data_bind(broker).removeprefix("tcp://").rpartition(":")[0]
        announced = f"tcp://{reach}:{port}"
    if announced != server.endpoint:
        log.info("data endpoint %s announced as %s", server.endpoint, announced)
    return announced
