"""BrokerCore, driven with messages and a fake clock: no sockets, no processes.

Every branch of the failure policy in docs/architecture.md has a test here: stale attempts,
wrong epochs, worker_error up to max_task_retries, not_prepared, lost and failed decodes, bad
PREPAREDs, a worker lost mid-batch, draining, no_worker, a client gone; and the rest of what the
core decides (admission by size, bad results, liveness with large transfers, dispatch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import pytest
import torch

from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.testing import FakeClock, velocity
from chords_mq.request import RequestSpec
from chords_mq.solvers import solve_targets, solver_spec, unit_euler
from chords_mq.wire import (
    DTYPE_NAMES,
    PROTOCOL_VERSION,
    STATUS_PAGE,
    EvalMessage,
    Message,
    ResultEntry,
    ResultMessage,
    WireError,
    decode,
    encode,
    tensor_digest,
)
from chords_mq.wire.base import tensor_bytes

EPOCH = 7
CLIENT = b"client-1"


@dataclass
class Raw:
    """A message as a peer puts it on the wire: kind, body and tensor frames by name, and the
    header's ids. The test broker decodes it as the server does (``as_sent``), so a malformed
    one takes the server's path: ``BrokerCore.bad_message``."""

    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    request: str | None = None
    task: int | None = None
    attempt: int | None = None


def raw(kind: str, body: dict[str, Any] | None = None, tensors: Any = None, **ids: Any) -> Raw:
    return Raw(kind, dict(body or {}), dict(tensors or {}), **ids)


def as_sent(message: Raw | Message) -> Message:
    """The typed message the broker's server would hand the core (WireError if malformed)."""
    if isinstance(message, Message):
        return decode(encode(message))
    specs = [[name, DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in message.tensors.items()]
    header = {
        "v": PROTOCOL_VERSION,
        "kind": message.kind,
        "epoch": message.epoch,
        "req": message.request,
        "task": message.task,
        "attempt": message.attempt,
        "tensors": specs,
        "body": message.body,
    }
    frames = [msgpack.packb(header), *(tensor_bytes(t) for t in message.tensors.values())]
    return decode(frames)


def eval_entries(message: EvalMessage) -> list[tuple[Any, torch.Tensor]]:
    return list(zip(message.entries, message.latents))


def solver_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"solver.{name}": tensor for name, tensor in tensors.items()}


def hello_body(name: str, **changes: Any) -> dict[str, Any]:
    """A worker's HELLO body (``changes`` override fields)."""
    body = {
        "worker": name,
        "model": "m",
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 1,
        "version": "test",
        "protocol": PROTOCOL_VERSION,
    }
    return {**body, **changes}


class Broker:
    """A BrokerCore and everything it sent, with helpers that play workers and clients."""

    def __init__(self, **config: Any) -> None:
        # Most tests check other decisions on the cores they ask for; the cores policy's own
        # tests ask for "adaptive", the broker's default.
        config.setdefault("cores_policy", "fixed")
        # Their workers answer with tensors (off the data plane), which verification would
        # replicate and hold: its own tests are tests/test_broker_verify*.py.
        config.setdefault("verify", "off")
        self.clock = FakeClock(1000.0)
        self.core = BrokerCore(BrokerConfig(**config), clock=self.clock, epoch=EPOCH)
        self.sent: list[Send] = []
        self.ids: dict[str, str] = {}  # the client's request id -> the one workers see

    @property
    def sessions(self) -> dict[str, Any]:
        """The running requests by the id their client gave them."""
        return {s.client_id: s for s in self.core.sessions.values()}

    def _keep(self, sends: list[Send]) -> list[Send]:
        # every message must survive the wire, as the server would send it
        for send in sends:
            decode(encode(send.message))
        self.sent.extend(sends)
        return sends

    def tick(self, advance: float = 0.0) -> list[Send]:
        self.clock.now += advance
        return self._keep(self.core.tick(self.clock.now))

    def worker(self, name: str, model: str = "m", max_batch: int = 1) -> bytes:
        identity = f"worker/{name}".encode()
        body = hello_body(name, model=model, max_batch=max_batch)
        sends = self.from_worker(identity, raw("HELLO", body))
        assert any(s.message.kind == "WELCOME" and s.identity == identity for s in sends)
        return identity

    def from_worker(
        self, identity: bytes, message: Raw | Message, epoch: int = EPOCH
    ) -> list[Send]:
        """``message`` from a worker; a request named by its client's id is sent under the id
        the broker gave it (the one workers see)."""
        request = message.request
        if request in self.sessions:
            request = self.sessions[request].id
        if isinstance(message, Raw):
            message.epoch, message.request = epoch, request
        else:
            message = replace(message, epoch=epoch, request=request)
        try:
            typed = as_sent(message)
        except WireError as exc:  # as the server: a malformed message
            return self._keep(self.core.bad_message("worker", identity, str(exc)))
        return self._keep(self.core.worker_message(identity, typed))

    def from_client(self, message: Raw | Message, client: bytes = CLIENT) -> list[Send]:
        try:
            typed = as_sent(message)
        except WireError as exc:
            return self._keep(self.core.bad_message("client", client, str(exc)))
        return self._keep(self.core.client_message(client, typed))

    def submit(self, request: str, client: bytes = CLIENT, **fields: Any) -> list[Send]:
        defaults: dict[str, Any] = {"model": "m", "steps": 6}
        if fields.get("method") != "sequential" and "init_sequence" not in fields:
            defaults["cores"] = 2
        spec = RequestSpec(**{**defaults, **fields})
        sends = self.from_client(
            raw("SUBMIT", {"request": spec.to_dict()}, request=request), client
        )
        for session in self.core.sessions.values():
            if session.client_id == request and session.client == client:
                self.ids[request] = session.id
        return sends

    def to(self, identity: bytes, kind: str, since: int = 0) -> list[Any]:
        return [
            s.message
            for s in self.sent[since:]
            if s.identity == identity and s.message.kind == kind
        ]

    def last(self, identity: bytes, kind: str) -> Any:
        found = self.to(identity, kind)
        assert found, f"nothing of kind {kind} was sent to {identity!r}"
        return found[-1]

    def prepared(
        self, identity: bytes, x0: torch.Tensor | None = None, solver: Any = unit_euler
    ) -> list[Send]:
        """The worker answers its last PREPARE (with x0 if it was asked for the initial one)."""
        prepare = self.last(identity, "PREPARE")
        fields, tensors = solver_spec(solver)
        frames = solver_tensors(tensors)
        x0 = torch.linspace(-1, 1, 4) if x0 is None else x0
        if prepare.initial:
            frames["x0"] = x0
        body = {"solver": fields, "x0_digest": tensor_digest(x0)}
        return self.from_worker(identity, raw("PREPARED", body, frames, request=prepare.request))

    def result(self, identity: bytes, **change: Any) -> list[Send]:
        """The worker answers its last EVAL correctly (``change`` overrides header fields)."""
        message = self.last(identity, "EVAL")
        entries = []
        for entry, latent in eval_entries(message):
            out = velocity(latent, entry.step)
            results = solve_targets(unit_euler, latent, out, entry.step, entry.targets)
            entries.append(ResultEntry(entry.task, entry.attempt, results))
        reply = ResultMessage(entries=tuple(entries), compute_s=0.001).ids(message)
        return self.from_worker(identity, replace(reply, **change))

    def failed(self, identity: bytes, code: str, kind: str = "EVAL") -> list[Send]:
        message = self.last(identity, kind)
        body: dict[str, Any] = {"code": code, "message": f"{code} for the test"}
        if kind == "EVAL":
            body["tasks"] = [[e.task, e.attempt] for e in message.entries]
        reply = raw(
            "FAILED", body, request=message.request, task=message.task, attempt=message.attempt
        )
        return self.from_worker(identity, reply)

    def serve(self, workers: list[bytes], limit: int = 1000, finish: bool = True) -> None:
        """Answer every outstanding job correctly until none is left (or ``limit`` rounds)."""
        for _ in range(limit):
            busy = [
                w for w in workers if (info := self.core.registry.get(w)) and info.job is not None
            ]
            if not busy:
                return
            for identity in busy:
                job = self.core.registry.workers[identity].job
                assert job is not None
                if job.kind == "PREPARE":
                    self.prepared(identity)
                elif job.kind == "EVAL":
                    self.result(identity)
                else:
                    media = torch.zeros(2, 2, dtype=torch.uint8)
                    pending = self.last(identity, "DECODE")
                    reply = raw(
                        "DECODED", {}, {"media": media}, request=pending.request, task=pending.task
                    )
                    self.from_worker(identity, reply)
        if finish:
            raise AssertionError("the request did not finish")

    def client_kinds(self, request: str, client: bytes = CLIENT) -> list[str]:
        return [
            s.message.kind
            for s in self.sent
            if s.to == "client" and s.identity == client and s.message.request == request
        ]

    def error(self, request: str, client: bytes = CLIENT) -> str:
        errors = [m for m in self.to(client, "ERROR") if m.request == request]
        assert errors, f"no ERROR for {request}"
        return str(errors[-1].code)


def sequential_hit(steps: int, x0: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.linspace(-1, 1, 4) if x0 is None else x0
    for step in range(steps):
        x = unit_euler(x, velocity(x, step), step, step + 1)
    return x


def one_busy_of_two() -> tuple[Broker, bytes, bytes]:
    """Two prepared workers and a CHORDS K=2 request whose one ready task runs on ``owner``."""
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2)
    broker.prepared(a)
    broker.prepared(b)
    owner = a if broker.core.registry.workers[a].job else b
    return broker, owner, b if owner == a else a


def hits(broker: Broker, request: str, client: bytes = CLIENT) -> list[Message]:
    return [m for m in broker.to(client, "HIT") if m.request == request]


# -- the happy path, for reference -------------------------------------------------------------


def test_a_request_runs_to_done_and_core_1_is_sequential():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    accepted = broker.submit("r1", cores=2, steps=6)
    assert [s.message.kind for s in accepted if s.to == "client"] == ["ACCEPTED"]
    # both workers are prepared, only the first is asked for the initial latent
    assert broker.last(a, "PREPARE").body()["initial"] is True
    assert broker.last(b, "PREPARE").body()["initial"] is False
    broker.serve([a, b])
    assert broker.client_kinds("r1")[-1] == "DONE"
    core1 = next(h for h in hits(broker, "r1") if h.body()["core"] == 1)
    assert torch.equal(core1.tensors["latent"], sequential_hit(6))
    assert broker.sessions == {}
    assert broker.to(a, "RELEASE") and broker.to(b, "RELEASE")


def test_eval_carries_targets_and_the_broker_only_adds():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", init_sequence=[0, 2], steps=6)
    broker.prepared(a)
    ((entry, _),) = eval_entries(broker.last(a, "EVAL"))
    assert (entry.step, entry.core, entry.targets) == (0, 1, (1, 2))  # fine step, core 2 init


@pytest.mark.parametrize(
    "fields, by_name",
    [
        ({"cores": 4, "steps": 20}, True),
        ({"cores": 4, "steps": 20, "stop": "core-index:1"}, True),
        ({"method": "sequential", "steps": 20}, True),
        ({"cores": 4, "steps": 20, "stop": "residual:1e-9"}, False),  # the stop reads hits
        ({"method": "paradigms", "cores": 4, "steps": 20}, False),  # it reads its window
    ],
)
def test_results_are_held_by_name_and_let_go_once_nothing_reads_them(fields, by_name):
    """A plan that only adds and subtracts is fed names (broker/results.py); the results stay
    bounded as on tensors (per core its input and what waits for a rectification: at most 2K
    latents), the hits are the same, and nothing is held once the request is done."""
    broker = Broker()
    workers = [broker.worker(f"w{i}") for i in range(4)]
    broker.submit("r1", **fields)
    session = broker.sessions["r1"]
    most = 0
    for _ in range(500):
        busy = [w for w in workers if (i := broker.core.registry.get(w)) and i.job is not None]
        if not busy:
            break
        job = broker.core.registry.workers[busy[0]].job
        assert job is not None
        broker.prepared(busy[0]) if job.kind == "PREPARE" else broker.result(busy[0])
        if session.plan is not None:
            assert session.by_name is by_name
            most = max(most, session.held_bytes())
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert len(session.results) == 0
    latent = 16  # torch.linspace(-1, 1, 4)
    cores = 1 if fields.get("method") == "sequential" else 4
    assert most <= 2 * cores * latent
    if fields.get("method") == "sequential":
        (hit,) = hits(broker, "r1")
        assert torch.equal(hit.tensors["latent"], sequential_hit(20))


# -- stale answers -----------------------------------------------------------------------------


def test_a_result_from_an_old_attempt_is_dropped():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    first = broker.last(a, "EVAL")
    assert first.attempt == 0
    broker.tick(advance=1.0)  # a missed its heartbeats: lost, its task re-queued
    assert broker.core.registry.get(a) is None
    b = broker.worker("b")
    broker.prepared(b)
    retry = broker.last(b, "EVAL")
    assert (retry.task, retry.attempt) == (first.task, 1)
    # a comes back and answers its old attempt: nothing it says counts
    a = broker.worker("a")
    reply = raw("RESULT", {"tasks": [[first.task, 0, [1]]]}, {"result.0.0": torch.zeros(4)})
    reply.request, reply.task, reply.attempt = "r1", first.task, 0
    broker.from_worker(a, reply)
    session = broker.sessions["r1"]
    assert session.evaluations == 0 and first.task in session.in_flight
    # b answering with the wrong attempt is stale too
    broker.result(b, attempt=0)
    assert session.evaluations == 0
    broker.result(b)
    assert session.evaluations == 1
    assert session.retries == 1


def test_messages_of_another_epoch_are_dropped_and_heartbeats_get_disconnect():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    message = broker.last(a, "EVAL")
    sends = broker.from_worker(a, raw("HEARTBEAT"), epoch=EPOCH + 1)
    assert [s.message.kind for s in sends] == ["DISCONNECT"]
    reply_epoch = EPOCH + 1
    entries = [ResultEntry(message.task, 0, {1: torch.zeros(4)})]
    reply = ResultMessage(
        entries=tuple(entries), compute_s=0.0, request="r1", task=message.task, attempt=0
    )
    broker.from_worker(a, reply, epoch=reply_epoch)
    assert broker.sessions["r1"].evaluations == 0
    assert broker.core.registry.workers[a].job is not None  # still waiting for the real answer


def test_an_unknown_worker_is_told_to_say_hello():
    broker = Broker()
    sends = broker.from_worker(b"worker/ghost", raw("HEARTBEAT"))
    assert [(s.identity, s.message.kind) for s in sends] == [(b"worker/ghost", "DISCONNECT")]


# -- worker errors and retries -----------------------------------------------------------------


def test_worker_error_retries_up_to_max_task_retries_then_fails():
    broker = Broker(max_task_retries=2)
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    task = broker.last(a, "EVAL").task
    for attempt in range(2):  # two failures: the task runs again each time
        broker.failed(a, "worker_error")
        again = broker.last(a, "EVAL")
        assert (again.task, again.attempt) == (task, attempt + 1)
        assert "r1" in broker.sessions
    broker.failed(a, "worker_error")  # the third failure of the same task fails the request
    assert broker.error("r1") == "worker_error"
    assert "r1" not in broker.sessions
    assert broker.to(a, "RELEASE")


def test_failures_are_counted_per_task_not_per_request():
    broker = Broker(max_task_retries=1)
    a = broker.worker("a")
    broker.submit("r1", method="sequential", steps=4)
    broker.prepared(a)
    broker.failed(a, "worker_error")  # task 0 fails once and succeeds
    broker.result(a)
    broker.failed(a, "worker_error")  # task 1 fails once: still within its own budget
    broker.result(a)
    assert "r1" in broker.sessions
    assert broker.sessions["r1"].failures == {("EVAL", 0): 1, ("EVAL", 1): 1}


def test_invalid_request_from_a_worker_fails_the_request_at_once():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.failed(a, "invalid_request", kind="PREPARE")
    assert broker.error("r1") == "invalid_request"


def test_not_prepared_prepares_the_worker_again_and_reruns_the_task():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    task = broker.last(a, "EVAL").task
    before = len(broker.to(a, "PREPARE"))
    broker.failed(a, "not_prepared")
    assert len(broker.to(a, "PREPARE")) == before + 1  # prepared again, not as the x0 source
    assert broker.last(a, "PREPARE").body()["initial"] is False
    assert "r1" not in broker.core.registry.workers[a].prepared
    broker.prepared(a)
    retry = broker.last(a, "EVAL")
    assert (retry.task, retry.attempt) == (task, 1)
    assert broker.sessions["r1"].failures == {}  # an evicted cache is not a failure


def test_a_prepare_that_fails_is_retried_and_asks_for_the_initial_latent_again():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.failed(a, "worker_error", kind="PREPARE")
    assert broker.last(a, "PREPARE").body()["initial"] is True
    assert len(broker.to(a, "PREPARE")) == 2


# -- bad answers from workers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem", ["no x0", "integer x0", "bad solver spec"], ids=lambda p: p.replace(" ", "-")
)
def test_a_bad_prepared_excludes_that_worker_and_prepares_another(problem):
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential")
    assert broker.last(a, "PREPARE").body()["initial"] is True and not broker.to(b, "PREPARE")
    frames = solver_tensors(solver_spec(unit_euler)[1])
    fields: dict[str, Any] = {"kind": "unit_euler"}
    if problem == "integer x0":
        frames["x0"] = torch.zeros(4, dtype=torch.uint8)  # the one integer dtype on the wire
    if problem == "bad solver spec":
        frames["x0"] = torch.zeros(4)
        fields = {"kind": "no-such-solver"}
    body = {"solver": fields, "x0_digest": tensor_digest(frames.get("x0", torch.zeros(4)))}
    broker.from_worker(a, raw("PREPARED", body, frames, request="r1"))
    session = broker.sessions["r1"]
    assert session.plan is None and a in session.excluded
    assert broker.to(a, "RELEASE")
    assert broker.last(b, "PREPARE").body()["initial"] is True  # b is asked for x0 now
    broker.prepared(b)
    broker.serve([a, b])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert len(broker.to(a, "PREPARE")) == 1  # never used for this request again


def test_losing_the_worker_asked_for_x0_asks_a_prepared_one():
    """The others prepared first; the one asked for the initial latent dies before answering."""
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2)
    broker.prepared(b)  # prepared, but not the source of x0
    assert broker.sessions["r1"].plan is None
    broker._keep(broker.core.worker_unreachable(a))
    again = broker.last(b, "PREPARE")
    assert again.body()["initial"] is True and len(broker.to(b, "PREPARE")) == 2
    broker.prepared(b)
    broker.serve([b])
    assert broker.client_kinds("r1")[-1] == "DONE"


def test_a_failed_with_a_malformed_task_list_drops_the_worker():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2)
    broker.prepared(a)
    broker.prepared(b)
    message = broker.last(a, "EVAL")
    body = {"code": "worker_error", "message": "x", "tasks": [["not", "ints"]]}
    reply = raw("FAILED", body, request="r1", task=message.task, attempt=message.attempt)
    sends = broker.from_worker(a, reply)
    assert broker.core.registry.get(a) is None
    assert any(s.identity == a and s.message.kind == "DISCONNECT" for s in sends)
    assert broker.last(b, "EVAL").attempt == 1
    assert "r1" in broker.sessions


def test_bad_prepareds_past_the_retries_fail_the_request():
    broker = Broker(max_task_retries=1)
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential")
    for worker in (a, b):
        broker.from_worker(
            worker,
            raw(
                "PREPARED",
                {"solver": {"kind": "unit_euler"}, "x0_digest": "0" * 32},
                request="r1",
            ),
        )
    assert broker.error("r1") == "bad_prepare"


BAD_DATA = ["wrong shape", "wrong dtype", "missing target", "nan", "inf"]
PROTOCOL = ["other task", "malformed"]


def bad_result(broker: Broker, worker: bytes, problem: str) -> tuple[Any, list[Send]]:
    """``worker`` answers its last EVAL with a result that has ``problem``."""
    message = broker.last(worker, "EVAL")
    ((entry, latent),) = eval_entries(message)
    good = solve_targets(
        unit_euler, latent, velocity(latent, entry.step), entry.step, entry.targets
    )
    tasks: list[Any] = [[entry.task, entry.attempt, list(entry.targets)]]
    tensors = {f"result.0.{k}": good[t] for k, t in enumerate(entry.targets)}
    last = f"result.0.{len(entry.targets) - 1}"
    if problem == "wrong shape":
        tensors["result.0.0"] = torch.zeros(5)
    elif problem == "wrong dtype":
        tensors[last] = good[entry.targets[-1]].double()
    elif problem == "missing target":
        tasks = [[entry.task, entry.attempt, [entry.targets[0]]]]
        tensors = {"result.0.0": good[entry.targets[0]]}
    elif problem in ("nan", "inf"):
        tensors[last] = tensors[last].clone()
        tensors[last][1] = float(problem)
    elif problem == "other task":
        tasks = [[entry.task + 100, entry.attempt, list(entry.targets)]]
    elif problem == "malformed":
        tasks = [[entry.task, entry.attempt, "targets"]]
    reply = raw("RESULT", {"tasks": tasks}, tensors, request=message.request)
    reply.task, reply.attempt = message.task, message.attempt
    return entry, broker.from_worker(worker, reply)


@pytest.mark.parametrize("problem", PROTOCOL)
def test_a_result_that_breaks_the_protocol_drops_the_worker(problem):
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2, init_sequence=[0, 2], steps=6)
    broker.prepared(a)
    broker.prepared(b)
    entry, sends = bad_result(broker, a, problem)
    assert broker.core.registry.get(a) is None
    assert any(s.identity == a and s.message.kind == "DISCONNECT" for s in sends)
    session = broker.sessions["r1"]
    assert session.evaluations == 0 and session.retries == 1
    retry = broker.last(b, "EVAL")
    assert eval_entries(retry)[0][0].task == entry.task and retry.attempt == 1
    broker.serve([b])
    assert broker.client_kinds("r1")[-1] == "DONE"


@pytest.mark.parametrize("problem", BAD_DATA)
def test_a_bad_result_never_reaches_the_plan_and_reruns_on_another_worker(problem):
    """Shape, dtype and finiteness are checked before the plan sees a result. The worker stays
    registered but gets no more work for that request, and the hits are those of an honest
    pool, bit for bit."""
    honest = Broker()
    a, b = honest.worker("a"), honest.worker("b")
    honest.submit("r1", cores=2, init_sequence=[0, 2], steps=6)
    honest.serve([a, b])
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2, init_sequence=[0, 2], steps=6)
    broker.prepared(a)
    broker.prepared(b)
    entry, sends = bad_result(broker, a, problem)
    assert broker.core.registry.get(a) is not None  # not dropped: it may be a bad GPU
    assert any(s.identity == a and s.message.kind == "RELEASE" for s in sends)
    session = broker.sessions["r1"]
    assert session.evaluations == 0 and session.retries == 1
    suspects = {} if problem == "wrong dtype" else {entry.task: {"name:a@?"}}
    assert a in session.excluded and session.suspects == suspects
    retry = broker.last(b, "EVAL")
    assert eval_entries(retry)[0][0].task == entry.task and retry.attempt == 1
    before = len(broker.to(a, "EVAL"))
    broker.serve([a, b])
    assert len(broker.to(a, "EVAL")) == before  # no more work for a on r1
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert [(h.body()["core"], h.body()["round"]) for h in hits(broker, "r1")] == [
        (h.body()["core"], h.body()["round"]) for h in hits(honest, "r1")
    ]
    for got, want in zip(hits(broker, "r1"), hits(honest, "r1")):
        assert torch.equal(got.tensors["latent"], want.tensors["latent"])
    # b's good result for the same task confirmed the fault: one strike, not yet quarantined
    assert broker.core.registry.workers[a].bad_results == (0 if problem == "wrong dtype" else 1)
    assert not broker.core.quarantined()


def test_a_malformed_message_from_a_worker_disconnects_it_and_requeues_its_work():
    broker, owner, other = one_busy_of_two()
    sends = broker._keep(broker.core.bad_message("worker", owner, "not msgpack"))
    assert any(s.identity == owner and s.message.kind == "DISCONNECT" for s in sends)
    assert broker.core.registry.get(owner) is None
    assert broker.last(other, "EVAL").attempt == 1


def test_a_worker_may_not_send_client_kinds():
    broker = Broker()
    a = broker.worker("a")
    sends = broker.from_worker(a, raw("SUBMIT", {"request": {}}, request="x"))
    assert [s.message.kind for s in sends] == ["DISCONNECT"]
    assert broker.core.registry.get(a) is None


def test_a_hello_of_another_protocol_version_is_refused():
    broker = Broker()
    body = {
        "worker": "old",
        "model": "m",
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 1,
        "version": "0.0",
        "protocol": 1,
    }
    sends = broker.from_worker(b"worker/old", raw("HELLO", body))
    assert [s.message.kind for s in sends] == ["DISCONNECT"]
    assert "protocol" in sends[0].message.body()["reason"]
    assert broker.core.registry.workers == {}


def test_a_busy_worker_that_says_hello_again_loses_its_work():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    assert broker.core.registry.workers[a].job is not None
    broker.worker("a")  # it restarted under the same routing id
    session = broker.sessions["r1"]
    assert session.retries == 1 and a not in session.prepared
    assert broker.last(a, "PREPARE")  # prepared again before it gets the task back


# -- lost workers ------------------------------------------------------------------------------


def test_a_worker_lost_mid_batch_requeues_every_task_of_the_batch():
    broker = Broker()
    a = broker.worker("a", max_batch=4)
    broker.submit("r1", cores=4, init_sequence=[0, 1, 2, 3], steps=6, batch=4)
    broker.prepared(a)
    broker.serve([a], limit=3, finish=False)
    batch = broker.last(a, "EVAL")
    taken = [t[0] for t in batch.body()["tasks"]]
    assert len(taken) > 1
    broker._keep(broker.core.worker_unreachable(a))
    session = broker.sessions["r1"]
    assert session.in_flight == {} and session.retries == len(taken)
    assert all(session.tasks.attempts[t] == 1 for t in taken)
    b = broker.worker("b", max_batch=4)
    broker.prepared(b)
    retry = broker.last(b, "EVAL")
    assert sorted(t[0] for t in retry.body()["tasks"]) == sorted(taken)
    assert {t[1] for t in retry.body()["tasks"]} == {1}


def test_silence_past_the_liveness_window_loses_the_worker():
    broker = Broker(heartbeat_s=0.25, liveness=3)
    a = broker.worker("a")
    broker.tick(advance=0.7)
    assert broker.core.registry.get(a) is not None
    broker.from_worker(a, raw("HEARTBEAT"))
    broker.tick(advance=0.7)
    assert broker.core.registry.get(a) is not None  # the heartbeat reset its window
    broker.tick(advance=0.1)
    assert broker.core.registry.get(a) is None


def test_a_worker_sending_a_large_result_gets_time_for_the_transfer():
    broker = Broker(heartbeat_s=0.25, liveness=3, transfer_floor_bytes_s=100e6)
    a = broker.worker("a")
    big = torch.zeros(16 << 20)  # 64 MiB: its RESULT of 2 targets takes up to 1.3 s at 100 MB/s
    broker.submit("r1", init_sequence=[0, 2], steps=6)
    broker.prepared(a, x0=big)
    job = broker.core.registry.workers[a].job
    assert job is not None and job.expected_bytes == 2 * big.nbytes
    broker.tick(advance=1.5)  # past 0.75 s of plain liveness, within the transfer allowance
    assert broker.core.registry.get(a) is not None
    broker.tick(advance=0.7)
    assert broker.core.registry.get(a) is None


def test_a_tcp_disconnect_probes_every_worker():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    sends = broker._keep(broker.core.connection_dropped())
    assert sorted(s.identity for s in sends if s.message.kind == "HEARTBEAT") == [a, b]


def test_a_worker_that_disconnects_gives_its_task_back():
    broker, owner, other = one_busy_of_two()
    broker.from_worker(owner, raw("DISCONNECT", {"reason": "shutting down"}))
    assert broker.core.registry.get(owner) is None
    assert broker.last(other, "EVAL").attempt == 1


# -- decodes -----------------------------------------------------------------------------------


def decode_setup() -> tuple[Broker, bytes, bytes]:
    """Two prepared workers and a request whose zero-th hit (its first) awaits its decode."""
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", init_sequence=[0, 4], steps=6, output="media")
    broker.prepared(a)
    broker.prepared(b)
    for _ in range(3):
        if any((w.job and w.job.kind == "DECODE") for w in broker.core.registry.workers.values()):
            break
        for identity in (a, b):
            job = broker.core.registry.workers[identity].job
            if job is not None and job.kind == "EVAL":
                broker.result(identity)
    return broker, a, b


def decoder(broker: Broker, a: bytes, b: bytes) -> bytes:
    for identity in (a, b):
        job = broker.core.registry.workers[identity].job
        if job is not None and job.kind == "DECODE":
            return identity
    raise AssertionError("no DECODE in flight")


def test_a_lost_decode_is_retried_on_another_worker():
    broker, a, b = decode_setup()
    first = decoder(broker, a, b)
    other = b if first == a else a
    broker._keep(broker.core.worker_unreachable(first))
    for _ in range(5):  # the other worker finishes its task, then takes the decode first
        job = broker.core.registry.workers[other].job
        if job is not None and job.kind == "DECODE":
            break
        broker.result(other)
    assert broker.core.registry.workers[other].job.kind == "DECODE"
    media = torch.ones(2, dtype=torch.uint8)
    task = broker.last(other, "DECODE").task
    broker.from_worker(other, raw("DECODED", {}, {"media": media}, request="r1", task=task))
    hit = hits(broker, "r1")[0]
    assert hit.body()["core"] == 0
    assert torch.equal(hit.tensors["media"], media) and "latent" not in hit.tensors
    broker.serve([other])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert [h.body()["core"] for h in hits(broker, "r1")] == [0, 2, 1]


def test_a_failed_decode_is_retried_and_counted_against_the_decode():
    broker, a, b = decode_setup()
    first = decoder(broker, a, b)
    broker.failed(first, "worker_error", kind="DECODE")
    session = broker.sessions["r1"]
    assert session.failures == {("DECODE", 1): 1}  # not against task 1 of the plan
    again = decoder(broker, a, b)
    task = broker.last(again, "DECODE").task
    broker.from_worker(again, raw("DECODED", {}, {}, request="r1", task=task))  # no media
    assert session.failures == {("DECODE", 1): 2}
    assert "r1" in broker.sessions


def test_decodes_without_media_past_the_retries_fail_the_request():
    broker, a, b = decode_setup()
    broker = broker  # max_task_retries 3: the fourth failure ends it
    for _ in range(4):
        worker = decoder(broker, a, b)
        task = broker.last(worker, "DECODE").task
        broker.from_worker(worker, raw("DECODED", {}, {}, request="r1", task=task))
    assert broker.error("r1") == "decode_failed"


# -- admission, draining, capacity, clients ----------------------------------------------------


def test_a_request_over_max_request_bytes_is_refused_as_too_large():
    broker = Broker(max_request_bytes=1 << 20)
    a = broker.worker("a")
    broker.submit("r1", cores=2, steps=6)
    x0 = torch.zeros(64 << 10)  # 256 KiB: the 2-core working set is 10 of them, 2.5 MiB
    broker.prepared(a, x0=x0)
    assert broker.error("r1") == "too_large"
    assert not broker.to(a, "EVAL")
    assert [m.request for m in broker.to(a, "RELEASE")] == [
        broker.ids["r1"]
    ]  # its cached context goes
    assert "r1" not in broker.sessions
    small = Broker(max_request_bytes=1 << 20)
    a = small.worker("a")
    small.submit("r2", cores=2, steps=6)
    small.prepared(a, x0=torch.zeros(1 << 10))
    assert small.to(a, "EVAL")


def test_draining_refuses_new_requests_finishes_running_ones_then_stops():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential", steps=3)
    broker.prepared(a)
    broker._keep(broker.core.begin_drain())
    broker.submit("r2", method="sequential")
    assert broker.error("r2") == "draining"
    assert not broker.core.stopped
    broker.serve([a])
    assert broker.client_kinds("r1")[-1] == "DONE"
    broker.tick(advance=0.01)
    assert broker.core.stopped
    assert broker.last(a, "DISCONNECT")


def test_draining_fails_what_is_still_running_at_the_deadline():
    broker = Broker(drain_timeout_s=5.0)
    a = broker.worker("a")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    broker._keep(broker.core.begin_drain())
    broker.from_worker(a, raw("HEARTBEAT"))
    broker.tick(advance=0.5)
    assert not broker.core.stopped
    broker.clock.now += 5.0
    broker.from_worker(a, raw("HEARTBEAT"))
    broker.tick()
    assert broker.core.stopped and broker.error("r1") == "shutdown"


def test_no_capable_worker_fails_after_the_worker_timeout():
    broker = Broker(worker_timeout_s=2.0)
    broker.worker("a", model="other")
    broker.submit("r1", method="sequential")
    broker.tick(advance=0.1)
    broker.tick(advance=1.5)
    assert "r1" in broker.sessions
    broker.tick(advance=0.6)
    assert broker.error("r1") == "no_worker"


def test_a_worker_joining_before_the_timeout_serves_the_waiting_request():
    broker = Broker(worker_timeout_s=2.0)
    broker.submit("r1", method="sequential")
    broker.tick(advance=1.5)
    a = broker.worker("a")
    broker.tick(advance=1.0)
    assert broker.to(a, "PREPARE") and "r1" in broker.sessions


def test_a_client_gone_ends_its_requests_and_releases_their_workers():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential", client=b"c1")
    broker.submit("r2", method="sequential", client=b"c2")
    broker.prepared(a)
    broker._keep(broker.core.client_gone(b"c1"))
    assert "r1" not in broker.sessions and "r2" in broker.sessions
    assert [m.request for m in broker.to(a, "RELEASE")] == [broker.ids["r1"]]
    assert "DONE" not in broker.client_kinds("r1", b"c1")


def test_cancel_only_works_for_the_owner():
    broker = Broker()
    broker.worker("a")
    broker.submit("r1", method="sequential", client=b"c1")
    broker.from_client(raw("CANCEL", request="r1"), b"c2")
    assert "r1" in broker.sessions
    broker.from_client(raw("CANCEL", request="r1"), b"c1")
    assert "r1" not in broker.sessions
    done = [m for m in broker.to(b"c1", "DONE") if m.request == "r1"]
    assert done and done[0].body()["stats"]["cancelled"] is True


def test_request_ids_are_namespaced_by_client_so_they_cannot_be_squatted():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", client=b"c2", method="sequential")  # an attacker takes the id first
    first = broker.ids["r1"]
    broker.submit("r1", client=b"c1", method="sequential")  # the owner's own: its own request
    assert broker.ids["r1"] != first and len(broker.core.sessions) == 2
    assert [m.request for m in broker.to(b"c1", "ACCEPTED")] == ["r1"]
    broker.submit("r1", client=b"c1", method="sequential")  # its resubmission: the same one
    assert [m.request for m in broker.to(b"c1", "ACCEPTED")] == ["r1", "r1"]
    assert len(broker.core.sessions) == 2
    broker.from_client(raw("CANCEL", request="r1"), b"c2")  # cancels only c2's own
    assert [s.owner for s in broker.core.sessions.values()] == [f"conn:{b'c1'.hex()}"]
    broker.serve([a])
    assert broker.client_kinds("r1", b"c1")[-1] == "DONE"
    assert broker.client_kinds("r1", b"c2") == ["ACCEPTED", "DONE"]  # its cancel


def test_a_bad_submit_is_refused_and_malformed_client_messages_get_bad_message():
    broker = Broker()
    broker.from_client(raw("SUBMIT", {"request": {"model": "m", "steps": 0}}, request="r1"))
    assert broker.error("r1") == "invalid_request"
    broker._keep(broker.core.bad_message("client", CLIENT, "garbage"))
    assert broker.last(CLIENT, "ERROR").body()["code"] == "bad_message"
    broker.from_client(raw("WELCOME", {"heartbeat_ms": 250}))
    assert broker.last(CLIENT, "ERROR").body()["code"] == "bad_message"
    broker.from_client(raw("HELLO", hello_body("w")))  # a worker's kind: the wrong port
    assert broker.last(CLIENT, "ERROR").body()["code"] == "wrong_port"


def test_status_shows_a_client_its_own_requests_and_workers_without_routing_ids():
    broker = Broker()
    broker.worker("a")
    broker.submit("r1", client=b"c1")
    broker.submit("r2", client=b"c2")
    broker.from_client(raw("STATUS"), b"c1")
    status = broker.last(b"c1", "STATUS").body()
    assert status["epoch"] == EPOCH and [s["id"] for s in status["sessions"]] == ["r1"]
    assert status["sessions_total"] == 1 and status["role"] == "client"
    (worker,) = status["workers"]
    assert worker["name"] == "worker-1" and "principal" not in worker
    assert b"worker/a".decode() not in str(status)
    broker._keep(broker.core.client_message(b"ops", as_sent(raw("STATUS")), "key:ops", "admin"))
    admin = broker.last(b"ops", "STATUS").body()
    assert sorted(s["id"] for s in admin["sessions"]) == ["r1", "r2"]
    assert admin["workers"][0]["name"] == "a" and admin["role"] == "admin"
    assert {s["owner"] for s in admin["sessions"]} == {f"conn:{b'c1'.hex()}", f"conn:{b'c2'.hex()}"}


def test_status_pages_stay_under_the_header_limit():
    broker = Broker(max_client_requests=1000)
    for i in range(200):
        broker.submit(f"{i:03d}" + "x" * 125)
    for _ in range(150):
        broker.worker(f"w{_}-" + "n" * 200)
    seen: list[str] = []
    offset = 0
    while True:
        broker.from_client(raw("STATUS", {"offset": offset}))  # encodes, or fails here
        page = broker.last(CLIENT, "STATUS").body()
        assert page["sessions_total"] == 200 and page["workers_total"] == 150
        assert len(page["sessions"]) <= STATUS_PAGE and len(page["workers"]) <= STATUS_PAGE
        if not page["sessions"]:
            break
        seen += [s["id"] for s in page["sessions"]]
        offset += len(page["sessions"])
    assert sorted(seen) == sorted(broker.ids) and len(seen) == 200


def test_a_client_heartbeat_names_the_requests_the_broker_does_not_know():
    broker = Broker()
    broker.submit("r1", client=b"c1")
    broker.submit("r2", client=b"c2")
    ids = ["r1", "r2", "gone"] + [f"x{i}" for i in range(600)]
    broker.from_client(raw("HEARTBEAT", {"in_flight": ids}), b"c1")
    missing = broker.last(b"c1", "HEARTBEAT").body()["missing"]
    assert missing[:2] == ["r2", "gone"]  # r2 is c2's, not c1's
    assert len(missing) == 256 - 1  # one page of ids at most is looked at


# -- dispatch ----------------------------------------------------------------------------------


def test_each_idle_worker_takes_the_next_session_in_turn():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential")
    broker.submit("r2", method="sequential")
    assert broker.last(a, "PREPARE").request == broker.ids["r1"]
    assert broker.last(b, "PREPARE").request == broker.ids["r2"]


def test_a_request_prepares_at_most_one_worker_per_core():
    broker = Broker()
    workers = [broker.worker(f"w{i}") for i in range(4)]
    broker.submit("r1", cores=2)
    assert sum(1 for w in workers if broker.to(w, "PREPARE")) == 2


def test_workers_of_another_model_are_not_used():
    broker = Broker()
    other = broker.worker("x", model="other")
    broker.submit("r1")
    assert not broker.to(other, "PREPARE")


def test_a_session_over_its_budget_waits_for_the_oldest_round():
    """A worker holds core 2's first task; core 1 runs on. Within RUN_AHEAD_ROUNDS of the stuck
    task core 1 keeps going whatever the budget; past it, only while the session fits."""
    broker = Broker()
    slow, fast = broker.worker("slow"), broker.worker("fast")
    broker.submit("r1", init_sequence=[0, 8], steps=20)
    broker.prepared(slow)
    broker.prepared(fast)
    session = broker.sessions["r1"]
    session.budget_bytes = 0  # nothing fits: only the run-ahead window is allowed
    worker_of_core2 = None
    for _ in range(10):
        for identity in (slow, fast):
            job = broker.core.registry.workers[identity].job
            if job is None:
                continue
            if identity == slow and any(t.core == 2 for t, _ in job.tasks):
                worker_of_core2 = identity
                continue  # stuck
            broker.result(identity)
    assert worker_of_core2 == slow, "core 2's first task went to the slow worker"
    stuck_round = session.tasks.frontier()
    queued = session.queued_tasks()
    assert queued and min(t.round for t in queued) == stuck_round + 3
    assert session.dispatchable() == 0
    assert broker.core.registry.workers[fast].job is None  # idle, as the budget requires
    session.budget_bytes = 1 << 30
    broker.tick()
    assert broker.core.registry.workers[fast].job is not None  # within budget: runs ahead


# -- trust: faulty workers, admission, noisy peers --------------------------------------------


def nan_pool(requests: int, **config: Any) -> tuple[Broker, bytes, list[bytes]]:
    """Two honest workers and one whose every result is NaN, serving ``requests`` CHORDS
    requests to the end; returns the broker, the faulty worker and the honest ones."""
    broker = Broker(**config)
    bad, *honest = broker.worker("bad"), broker.worker("h1"), broker.worker("h2")
    for i in range(requests):
        broker.submit(f"r{i}", cores=3, steps=8, seed=i)
    for _ in range(2000):
        busy = [w for w, info in broker.core.registry.workers.items() if info.job is not None]
        if not busy:
            break
        for identity in busy:
            job = broker.core.registry.workers[identity].job
            assert job is not None
            if job.kind == "PREPARE":
                broker.prepared(identity)
            elif identity == bad:
                bad_result(broker, identity, "nan")
            else:
                broker.result(identity)
    return broker, bad, honest


def test_a_worker_with_repeated_confirmed_bad_results_is_quarantined():
    broker, bad, honest = nan_pool(4)
    for i in range(4):
        assert broker.client_kinds(f"r{i}")[-1] == "DONE"
    info = broker.core.registry.workers[bad]
    assert info.bad_results >= 2 and info.state(broker.clock.now) == "quarantined"
    assert broker.core.quarantined() == [info]
    broker.from_client(raw("STATUS"))
    states = [w["state"] for w in broker.last(CLIENT, "STATUS").body()["workers"]]
    assert states.count("quarantined") == 1
    # no work while quarantined, even after it registers again under the same key
    broker.worker("bad")
    broker.submit("later", cores=3, steps=8)
    assert not [m for m in broker.to(bad, "PREPARE") if m.request == broker.ids["later"]]
    assert broker.core.registry.workers[bad].quarantined(broker.clock.now)
    broker.serve(honest)
    assert broker.client_kinds("later")[-1] == "DONE"
    # and back in service once the quarantine is over
    broker.clock.now += broker.core.config.quarantine_s + 1
    broker.submit("after", method="sequential")
    broker.tick()
    assert any(m.request == broker.ids["after"] for m in broker.to(bad, "PREPARE")) or any(
        m.request == broker.ids["after"] for w in honest for m in broker.to(w, "PREPARE")
    )
    assert broker.core.quarantined() == []


def insecure_hello(
    broker: Broker, identity: bytes, name: str, address: str | None = None, **body: Any
) -> list[Send]:
    """A HELLO on an insecure pool from ``address`` (the Peer-Address the server reads)."""
    message = as_sent(raw("HELLO", hello_body(name, **body)))
    return broker._keep(broker.core.worker_message(identity, message, None, address))


def test_an_insecure_worker_back_under_its_name_and_host_stays_quarantined():
    """Without CURVE a worker is the name its HELLO claims on its host: a new connection
    under them keeps the quarantine; the same name from another host is another worker."""
    broker, bad, _ = nan_pool(4)
    info = broker.core.registry.workers[bad]
    assert info.principal == "name:bad@?" and info.quarantined(broker.clock.now)
    strikes = info.bad_results
    broker.from_worker(bad, raw("DISCONNECT", {"reason": "restarting"}))
    assert broker.core.registry.get(bad) is None
    insecure_hello(broker, b"worker/bad-again", "bad")
    again = broker.core.registry.workers[b"worker/bad-again"]
    assert again.quarantined(broker.clock.now) and again.bad_results == strikes
    insecure_hello(broker, b"worker/bad-elsewhere", "bad", "192.0.2.7")
    elsewhere = broker.core.registry.workers[b"worker/bad-elsewhere"]
    assert elsewhere.principal == "name:bad@192.0.2.7"
    assert not elsewhere.quarantined(broker.clock.now) and elsewhere.bad_results == 0


def test_an_insecure_workers_host_is_its_connections_address_else_its_data_endpoints():
    broker = Broker()
    insecure_hello(broker, b"w1", "gpu0", "198.51.100.4", data="tcp://10.0.0.5:7000")
    insecure_hello(broker, b"w2", "gpu0", None, data="tcp://10.0.0.5:7000")
    insecure_hello(broker, b"w3", "gpu0")
    principals = [broker.core.registry.workers[w].principal for w in (b"w1", b"w2", b"w3")]
    assert principals == ["name:gpu0@198.51.100.4", "name:gpu0@10.0.0.5", "name:gpu0@?"]
    # its later messages are its own, under that principal (no other check without keys)
    message = as_sent(raw("HEARTBEAT", epoch=EPOCH))
    assert broker._keep(broker.core.worker_message(b"w2", message)) == []
    assert broker.core.registry.get(b"w2") is not None


def test_a_workers_learnt_speed_follows_its_principal_across_a_reconnect():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential", steps=3)
    broker.prepared(a)
    while broker.core.registry.workers[a].job is not None:
        broker.clock.now += 0.04
        broker.result(a)
    learnt = dict(broker.core.registry.workers[a].speed)
    assert learnt and all(s == pytest.approx(0.04) for s in learnt.values())
    broker.from_worker(a, raw("DISCONNECT", {"reason": "restarting"}))
    insecure_hello(broker, b"worker/a-again", "a")
    assert broker.core.registry.workers[b"worker/a-again"].speed == learnt
    # another model (or device) under the same name learns its own
    broker.from_worker(b"worker/a-again", raw("DISCONNECT", {"reason": "restarting"}))
    insecure_hello(broker, b"worker/a-other", "a", model="other")
    assert broker.core.registry.workers[b"worker/a-other"].speed == {}


def test_the_remembered_speeds_are_bounded_oldest_forgotten_first():
    registry = WorkerRegistry(1.0, remembered=2)
    for name in ("a", "b", "c"):
        info = WorkerInfo(name.encode(), name, "m", "cpu", "float32", 1, 0.0, principal=name)
        info.speed[(16, 1)] = 0.5
        registry.hello(info)
        registry.remove(info.identity)
    assert registry.learnt("a", "m", "cpu") == {}  # the oldest, forgotten
    assert registry.learnt("c", "m", "cpu") == {(16, 1): 0.5}
    assert registry.learnt("c", "m", "cpu") == {}  # handed to its worker: not kept twice


def test_the_hits_of_a_pool_with_a_nan_worker_equal_an_honest_pools():
    broker, _, _ = nan_pool(2)
    honest = Broker()
    workers = [honest.worker("h1"), honest.worker("h2")]
    for i in range(2):
        honest.submit(f"r{i}", cores=3, steps=8, seed=i)
    honest.serve(workers)
    for i in range(2):
        got, want = hits(broker, f"r{i}"), hits(honest, f"r{i}")
        assert [(h.body()["core"], h.body()["round"]) for h in got] == [
            (h.body()["core"], h.body()["round"]) for h in want
        ]
        assert all(torch.equal(g.tensors["latent"], w.tensors["latent"]) for g, w in zip(got, want))


def test_a_request_that_is_non_finite_everywhere_fails_and_no_worker_is_blamed():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential")
    broker.prepared(a)
    bad_result(broker, a, "nan")
    broker.prepared(b)
    bad_result(broker, b, "nan")  # every worker there is: the request itself diverges
    assert broker.error("r1") == "non_finite"
    assert "no healthy worker" in broker.last(CLIENT, "ERROR").body()["message"]
    assert broker.core.quarantined() == []
    assert {w.bad_results for w in broker.core.workers_view().values()} == {0}  # no strike


def test_a_non_finite_initial_latent_is_a_bad_prepared():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential")
    broker.prepared(a, x0=torch.tensor([0.0, float("nan"), 1.0, 2.0]))
    session = broker.sessions["r1"]
    assert session.plan is None and a in session.excluded
    broker.prepared(b)
    broker.serve([b])
    assert broker.client_kinds("r1")[-1] == "DONE"


@pytest.mark.parametrize("order", ["source first", "other first"])
def test_two_workers_with_different_initial_latents_stop_the_request(order):
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=2)
    source = a if broker.last(a, "PREPARE").body()["initial"] else b
    other = b if source == a else a
    different = torch.linspace(-1, 1, 4) + 1e-6
    if order == "source first":
        broker.prepared(source)
        broker.prepared(other, x0=different)
    else:
        broker.prepared(other, x0=different)
        broker.prepared(source)
    assert broker.error("r1") == "x0_mismatch"
    text = broker.last(CLIENT, "ERROR").body()["message"]
    assert "a" in text.split("workers ")[1] and " b " in text.replace(",", " ")
    assert broker.sessions == {}


def test_admission_limits_refuse_with_busy_and_a_retry_hint():
    broker = Broker(max_sessions=3, max_client_requests=2, max_queued_tasks=100)
    broker.submit("a1", client=b"c1")
    broker.submit("a2", client=b"c1")
    broker.submit("a3", client=b"c1")  # over the per-client limit
    assert broker.error("a3", b"c1") == "busy"
    refusal = broker.last(b"c1", "ERROR").body()
    assert refusal["retry_after_s"] == broker.core.config.busy_retry_s > 0
    assert "this client" in refusal["message"]
    broker.submit("b1", client=b"c2")
    broker.submit("b2", client=b"c2")  # over the broker's session limit
    assert (
        broker.error("b2", b"c2") == "busy"
        and "runs 3" in broker.last(b"c2", "ERROR").body()["message"]
    )
    broker.from_client(raw("CANCEL", request="a1"), b"c1")  # one ends: room again
    broker.submit("a3", client=b"c1")
    assert broker.client_kinds("a3", b"c1")[-1] == "ACCEPTED"
    running = broker.core.sessions.running_for
    assert running(f"conn:{b'c1'.hex()}") == 2 and running(f"conn:{b'c2'.hex()}") == 1


def test_queued_tasks_are_bounded():
    """A request may queue up to its cores' worth of ready tasks: admission counts them."""
    broker = Broker(max_queued_tasks=6)
    broker.submit("r1", cores=8, steps=20)
    assert broker.error("r1") == "busy"
    assert "waiting for workers" in broker.last(CLIENT, "ERROR").body()["message"]
    broker.submit("r2", cores=4, steps=20)
    assert broker.client_kinds("r2") == ["ACCEPTED"]


def test_a_worker_limit_refuses_new_workers_with_a_reason():
    broker = Broker(max_workers=1)
    broker.worker("a")
    body = hello_body("b")
    sends = broker.from_worker(b"worker/b", raw("HELLO", body))
    assert [s.message.kind for s in sends] == ["DISCONNECT"]
    assert "busy" in sends[0].message.body()["reason"] and len(broker.core.registry.workers) == 1
    body["worker"] = "c" * 300
    sends = broker.from_worker(b"worker/c", raw("HELLO", body))
    assert [s.message.kind for s in sends] == ["DISCONNECT"]


def test_a_message_under_a_workers_routing_id_from_another_key_is_rejected():
    broker, owner, other = one_busy_of_two()
    message = as_sent(raw("HEARTBEAT", epoch=EPOCH))
    sends = broker._keep(broker.core.worker_message(owner, message, "key:someone-else"))
    assert any(s.message.kind == "DISCONNECT" for s in sends)
    assert broker.core.registry.get(owner) is None  # its task runs on the other worker
    assert broker.last(other, "EVAL").attempt == 1


def test_malformed_traffic_is_logged_at_a_bounded_rate_per_peer(caplog):
    broker = Broker(log_burst=3, log_interval_s=10.0)
    answers = 0
    with caplog.at_level("WARNING", logger="chords.broker"):
        for _ in range(500):
            answers += len(broker._keep(broker.core.bad_message("client", b"noisy", "garbage")))
        broker.clock.now += 11
        broker.core.bad_message("client", b"noisy", "garbage")
        broker.core.bad_message("client", b"other", "garbage")
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 3 + 1 + 1
    assert "497 similar lines from this peer suppressed" in lines[3]
    assert answers == 500  # every bad message still gets its typed answer
    assert broker.last(b"noisy", "ERROR").body()["code"] == "bad_message"


def test_a_request_for_more_cores_than_max_cores_is_invalid_and_accepted_fits_the_header():
    broker = Broker()
    request = {**RequestSpec(model="m", steps=10_000, cores=2).to_dict(), "cores": 10_000}
    broker.from_client(raw("SUBMIT", {"request": request}, request="r1"))
    assert broker.error("r1") == "invalid_request"
    broker.submit("r2", cores=256, steps=10_000)  # ACCEPTED lists 256 init steps and hits
    assert broker.client_kinds("r2") == ["ACCEPTED"]


# -- heterogeneous pools: speed model, earliest finish time, deadlines ------------------------


def serve_timed(broker: Broker, speeds: dict[bytes, float], limit: int = 2000) -> None:
    """A discrete-event run: every EVAL takes its worker ``speeds[w]`` seconds of fake time
    (PREPAREs none); the job that finishes first is answered first, until none is left."""
    for _ in range(limit):
        if not serve_timed_once(broker, speeds):
            return
    raise AssertionError("the pool did not finish")


def serve_timed_once(broker: Broker, speeds: dict[bytes, float]) -> bool:
    """One event of ``serve_timed``: the job that finishes first is answered (False: none)."""
    jobs = [
        (info.job.sent_at + (speeds[w] if info.job.kind == "EVAL" else 0.0), w)
        for w, info in broker.core.registry.workers.items()
        if w in speeds and info.job is not None and not info.job.late
    ]
    if not jobs:
        return False
    finish, identity = min(jobs)
    broker.clock.now = max(broker.clock.now, finish)
    if broker.core.registry.workers[identity].job.kind == "PREPARE":
        broker.prepared(identity)
    else:
        broker.result(identity)
    return True


def timed_pool(slow_s: float, fast_s: float) -> tuple[Broker, bytes, bytes]:
    """A slow and a fast worker with speed estimates learnt from a warm-up request."""
    broker = Broker(deadline_floor_s=0.0)
    slow, fast = broker.worker("slow"), broker.worker("fast")
    broker.submit("warm", cores=2, steps=6)
    serve_timed(broker, {slow: slow_s, fast: fast_s})
    assert broker.client_kinds("warm")[-1] == "DONE"
    return broker, slow, fast


def test_each_worker_learns_its_speed_and_a_new_worker_starts_from_the_pool_median():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    broker.submit("r1", method="sequential", steps=4)
    broker.prepared(a)
    broker.prepared(b) if broker.core.registry.workers[b].job else None
    for _ in range(4):
        busy = [w for w in (a, b) if broker.core.registry.workers[w].job is not None]
        if not busy:
            break
        broker.clock.now += 0.04
        broker.result(busy[0])
    worker = next(w for w in (a, b) if broker.core.registry.workers[w].speed)
    key = broker.core.registry.workers[worker].speed.copy().popitem()[0]
    assert broker.core.registry.workers[worker].speed[key] == pytest.approx(0.04)
    newcomer = broker.worker("c")
    info = broker.core.registry.workers[newcomer]
    assert broker.core.registry.expected(info, key) == pytest.approx(0.04)
    broker.from_client(raw("STATUS"))
    shown = broker.last(CLIENT, "STATUS").body()["workers"]
    assert any(w["expected_ms"] == {f"{key[0]}x{key[1]}": pytest.approx(40.0)} for w in shown)


def test_a_ready_task_waits_for_a_fast_worker_rather_than_go_to_an_idle_slow_one():
    broker, slow, fast = timed_pool(slow_s=2.0, fast_s=0.02)
    slow_info, fast_info = broker.core.registry.workers[slow], broker.core.registry.workers[fast]
    assert slow_info.speed and fast_info.speed
    evals_before = len(broker.to(slow, "EVAL"))
    broker.submit("r1", method="sequential", steps=6)
    serve_timed(broker, {slow: 2.0, fast: 0.02})  # every step goes to the fast one
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert len(broker.to(slow, "EVAL")) == evals_before
    assert slow_info.job is None and slow_info.state(broker.clock.now) == "ready"


def test_the_slow_worker_takes_work_the_fast_ones_cannot_reach_in_time():
    broker, slow, fast = timed_pool(slow_s=0.03, fast_s=0.02)  # nearly as fast: it helps
    before = len(broker.to(slow, "EVAL"))
    broker.submit("r1", cores=2, steps=6, init_sequence=[0, 3])
    serve_timed(broker, {slow: 0.03, fast: 0.02})
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert len(broker.to(slow, "EVAL")) > before


def holding_pool(steps: int = 6) -> tuple[Broker, bytes, bytes]:
    """Two equal workers with known speeds (20 ms), a sequential request, and the worker that
    holds its first EVAL (returned first) while the other is idle."""
    broker, slow, fast = timed_pool(slow_s=0.02, fast_s=0.02)
    broker.submit("r1", method="sequential", steps=steps)
    holder = None
    for _ in range(10):  # until one of them holds an EVAL of r1
        holder = next(
            (w for w in (slow, fast) if (j := broker.core.registry.workers[w].job) and j.tasks),
            None,
        )
        if holder is not None:
            break
        busy = [w for w in (slow, fast) if broker.core.registry.workers[w].job]
        broker.prepared(busy[0])
    assert holder is not None
    return broker, holder, fast if holder == slow else slow


def make_late(broker: Broker, holder: bytes) -> Any:
    """The holder heartbeats on, but its EVAL runs past 3 expected forward times: late."""
    info = broker.core.registry.workers[holder]
    broker.from_worker(holder, raw("HEARTBEAT"))
    broker.tick(3 * info.job.expected_s)
    assert info.job.late
    return info


def test_a_worker_that_hangs_while_heartbeating_is_late_within_three_forward_times():
    broker, holder, other = holding_pool()
    info = broker.core.registry.workers[holder]
    expected = info.job.expected_s
    assert expected == pytest.approx(0.02)
    # the I/O shell wakes at this deadline: 2.5 expected forward times after the send
    assert broker.core.next_deadline() == pytest.approx(info.job.sent_at + 2.5 * expected)
    broker.tick(2.4 * expected)  # heartbeats go on; not late yet
    assert not info.job.late
    broker.from_worker(holder, raw("HEARTBEAT"))
    broker.tick(0.2 * expected)  # 2.6 expected forward times: late, within 3
    assert info.job.late and info.state(broker.clock.now) == "quarantined"
    # what else runs is the other's PREPARE for r1: at its floor (it learnt PREPAREs take 0)
    prepare = broker.core.registry.workers[other].job
    assert prepare.kind == "PREPARE"
    floor = broker.core.config.job_deadline_floor_s
    assert broker.core.next_deadline() == pytest.approx(prepare.sent_at + floor)
    broker.from_client(raw("STATUS"))
    states = sorted(w["state"] for w in broker.last(CLIENT, "STATUS").body()["workers"])
    assert states == ["busy", "quarantined"]  # the other is being prepared for r1
    broker.serve([other])  # it runs the copy, and the rest
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))
    copied = [m for m in broker.to(other, "EVAL") if m.request == broker.ids["r1"]]
    assert copied[0].attempt == 1
    # the late answer comes after the copy's: dropped, and the worker is back in service
    broker.result(holder)
    assert info.job is None and not info.quarantined(broker.clock.now) and info.missed == 1


def test_a_late_answer_that_comes_before_its_copy_wins_and_the_copy_is_dropped():
    broker, holder, other = holding_pool()
    info = make_late(broker, holder)
    assert info.job.late
    other_info = broker.core.registry.workers[other]
    assert other_info.job is not None and other_info.job.kind == "PREPARE"
    session = broker.core.sessions[broker.ids["r1"]]
    assert session.queued == 1  # the copy waits for the other worker to be prepared
    broker.result(holder)  # the late attempt answers first: it wins
    assert session.queued == 1 and session.evaluations == 1  # the next step, not the copy
    queued_steps = [task.step for task in session.queued_tasks()]
    assert queued_steps == [1]
    broker.serve([holder, other])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))
    assert session.evaluations == 6  # every step once: the copy never counted


def test_a_copys_answer_wins_and_the_late_one_is_then_stale():
    broker, holder, other = holding_pool()
    make_late(broker, holder)
    broker.prepared(other)
    copy = broker.last(other, "EVAL")
    assert copy.attempt == 1
    session = broker.core.sessions[broker.ids["r1"]]
    broker.result(other)  # the copy first
    assert session.evaluations == 1 and not session.tasks.late
    broker.result(holder)  # the late attempt: stale, dropped
    assert session.evaluations == 1
    broker.serve([holder, other])
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))
    assert session.evaluations == 6


def test_a_late_attempt_that_fails_leaves_its_running_copy_alone():
    broker, holder, other = holding_pool()
    make_late(broker, holder)
    broker.prepared(other)
    copy = broker.last(other, "EVAL")
    session = broker.core.sessions[broker.ids["r1"]]
    broker.failed(holder, "oom")  # the late attempt fails
    assert not session.tasks.late and session.queued == 0
    assert broker.core.registry.workers[other].job.tasks[0][1] == copy.attempt  # still valid
    broker.serve([holder, other])
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))


def test_a_lost_late_worker_stops_counting_and_its_copy_finishes_the_task():
    broker, holder, other = holding_pool()
    make_late(broker, holder)
    session = broker.core.sessions[broker.ids["r1"]]
    assert session.tasks.late
    broker.core.worker_unreachable(holder)
    assert not session.tasks.late
    broker.serve([other])
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))


def test_a_slow_worker_takes_the_least_urgent_ready_task():
    broker = Broker(deadline_floor_s=0.0)
    speeds = {broker.worker(f"fast{i}"): 0.03 for i in range(4)}
    slow = broker.worker("slow")
    speeds[slow] = 0.09
    broker.submit("warm", cores=5, steps=10)
    serve_timed(broker, speeds)
    broker.submit("r1", cores=8, steps=30)
    checked = 0
    seen = None
    for _ in range(400):
        if broker.client_kinds("r1")[-1:] == ["DONE"]:
            break
        job = broker.core.registry.workers[slow].job
        session = broker.core.sessions.get(broker.ids["r1"])
        if job is not None and job is not seen and job.tasks and session is not None:
            seen = job
            ((task, _),) = job.tasks
            queued = [session.urgency(queued) for queued in session.queued_tasks()]
            # every task it left in the queue is more urgent (a longer chain to the returned
            # hit, an earlier round, or a faster core)
            assert all(q < session.urgency(task) for q in queued)
            checked += len(queued) > 0
        serve_timed_once(broker, speeds)
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert checked > 0, "the slow worker never chose among several ready tasks"


def test_a_worker_that_keeps_missing_deadlines_is_quarantined_for_long():
    broker, slow, fast = timed_pool(slow_s=0.02, fast_s=0.02)
    info = broker.core.registry.workers[slow]
    info.missed = broker.core.config.max_missed_deadlines - 1
    broker.submit("r1", method="sequential", steps=40)
    for _ in range(200):
        if info.job is not None and info.job.tasks:
            break
        for w in (slow, fast):
            job = broker.core.registry.workers[w].job
            if job is not None and job.kind == "PREPARE":
                broker.prepared(w)
            elif job is not None:
                broker.clock.now += 0.02
                broker.result(w)
    assert info.job is not None and info.job.tasks
    broker.from_worker(slow, raw("HEARTBEAT"))
    broker.tick(0.2)  # past its deadline, within its liveness
    assert info.quarantined_until > broker.clock.now + 100
    broker.result(slow)  # even after it answers
    assert info.quarantined(broker.clock.now)


def test_a_hello_repeated_on_the_same_socket_keeps_the_workers_state():
    """HELLOs queued while a link was down arrive in a burst: the same socket session is
    welcomed again, without dropping its prepared requests or its job."""
    broker, owner, other = one_busy_of_two()
    body = hello_body("a", session="s1")
    broker.core.registry.workers[owner].session = "s1"
    job = broker.core.registry.workers[owner].job
    for _ in range(5):
        sends = broker.from_worker(owner, raw("HELLO", dict(body)))
        assert [s.message.kind for s in sends] == ["WELCOME"]
    assert broker.core.registry.workers[owner].job is job
    body["session"] = "s2"  # a new socket: whatever it held is gone
    broker.from_worker(owner, raw("HELLO", body))
    assert (
        broker.core.registry.workers[owner].job is None
        or broker.core.registry.workers[owner].job is not job
    )
    assert broker.last(other, "EVAL").attempt == 1 or broker.to(owner, "EVAL")[-1].attempt == 1


# -- the cores policy --------------------------------------------------------------------------


def accepted(broker: Broker, request: str) -> dict[str, Any]:
    return next(m for m in broker.to(CLIENT, "ACCEPTED") if m.request == request).body()


def test_adaptive_grants_a_lone_request_its_full_k_and_shares_the_pool_under_load():
    broker = Broker(cores_policy="adaptive")
    workers = [broker.worker(f"w{i}") for i in range(8)]
    broker.submit("lone", cores=8, steps=30)
    assert accepted(broker, "lone")["cores"] == 8
    assert accepted(broker, "lone")["requested_cores"] == 8
    for i in range(5):
        broker.submit(f"r{i}", cores=8, steps=30)
    # 8 workers: the 2nd request shares them with 1 other (4), the 3rd with 2 (2) ... at least 1
    granted = [accepted(broker, f"r{i}")["cores"] for i in range(5)]
    assert granted == [4, 2, 2, 1, 1]
    assert [len(accepted(broker, f"r{i}")["init_sequence"]) for i in range(5)] == granted
    broker.serve(workers)
    # core 1 of every request is still the sequential solve, whatever K it got
    for request in ["lone"] + [f"r{i}" for i in range(5)]:
        assert broker.client_kinds(request)[-1] == "DONE"
        core1 = next(h for h in hits(broker, request) if h.body()["core"] == 1)
        assert torch.equal(core1.tensors["latent"], sequential_hit(30))
    broker.submit("after", cores=8, steps=30)  # the pool is idle again: the full K
    assert accepted(broker, "after")["cores"] == 8


def test_adaptive_keeps_the_k_of_a_request_that_insists_and_fixed_grants_what_is_asked():
    broker = Broker(cores_policy="adaptive")
    for i in range(4):
        broker.worker(f"w{i}")
    broker.submit("first", cores=4, steps=20)
    broker.submit("exact", cores=4, steps=20, exact_cores=True)
    broker.submit("init", steps=20, init_sequence=[0, 4, 8, 12])
    broker.submit("index", cores=4, steps=20, stop="core-index:3")  # needs 3 cores
    broker.submit("paradigms", method="paradigms", cores=4, steps=20)
    assert accepted(broker, "exact")["cores"] == 4
    assert accepted(broker, "init")["cores"] == 4
    assert accepted(broker, "index")["cores"] == 3
    assert accepted(broker, "paradigms")["cores"] == 4  # a baseline runs as asked
    fixed = Broker(cores_policy="fixed")
    for i in range(4):
        fixed.worker(f"w{i}")
    for i in range(3):
        fixed.submit(f"r{i}", cores=4, steps=20)
    assert [accepted(fixed, f"r{i}")["cores"] for i in range(3)] == [4, 4, 4]


def test_adaptive_with_no_worker_yet_keeps_the_asked_k():
    broker = Broker(cores_policy="adaptive")
    broker.submit("r1", cores=6, steps=20)
    assert accepted(broker, "r1")["cores"] == 6


# -- fail fast: a model nobody serves ----------------------------------------------------------


def test_a_model_no_worker_serves_fails_at_once_naming_the_served_models():
    broker = Broker(worker_timeout_s=30.0, heartbeat_s=0.25, liveness=3)
    broker.tick(3.0)  # past the re-registration window after the broker's start (4 x 3 x 0.25)
    broker.worker("a", model="digits")
    broker.worker("b", model="flux")
    broker.submit("r1", model="nope", steps=4)
    error = broker.last(CLIENT, "ERROR")
    assert error.request == "r1" and error.body()["code"] == "no_worker"
    assert "'digits', 'flux'" in error.body()["message"] and "'nope'" in error.body()["message"]
    assert broker.sessions == {}


def test_right_after_a_start_a_request_waits_for_workers_to_register_again():
    broker = Broker(worker_timeout_s=30.0, heartbeat_s=0.25, liveness=3)
    broker.tick(2.9)
    broker.submit("r1", model="m", steps=4)  # workers register again within 3 s of a start
    assert broker.client_kinds("r1") == ["ACCEPTED"]
    a = broker.worker("a")
    broker.serve([a])
    assert broker.client_kinds("r1")[-1] == "DONE"


def test_a_request_that_asks_to_wait_for_a_worker_waits_that_long():
    broker = Broker(worker_timeout_s=3.0)
    broker.tick(10.0)
    broker.submit("patient", model="m", steps=4)
    assert broker.error("patient") == "no_worker"
    message = raw(
        "SUBMIT",
        {"request": RequestSpec(model="m", steps=4).to_dict(), "wait_for_worker_s": 20.0},
        request="r2",
    )
    broker.from_client(message)
    assert broker.client_kinds("r2") == ["ACCEPTED"]
    broker.tick(15.0)  # longer than worker_timeout_s, within its own 20 s
    assert broker.client_kinds("r2") == ["ACCEPTED", "PROGRESS"]  # told that it waits
    waiting = broker.last(CLIENT, "PROGRESS").body()["waiting"]
    assert waiting["fails_in_s"] == 20.0  # its own patience, not worker_timeout_s
    broker.tick(4.0)
    assert broker.client_kinds("r2") == ["ACCEPTED", "PROGRESS"]
    a = broker.worker("a")
    broker.serve([a])
    assert broker.client_kinds("r2")[-1] == "DONE"
    broker.from_client(raw("SUBMIT", {**message.body, "wait_for_worker_s": 5.0}, request="r3"))
    broker.core.worker_unreachable(a)
    broker.tick(1.0)
    broker.tick(4.5)  # within its 5 s
    assert broker.client_kinds("r3") == ["ACCEPTED", "PROGRESS"]
    broker.tick(1.0)
    assert broker.error("r3") == "no_worker"
    bad = {**message.body, "wait_for_worker_s": -1}
    broker.from_client(raw("SUBMIT", bad, request="r4"))
    assert broker.error("r4") == "invalid_request"


@pytest.mark.parametrize("index", [1, 3])
def test_under_a_core_index_stop_only_the_tasks_the_hits_need_run(index):
    """K=8, N=50 stopped at the m-th core: the broker abandons every task none of the
    request's hits depends on (the plan's rank -1) instead of giving it a worker, runs exactly
    the plan's goal graph, and releases the same hits, bit for bit, as the in-process run of
    every task."""
    from chords_mq.algorithms import ChordsPlan, init_sequence
    from chords_mq.algorithms.stopping import CoreIndex
    from chords_mq.local import simulate

    broker = Broker()
    workers = [broker.worker(f"w{i}") for i in range(8)]
    broker.submit("r1", cores=8, steps=50, stop=f"core-index:{index}")
    broker.serve(workers)
    assert broker.client_kinds("r1")[-1] == "DONE"
    stats = broker.to(CLIENT, "DONE")[-1].body()["stats"]
    x0 = torch.linspace(-1, 1, 4)
    sequence = init_sequence(8, 50)
    graph = ChordsPlan(x0, 50, sequence).goal_graph(CoreIndex(index))
    assert graph is not None
    reference = simulate(ChordsPlan(x0, 50, sequence, stop=CoreIndex(index)), velocity)
    assert stats["evaluations"] == len(graph) < reference.evaluations
    assert stats["abandoned"] > 0
    released = [(h.body()["core"], h.tensors["latent"]) for h in hits(broker, "r1")]
    assert [core for core, _ in released] == [hit.core for hit in reference.hits]
    for (_, latent), hit in zip(released, reference.hits, strict=True):
        assert torch.equal(latent, hit.latent)


def mixed_pool(fast: int, slow: int, fast_s: float = 0.03, slow_s: float = 0.09):
    """``fast`` and ``slow`` workers whose speeds the broker has learnt (a warm-up request)."""
    broker = Broker(deadline_floor_s=0.0)
    speeds = {broker.worker(f"fast{i}"): fast_s for i in range(fast)}
    speeds.update({broker.worker(f"slow{i}"): slow_s for i in range(slow)})
    broker.submit("warm", cores=fast + slow, steps=4 * (fast + slow))
    serve_timed(broker, speeds)
    assert broker.client_kinds("warm")[-1] == "DONE"
    return broker, speeds


def two_fast_one_slow() -> tuple[Broker, dict[bytes, float], bytes]:
    """Two 30 ms workers and one of 150 ms, whose speeds the broker has learnt (a warm-up
    request); returns the broker, each worker's EVAL time and the slow one."""
    broker, speeds = mixed_pool(2, 1, slow_s=0.15)
    return broker, speeds, list(speeds)[-1]


def test_a_slow_worker_leaves_a_requests_places_to_fast_ones_finishing_stale_work():
    """A request of K cores has at most K workers. Fast workers still finishing the tasks of a
    request that just ended (a residual stop at its fastest core, with the other cores' tasks
    in flight) are about to be free: the next request's places go to them, not to the idle
    slow worker."""
    broker, speeds, slow = two_fast_one_slow()
    broker.submit("a", cores=3, steps=20, stop="residual:1e9")
    for _ in range(400):
        if broker.client_kinds("a")[-1:] == ["DONE"]:
            break
        serve_timed_once(broker, speeds)
    workers = broker.core.registry.workers
    stale = [w for w in speeds if w != slow and workers[w].job is not None]
    assert stale, "no fast worker is finishing stale work: the case is not exercised"
    assert workers[slow].job is None
    prepares_before = len(broker.to(slow, "PREPARE"))
    broker.submit("b", cores=2, steps=20)
    assert len(broker.to(slow, "PREPARE")) == prepares_before  # it leaves the places
    serve_timed(broker, speeds)
    assert broker.client_kinds("b")[-1] == "DONE"
    prepared_b = [
        w for w in speeds if any(m.request == broker.ids["b"] for m in broker.to(w, "PREPARE"))
    ]
    assert slow not in prepared_b and len(prepared_b) == 2


def test_a_slow_worker_still_serves_when_the_fast_ones_are_busy_with_running_requests():
    broker, speeds, slow = two_fast_one_slow()
    broker.submit("s1", method="sequential", steps=30)
    broker.submit("s2", method="sequential", steps=30)
    workers = broker.core.registry.workers
    assert all(workers[w].job is not None for w in speeds if w != slow)
    broker.submit("r", cores=2, steps=20)
    assert any(m.request == broker.ids["r"] for m in broker.to(slow, "PREPARE"))
    serve_timed(broker, speeds)
    assert all(broker.client_kinds(r)[-1] == "DONE" for r in ("s1", "s2", "r"))


def test_adaptive_gives_a_lone_request_its_k_even_past_the_pool_size():
    broker = Broker(cores_policy="adaptive")
    broker.worker("a"), broker.worker("b")
    broker.submit("r1", cores=4, steps=20)
    assert accepted(broker, "r1")["cores"] == 4
    broker.submit("r2", cores=4, steps=20)  # shares 2 workers with r1: 1
    assert accepted(broker, "r2")["cores"] == 1


# -- metrics -----------------------------------------------------------------------------------


def scrape(broker: Broker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    from chords_mq.broker.metrics import render

    samples = {}
    for family in text_string_to_metric_families(render(broker.core).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_evaluations_failures_and_hits():
    broker = Broker()
    a, b = broker.worker("a"), broker.worker("b")
    before = scrape(broker)
    assert before[("chords_requests_in_flight", ())] == 0
    assert before[("chords_workers", (("state", "ready"),))] == 2
    broker.submit("r1", cores=2, steps=6)
    broker.submit("r2", method="sequential", steps=4)
    during = scrape(broker)
    assert during[("chords_requests_in_flight", ())] == 2
    assert during[("chords_workers", (("state", "busy"),))] == 2
    broker.serve([a, b])
    broker.submit("r3", cores=2, steps=6)
    broker.from_client(raw("CANCEL", request="r3"))
    samples = scrape(broker)
    done = samples[("chords_requests_total", (("method", "chords"), ("outcome", "done")))]
    assert done == 1
    assert samples[("chords_requests_total", (("method", "sequential"), ("outcome", "done")))] == 1
    cancelled = (("method", "chords"), ("outcome", "cancelled"))
    assert samples[("chords_requests_total", cancelled)] == 1
    stats = [m.body()["stats"] for m in broker.to(CLIENT, "DONE") if m.request in ("r1", "r2")]
    assert samples[("chords_evaluations_total", ())] == sum(s["evaluations"] for s in stats)
    assert samples[("chords_task_seconds_count", ())] == sum(s["forwards"] for s in stats)
    rank1 = samples[("chords_hit_seconds_count", (("rank", "1"),))]
    assert rank1 == 2  # r1's fastest core and r2's only core
    assert samples[("chords_hit_seconds_count", (("rank", "2"),))] == 1
    assert samples[("chords_requests_in_flight", ())] == 0


def test_metrics_count_worker_failures_by_reason_and_retries():
    broker, _, _ = nan_pool(1)
    samples = scrape(broker)
    assert samples[("chords_worker_failures_total", (("reason", "non_finite"),))] >= 1
    assert samples[("chords_retries_total", ())] >= 1


def uniform_hits(cores: int, steps: int, stop: str) -> list[torch.Tensor]:
    """The hits of the same request on a uniform pool (every worker alike, untimed)."""
    broker = Broker()
    workers = [broker.worker(f"u{i}") for i in range(cores)]
    broker.submit("u", cores=cores, steps=steps, stop=stop)
    broker.serve(workers)
    return [h.tensors["latent"] for h in hits(broker, "u")]


def follow(broker: Broker, speeds: dict[bytes, float], request: str, check=None) -> float:
    """Serve ``request`` to DONE in fake time, calling ``check(session, worker, task)`` for
    every task a worker is given; returns the time it took from now."""
    start = broker.clock.now
    seen: dict[bytes, Any] = {}
    for _ in range(4000):
        if broker.client_kinds(request)[-1:] == ["DONE"]:
            return broker.clock.now - start
        session = broker.core.sessions.get(broker.ids[request])
        for identity, info in broker.core.registry.workers.items():
            job = info.job
            if job is None or job is seen.get(identity) or job.kind != "EVAL":
                continue
            seen[identity] = job
            if check is not None and session is not None:
                for task, _ in job.tasks:
                    check(session, identity, task)
        if not serve_timed_once(broker, speeds):
            break
    raise AssertionError(f"{request} did not finish: {broker.client_kinds(request)[-3:]}")


def test_on_four_fast_and_four_slow_the_broker_follows_its_schedule_to_the_optimum():
    """K=8, N=50, fastest core, 30 and 90 ms workers: the broker schedules the goal graph
    ahead and dispatches by it. No worker takes a task the schedule planned on a markedly
    faster class; a fast worker takes one planned on a slower class only while no worker of
    that class is free for it; tasks go out in the order the schedule starts them; the slow
    workers take part; and the request takes the 20 fast
    rounds of the optimum (OR-Tools CP-SAT on this graph: benchmarks/placement_optimum.py),
    one fewer than placing each ready task by earliest finish time did. Same bits as on a
    uniform pool."""
    broker, speeds = mixed_pool(4, 4)
    registry = broker.core.registry
    checked = {"slow": 0}

    def check(session, identity, task) -> None:
        schedule = session.schedule
        assert schedule is not None, "a mixed pool under a core-index stop is scheduled ahead"
        node = (task.core, task.step)
        mine = registry.expected(registry.workers[identity], (session.latent_bytes, 1))
        assert schedule.allows(mine, node), f"{identity} took {node}, planned for a faster one"
        budget = schedule.budget(node)
        if budget is not None and budget >= mine * 1.5:  # a slower class's task
            free_slow = [
                w
                for w in session.prepared
                if speeds[w] > mine * 1.5 and registry.workers[w].job is None
            ]
            assert not free_slow, f"{identity} took {node} from idle {free_slow}"
        checked["slow"] += speeds[identity] > 0.05
        # the queue is in the schedule's order: what is left that this worker's class could
        # have taken starts no earlier in the schedule
        start = schedule.slots[node].start
        for other in session.queued_tasks():
            slot = schedule.slots[(other.core, other.step)]
            if slot.budget < mine * 1.5 and schedule.allows(mine, (other.core, other.step)):
                assert start <= slot.start + 1e-12, (node, other)

    broker.submit("r", cores=8, steps=50, stop="core-index:1")
    took = follow(broker, speeds, "r", check)
    assert checked["slow"] > 0, "the slow workers took no task"
    assert took == pytest.approx(20 * 0.03)
    released = [h.tensors["latent"] for h in hits(broker, "r")]
    reference = uniform_hits(8, 50, "core-index:1")
    assert len(released) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(released, reference, strict=True))


def test_a_pool_that_changes_is_scheduled_again_and_the_request_keeps_its_bits():
    """Mid-run, one fast worker slows to the slow ones' pace (its speed estimate leaves the
    planned one by more than the drift): the schedule is planned again from the tasks still to
    run. Losing every fast worker leaves one speed class: no schedule, the slow workers
    finish. The hits are those of a uniform pool."""
    broker, speeds = mixed_pool(2, 2)
    fast0, fast1, _, _ = list(speeds)
    planner = broker.core.dispatcher.speeds.planner
    broker.submit("r", cores=4, steps=30, stop="core-index:1")
    schedules = []
    for _ in range(12):
        serve_timed_once(broker, speeds)
    session = broker.core.sessions[broker.ids["r"]]
    schedules.append(session.schedule)
    assert schedules[0] is not None
    planned = planner.planned
    speeds[fast0] = 0.09  # it slows down: its EMA climbs past REPLAN_DRIFT
    for _ in range(12):
        serve_timed_once(broker, speeds)
    assert planner.planned > planned, "the drifting worker was not planned for again"
    assert session.schedule is not schedules[0]
    for identity in (fast0, fast1):  # every fast worker goes: one class is left
        broker._keep(broker.core.worker_unreachable(identity))
        del speeds[identity]
    follow(broker, speeds, "r")
    assert session.schedule is None
    released = [h.tensors["latent"] for h in hits(broker, "r")]
    reference = uniform_hits(4, 30, "core-index:1")
    assert all(torch.equal(a, b) for a, b in zip(released, reference, strict=True))


def test_only_a_core_index_stop_is_scheduled_ahead():
    """A residual stop may return any core: no goal graph, nothing scheduled ahead."""
    broker, speeds = mixed_pool(2, 2)
    broker.submit("r", cores=4, steps=20, stop="residual:1e9")

    def check(session, identity, task) -> None:
        assert session.schedule is None

    follow(broker, speeds, "r", check)
    assert broker.core.dispatcher.speeds.planner.planned == 0


def test_a_goal_graph_too_large_to_plan_is_not_scheduled_ahead():
    """K=8, N=1000 up to the 8th core: 5480 tasks, above what the broker plans on its loop
    (``MAX_NODES``); such a request is placed task by task."""
    from chords_mq.broker.placement import MAX_NODES
    from chords_mq.broker.session import RequestSession

    spec = RequestSpec(model="m", steps=1000, cores=8, stop="core-index:8")
    session = RequestSession("r", CLIENT, spec, FakeClock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
        session.start(torch.zeros(4), unit_euler)
    assert session.plan is not None
    assert len(session.plan.goal()) > MAX_NODES
    assert session.goal_graph() is None
    spec = RequestSpec(model="m", steps=50, cores=8, stop="core-index:1")
    small = RequestSession("s", CLIENT, spec, FakeClock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small.start(torch.zeros(4), unit_euler)
    assert small.goal_graph() is not None


# -- first steps: the wrong port, a request waiting for a worker, a lone late worker ---------


def test_a_client_at_the_worker_port_gets_wrong_port_naming_the_client_port():
    broker = Broker(client_endpoint="tcp://127.0.0.1:7001", worker_endpoint="tcp://127.0.0.1:7002")
    client = b"lost-client"
    spec = RequestSpec(model="m", steps=4, method="sequential")
    submit = raw("SUBMIT", {"request": spec.to_dict()}, request="r1")
    for message in (submit, raw("STATUS"), raw("HEARTBEAT", {"in_flight": []})):
        sends = broker.from_worker(client, message)
        assert [(s.to, s.message.kind) for s in sends] == [("worker", "ERROR")]
        body = sends[0].message.body()
        assert body["code"] == "wrong_port" and "tcp://127.0.0.1:7001" in body["message"]
        assert sends[0].message.request == message.request
    assert not broker.core.sessions and broker.core.registry.get(client) is None


def test_a_worker_at_the_client_port_gets_wrong_port_naming_the_worker_port():
    broker = Broker(client_endpoint="tcp://0.0.0.0:7001", worker_endpoint="tcp://0.0.0.0:7002")
    sends = broker.from_client(raw("HELLO", hello_body("w")), client=b"lost-worker")
    assert [(s.to, s.message.kind) for s in sends] == [("client", "ERROR")]
    body = sends[0].message.body()
    assert body["code"] == "wrong_port" and "port 7002 of the broker's host" in body["message"]
    assert not broker.core.registry.workers


def test_a_worker_heartbeat_at_the_worker_port_is_still_told_to_say_hello():
    broker = Broker()
    sends = broker.from_worker(b"worker/x", raw("HEARTBEAT"))
    assert [s.message.kind for s in sends] == ["DISCONNECT"]


def test_a_request_that_loses_its_last_worker_is_told_it_waits_then_fails_no_worker():
    broker = Broker(worker_timeout_s=5.0)
    a = broker.worker("a")
    broker.submit("r1", method="sequential", steps=6)
    broker.prepared(a)
    broker.result(a)
    broker.core.worker_unreachable(a)  # the last worker of the model dies mid-request
    broker.tick(0.05)
    notices = [m for m in broker.to(CLIENT, "PROGRESS") if "waiting" in m.body()]
    assert len(notices) == 1
    waiting = notices[0].body()["waiting"]
    assert waiting == {"for": "worker", "model": "m", "since_s": 0.0, "fails_in_s": 5.0}
    broker.tick(2.0)
    broker.tick(2.0)
    assert len([m for m in broker.to(CLIENT, "PROGRESS") if "waiting" in m.body()]) == 1
    assert "r1" in broker.sessions
    broker.tick(1.5)
    assert broker.error("r1") == "no_worker"


def test_a_worker_that_comes_back_ends_the_wait_and_the_client_hears_it():
    broker = Broker(worker_timeout_s=5.0)
    broker.submit("r1", method="sequential", steps=4)  # just after the start: it waits
    broker.tick(0.1)
    assert "waiting" in broker.last(CLIENT, "PROGRESS").body()
    a = broker.worker("a")
    broker.tick(0.1)
    assert "waiting" not in broker.last(CLIENT, "PROGRESS").body()
    broker.serve([a])
    assert broker.client_kinds("r1")[-1] == "DONE"


def lone_timed_worker(seconds: float) -> tuple[Broker, bytes]:
    broker = Broker(deadline_floor_s=0.0)
    a = broker.worker("a")
    broker.submit("warm", method="sequential", steps=4)
    serve_timed(broker, {a: seconds})
    assert broker.client_kinds("warm")[-1] == "DONE"
    return broker, a


def test_a_lone_late_worker_is_not_copied_onto_itself_nor_held_to_it():
    broker, a = lone_timed_worker(0.02)
    broker.submit("r1", method="sequential", steps=6)
    broker.prepared(a)
    info = broker.core.registry.workers[a]
    assert info.job is not None and info.job.tasks
    released = len(broker.to(a, "RELEASE"))
    make_late(broker, a)
    session = broker.core.sessions[broker.ids["r1"]]
    assert session.queued == 0 and session.retries == 0 and not session.tasks.late  # no copy
    assert len(broker.to(a, "RELEASE")) == released  # it keeps the request's context
    assert info.missed == 0
    broker.result(a)  # the late answer is the only one: it counts
    assert session.evaluations == 1
    broker.serve([a])
    assert broker.client_kinds("r1")[-1] == "DONE"
    assert torch.equal(hits(broker, "r1")[-1].tensors["latent"], sequential_hit(6))
    assert broker.to(a, "PREPARE")[-1].request == broker.ids["r1"]
    assert len([m for m in broker.to(a, "PREPARE") if m.request == broker.ids["r1"]]) == 1


# -- declared request states ---------------------------------------------------------------


def test_a_request_moves_through_its_declared_states_as_the_core_reports_them():
    broker = Broker()
    a = broker.worker("a")
    broker.submit("r1", method="sequential", steps=3)
    assert broker.core.requests_view()["r1"].state == "preparing"
    broker.prepared(a)
    assert broker.core.requests_view()["r1"].state == "running"
    broker.serve([a])
    assert "r1" not in broker.core.requests_view() and broker.client_kinds("r1")[-1] == "DONE"


def test_a_request_that_wants_pictures_waits_for_its_media_in_decoding():
    broker, a, b = decode_setup()
    seen = set()
    for _ in range(200):
        view = broker.core.requests_view().get("r1")
        if view is None:
            break
        seen.add(view.state)
        busy = [w for w in (a, b) if broker.core.registry.workers[w].job is not None]
        if not busy:
            break
        broker.serve(busy[:1], limit=1, finish=False)
    assert {"running", "decoding"} <= seen
    assert broker.client_kinds("r1")[-1] == "DONE"
