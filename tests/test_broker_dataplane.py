"""BrokerCore on the data plane (``--data-plane``), driven with messages and a fake clock: honest
workers that keep their results by name (``broker.testing.HonestPool``), no sockets.

What it decides: an EVAL names its inputs at their holders and carries no tensor, the broker
records who holds what and sends DROP when nothing needs a result any more, hits are computed by
a worker holding their inputs (DECODE by name), a lost worker's results that are still needed
are recomputed from their lineage (bitwise), and a recovery past its bound fails typed. Every
hit equals the same request's with the data plane off, bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.broker.session import RequestSession
from chords_mq.broker.testing import X0, FakeClock, HonestPool, hello
from chords_mq.request import RequestSpec
from chords_mq.solvers import unit_euler
from chords_mq.wire import (
    DecodeMessage,
    DoneMessage,
    DropMessage,
    ErrorMessage,
    EvalMessage,
    HitMessage,
    Kind,
    Message,
    PreparedMessage,
    PrepareMessage,
    ResultEntry,
    ResultMessage,
    SubmitMessage,
)
from chords_mq.wire.named import X0_REF, HeldResult

MODEL = "m"
CLIENT = b"client-1"
EPOCH = 7


@dataclass
class Run:
    """What one request did: the client's messages, every message the broker sent a worker."""

    client: list[Message] = field(default_factory=list)
    to_workers: list[Send] = field(default_factory=list)
    pool: HonestPool = field(default_factory=HonestPool)
    core: BrokerCore | None = None
    gone: set[str] = field(default_factory=set)  # endpoints lost (until prepared again)
    # (endpoint, request): released from a request (until prepared for it again)
    released: set[tuple[str, str | None]] = field(default_factory=set)
    route: Callable[[list[Send]], None] = print

    @property
    def hits(self) -> list[HitMessage]:
        return [m for m in self.client if isinstance(m, HitMessage)]

    @property
    def final(self) -> Message:
        return next(m for m in self.client if isinstance(m, DoneMessage | ErrorMessage))

    def sent(self, kind: Kind) -> list[Message]:
        return [s.message for s in self.to_workers if s.message.kind is kind]


def drive(
    spec: RequestSpec,
    workers: int = 4,
    data_plane: bool = True,
    events: dict[int, Callable[[Run, BrokerCore], list[Send]]] | None = None,
    answer: Callable[[Run, bytes, Message], Message | list[Message] | None] | None = None,
    limit: int = 5000,
    speeds: dict[str, tuple[int, float]] | None = None,
    pool: HonestPool | None = None,
    capabilities: list[str] | None = None,
    hit_parts: bool | None = None,
    **config: object,
) -> Run:
    """Serve ``spec`` on ``workers`` honest workers (each evaluation 1 s of fake time; ``speeds``:
    a worker's after its first n) to its DONE or ERROR; ``events[n]`` runs before the n-th
    answer (a kill, say). Every EVAL and DECODE by name is checked to name only live holders.
    ``pool``: the workers (another x0, say); ``capabilities``: what their HELLOs list;
    ``hit_parts``: the client's SUBMIT says it takes a hit's latent in PARTs. ``answer`` may
    answer a job with several messages (PARTs, then the DECODED)."""
    clock = FakeClock()
    # (verification off: these tests count fetches and replays; tests/test_broker_verify.py
    # drives the same requests with it on)
    settings = {
        "liveness": 10**6,
        "heartbeat_s": 10**6,
        "data_plane": data_plane,
        "verify": "off",
        **config,
    }
    core = BrokerCore(BrokerConfig(**settings), clock, epoch=EPOCH)  # type: ignore[arg-type]
    run = Run(core=core) if pool is None else Run(core=core, pool=pool)
    jobs: list[tuple[float, int, bytes, Message]] = []
    seq = 0
    evals: dict[bytes, int] = {}

    def route(sends: list[Send]) -> None:
        nonlocal seq
        for send in sends:
            if send.to == "client":
                run.client.append(send.message)
                continue
            run.to_workers.append(send)
            endpoint = HonestPool.endpoint(send.identity.decode())
            kind = send.message.kind
            _holders_named(send.message, run.gone, run.released)
            if kind is Kind.RELEASE:
                run.released.add((endpoint, send.message.request))
            elif kind is Kind.PREPARE:
                run.gone.discard(endpoint)
                run.released.discard((endpoint, send.message.request))
            if kind in (Kind.PREPARE, Kind.DECODE, Kind.COMPARE):
                seq += 1
                jobs.append((clock.now, seq, send.identity, send.message))
            elif isinstance(send.message, EvalMessage):  # a chain: its steps in a row
                finish = clock.now
                for step in send.message.steps():
                    evals[send.identity] = evals.get(send.identity, 0) + 1
                    after, slow = (speeds or {}).get(send.identity.decode(), (0, 1.0))
                    finish += slow if evals[send.identity] > after else 1.0
                    seq += 1
                    jobs.append((finish, seq, send.identity, step))
            elif kind in (Kind.DROP, Kind.RELEASE) and endpoint in run.pool.stores:
                run.pool.answer(send.message, endpoint)

    run.route = route
    said = {} if capabilities is None else {"capabilities": capabilities}
    for i in range(workers):
        name = f"w{i}"
        route(
            core.worker_message(
                name.encode(),
                hello(name, MODEL, data=HonestPool.endpoint(name), **said),  # type: ignore[arg-type]
            )
        )
    submit = SubmitMessage(
        spec=dataclasses.replace(spec, model=MODEL).to_dict(), request="r1", hit_parts=hit_parts
    )
    route(core.client_message(CLIENT, submit))
    for count in range(limit):
        if any(isinstance(m, DoneMessage | ErrorMessage) for m in run.client):
            return run
        if events and count in events:
            route(events[count](run, core))
            continue
        if not jobs:
            clock.now += 1.0
            route(core.tick(clock.now))
            continue
        jobs.sort(key=lambda job: job[:2])
        finish, _, identity, job = jobs.pop(0)
        clock.now = max(clock.now, finish)
        endpoint = HonestPool.endpoint(identity.decode())
        if endpoint not in run.pool.stores and job.kind is not Kind.PREPARE:
            continue  # a lost worker answers nothing
        reply = answer(run, identity, job) if answer else run.pool.answer(job, endpoint)
        for each in reply if isinstance(reply, list) else [] if reply is None else [reply]:
            route(core.worker_message(identity, each))
        route(core.tick(clock.now))
    raise AssertionError("the request did not finish")


def _holders_named(message: Message, gone: set[str], released: set[tuple[str, str | None]]) -> None:
    """Every input an EVAL or a DECODE by name names is held somewhere (one being recomputed
    waits for its replay), and by no worker released from the request or lost."""
    values = []
    if isinstance(message, EvalMessage) and message.inputs is not None:
        values = list(message.inputs)
    elif isinstance(message, DecodeMessage) and message.value is not None:
        values = [message.value]
    # a chain's later steps read what the step before computes there: held nowhere yet
    before = {e.task for e in message.entries[:-1]} if isinstance(message, EvalMessage) else ()
    for value in values:
        for named in value.refs:
            if message.kind is Kind.EVAL and message.chain and named.ref.task in before:
                assert not named.holders  # (the worker reads it from its own store)
                continue
            assert named.holders, f"{message.kind.value} names {named.ref}, held nowhere"
            stale = {h.endpoint for h in named.holders} & gone
            own = {(h.endpoint, message.request) for h in named.holders}
            stale |= {endpoint for endpoint, _ in own & released}
            assert not stale, f"{message.kind.value} names {named.ref} at {stale}, gone"


def kill(*names: str) -> Callable[[Run, BrokerCore], list[Send]]:
    """Lose these workers and everything they hold."""

    def event(run: Run, core: BrokerCore) -> list[Send]:
        for name in names:  # one after the other: what the broker sends between them goes out
            run.pool.lose(HonestPool.endpoint(name))
            run.gone.add(HonestPool.endpoint(name))
            run.route(core.worker_unreachable(name.encode()))
        return []

    return event


CHORDS = RequestSpec(model=MODEL, steps=20, cores=4, seed=0)
LATENT = 16  # bytes of one latent (X0: 4 float32)


def latents(run: Run) -> list[tuple[int, int, torch.Tensor]]:
    return [(hit.core, hit.round, hit.latent) for hit in run.hits if hit.latent is not None]


def same_hits(a: Run, b: Run) -> None:
    got, want = latents(a), latents(b)
    assert [(c, r) for c, r, _ in got] == [(c, r) for c, r, _ in want]
    for (_, _, x), (_, _, y) in zip(got, want):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.fixture(scope="module")
def tensors_run() -> Run:
    return drive(CHORDS, data_plane=False)


@pytest.fixture(scope="module")
def named_run() -> Run:
    return drive(CHORDS)


def test_hits_on_the_data_plane_equal_the_tensor_path_bitwise(tensors_run, named_run):
    assert isinstance(named_run.final, DoneMessage)
    assert len(named_run.hits) == CHORDS.cores + 1
    same_hits(named_run, tensors_run)


def test_only_the_hits_cross_the_broker(tensors_run, named_run):
    hits = len(named_run.hits)
    on = named_run.final.stats["broker_latent_bytes"]
    off = tensors_run.final.stats["broker_latent_bytes"]
    assert on == hits * LATENT  # x0 stays on the workers: no PREPARED carries it
    assert off > 10 * on  # x0, every task's input out, every result in
    assert named_run.core is not None and named_run.core.metrics.latent_bytes == on


def test_no_prepare_asks_for_x0_on_the_data_plane_and_off_it_the_first_does(tensors_run, named_run):
    named = [m.initial for m in named_run.sent(Kind.PREPARE) if isinstance(m, PrepareMessage)]
    assert len(named) == 4 and not any(named)
    off = [m.initial for m in tensors_run.sent(Kind.PREPARE) if isinstance(m, PrepareMessage)]
    assert off[0] and not any(off[1:])


def test_a_stop_rule_that_reads_the_hits_asks_the_first_prepared_for_x0():
    run = drive(dataclasses.replace(CHORDS, stop="residual:1e-9"))
    assert isinstance(run.final, DoneMessage)
    asked = [m.initial for m in run.sent(Kind.PREPARE) if isinstance(m, PrepareMessage)]
    assert asked[0] and not any(asked[1:])  # one PREPARED carries x0, the first


def test_an_undeclared_prepared_without_x0_is_asked_again_for_it(named_run):
    def undeclared(run: Run, identity: bytes, job: Message) -> Message | None:
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if isinstance(reply, PreparedMessage):  # an older worker: it declares nothing
            reply = dataclasses.replace(reply, shape=None, dtype=None)
        return reply

    run = drive(CHORDS, answer=undeclared)
    assert isinstance(run.final, DoneMessage)
    asked = [m.initial for m in run.sent(Kind.PREPARE) if isinstance(m, PrepareMessage)]
    assert not asked[0] and asked.count(True) == 1
    same_hits(run, named_run)
    assert run.final.stats["broker_latent_bytes"] == (1 + len(run.hits)) * LATENT


def test_only_a_plan_fed_by_name_on_the_data_plane_starts_from_a_stand_in():
    stand_in = torch.empty(4, device="meta")
    named = RequestSession("n", CLIENT, CHORDS, FakeClock(), data_plane=True)
    assert not named.x0_wanted(has_data=True) and named.x0_wanted(has_data=False)
    assert named.start(stand_in, unit_euler) and named.plan is not None
    reads = dataclasses.replace(CHORDS, stop="residual:1e-9")
    session = RequestSession("r", CLIENT, reads, FakeClock(), data_plane=True)
    assert session.x0_wanted(has_data=True)
    assert not session.start(stand_in, unit_euler) and session.plan is None
    assert session.start(X0, unit_euler) and session.plan is not None  # the values start it
    off = RequestSession("o", CLIENT, CHORDS, FakeClock())
    assert off.x0_wanted(has_data=True)
    assert not off.start(stand_in, unit_euler) and off.plan is None


def test_an_eval_by_name_carries_no_tensor_and_names_its_inputs_holders(named_run):
    evals = named_run.sent(Kind.EVAL)
    assert evals and all(isinstance(m, EvalMessage) and m.latents == () for m in evals)
    first = evals[0]
    assert isinstance(first, EvalMessage) and first.inputs is not None
    assert first.inputs[0].op == "x0" and first.inputs[0].refs[0].ref == X0_REF
    later = [m for m in evals if isinstance(m, EvalMessage) and m.inputs and m.inputs[0].op != "x0"]
    assert later and all(m.dtype == "float32" for m in later)
    ops = {m.inputs[0].op for m in later if m.inputs}
    assert ops == {"ref", "rectify"}
    for message in later:
        assert message.inputs is not None
        for named in message.inputs[0].refs:
            assert named.holders, named  # every input is held somewhere


def test_a_hit_is_computed_by_a_worker_decode_by_name(named_run):
    decodes = named_run.sent(Kind.DECODE)
    assert len(decodes) == len(named_run.hits)
    for message in decodes:
        assert isinstance(message, DecodeMessage) and message.latent is None
        assert message.value is not None and message.want_latent and not message.media


def test_results_nothing_needs_are_dropped_and_release_empties_the_stores(named_run):
    drops = named_run.sent(Kind.DROP)
    assert drops and all(isinstance(m, DropMessage) and m.refs for m in drops)
    dropped = sum(len(m.refs) for m in drops if isinstance(m, DropMessage))
    assert dropped > named_run.final.stats["evaluations"]  # most results, as soon as possible
    assert all(not store for store in named_run.pool.stores.values())  # RELEASE at the end


def test_a_core_chain_stays_on_its_worker_mostly(named_run):
    assert named_run.pool.fetched < named_run.final.stats["evaluations"] // 2


def test_sequential_by_name_equals_the_tensor_path():
    spec = RequestSpec(model=MODEL, steps=12, method="sequential", seed=0)
    same_hits(drive(spec, workers=2), drive(spec, workers=2, data_plane=False))


def kill_holder(workers: int = 4) -> Callable[[Run, BrokerCore], list[Send]]:
    """Lose the worker holding the most results the request still needs (a core's chain: with
    each chain bound to a worker, which one holds what at a given answer depends on the
    placement)."""

    def event(run: Run, core: BrokerCore) -> list[Send]:
        (session,) = core.sessions.values()
        needed = session.needed()

        def held(name: str) -> int:
            return sum(ref in needed for _, ref in run.pool.held(HonestPool.endpoint(name)))

        return kill(max((f"w{i}" for i in range(workers)), key=held))(run, core)

    return event


@pytest.mark.parametrize("at", [8, 20, 40])
def test_a_killed_chain_holder_is_recomputed_bitwise(tensors_run, at):
    run = drive(CHORDS, events={at: kill_holder()})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)
    assert run.final.stats["replays"] > 0


def test_two_workers_killed_at_once_still_bitwise(tensors_run):
    run = drive(CHORDS, events={25: kill("w0", "w2")})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)


def test_every_worker_killed_fails_no_worker():
    run = drive(CHORDS, events={20: kill("w0", "w1", "w2", "w3")}, worker_timeout_s=5.0)
    assert isinstance(run.final, ErrorMessage) and run.final.code == "no_worker"


def test_a_recovery_past_its_bound_fails_typed():
    run = drive(CHORDS, events={30: kill("w1", "w2")}, max_replays=0)
    assert isinstance(run.final, ErrorMessage) and run.final.code == "recovery_too_large"


def test_a_lost_input_is_recomputed_and_the_task_runs_again(tensors_run):
    """A holder that silently lost a result (its store emptied, the worker alive): the
    worker that needed it answers FAILED lost_input, the broker recomputes it."""
    emptied = False

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        nonlocal emptied
        endpoint = HonestPool.endpoint(identity.decode())
        if not emptied and isinstance(job, EvalMessage) and job.inputs:
            for named in job.inputs[0].refs:
                other = [h.endpoint for h in named.holders if h.endpoint != endpoint]
                if named.ref != X0_REF and other and other[0] in run.pool.stores:
                    run.pool.stores[other[0]].clear()
                    emptied = True
                    break
        return run.pool.answer(job, endpoint)

    run = drive(CHORDS, answer=answer)
    assert emptied and isinstance(run.final, DoneMessage), run.final
    assert run.core is not None and run.core.metrics.failures["lost_input"] >= 1
    same_hits(run, tensors_run)
    assert run.final.stats["replays"] > 0
    # recomputed at the first claim: nobody claimed past --max-lost-inputs and left
    assert not run.core.metrics.failures.get("inputs_unreachable"), run.core.metrics.failures


def _lying(
    meta: Callable[[HeldResult], HeldResult], after: int = 0
) -> Callable[[Run, bytes, Message], Message | None]:
    """Worker w3 (not the first to answer: the first result sets the request's dtype) reports
    every result it keeps through ``meta``, after its first ``after``."""
    answered = 0

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        nonlocal answered
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if identity == b"w3" and isinstance(reply, ResultMessage):
            answered += 1
        if answered > after and identity == b"w3" and isinstance(reply, ResultMessage):
            entries = tuple(
                ResultEntry(e.task, e.attempt, {}, {t: meta(h) for t, h in (e.held or {}).items()})
                for e in reply.entries
            )
            return dataclasses.replace(reply, entries=entries)
        return reply

    return answer


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (lambda h: dataclasses.replace(h, finite=False), "non_finite"),
        (lambda h: dataclasses.replace(h, shape=(5,)), "shape"),
        (lambda h: dataclasses.replace(h, dtype="float64", nbytes=2 * h.nbytes), "dtype"),
        (lambda h: dataclasses.replace(h, nbytes=h.nbytes + 1), "malformed"),
    ],
    ids=["non_finite", "shape", "dtype", "size"],
)
def test_a_held_result_that_fails_the_checks_runs_elsewhere(tensors_run, meta, reason):
    run = drive(CHORDS, answer=_lying(meta))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)
    assert run.core is not None and run.core.metrics.failures[reason] >= 1
    assert run.core.metrics.failures.get("lost") is None


def test_a_result_of_tensors_for_an_eval_by_name_is_a_broken_answer():
    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == b"w0" and isinstance(job, EvalMessage) and job.inputs is not None:
            entries = tuple(
                ResultEntry(e.task, e.attempt, {t: torch.zeros(4) for t in e.targets})
                for e in job.entries
            )
            return ResultMessage(entries=entries).ids(job)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = drive(CHORDS, answer=answer)
    assert run.core is not None and run.core.metrics.failures["broken"] >= 1
    assert isinstance(run.final, DoneMessage)


def test_output_media_decodes_by_name_and_sends_the_latent_too(tensors_run):
    spec = dataclasses.replace(CHORDS, output="both")
    run = drive(spec)
    assert isinstance(run.final, DoneMessage)
    assert all(h.media is not None for h in run.hits)
    same_hits(run, tensors_run)


def test_a_core_chain_stays_on_the_idle_worker_holding_it():
    """FIFO placement, one worker per core: a worker leaves a task to the idle worker that holds
    its input (without that preference this request fetches 30 inputs). Step by step
    (``--chain 1``): a chain keeps a core's steps on its worker whatever the placement."""
    run = drive(dataclasses.replace(CHORDS, steps=30), placement="fifo", chain=1)
    assert isinstance(run.final, DoneMessage)
    assert run.pool.fetched <= 20


def test_a_worker_without_a_data_endpoint_keeps_the_request_on_the_tensor_path(tensors_run):
    def no_data(run: Run, core: BrokerCore) -> list[Send]:
        return core.worker_message(b"w9", hello("w9", MODEL))

    run = drive(CHORDS, workers=0, events={0: no_data})
    assert isinstance(run.final, DoneMessage)
    evals = run.sent(Kind.EVAL)
    assert evals and all(isinstance(m, EvalMessage) and m.inputs is None for m in evals)
    same_hits(run, tensors_run)


def test_a_late_worker_keeps_the_request_and_what_it_holds(tensors_run):
    """A late EVAL is copied elsewhere, but its worker is not released from the request: that
    would throw away every result it holds."""
    run = drive(CHORDS, speeds={"w3": (3, 30.0)})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)
    assert run.core is not None and run.core.metrics.failures["late"] >= 1
    assert run.final.stats["replays"] == 0
    releases = [s for s in run.to_workers if s.message.kind is Kind.RELEASE]
    assert len(releases) == 4  # the request's end only


def test_a_worker_excluded_after_a_bad_result_is_no_holder_any_more(tensors_run):
    """w3's results are good, then one is not: it is released from the request, and every
    result it held is recomputed (no EVAL names it again: ``drive`` checks)."""
    run = drive(CHORDS, answer=_lying(lambda h: dataclasses.replace(h, finite=False), after=4))
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)
    assert run.final.stats["replays"] > 0


def test_a_hit_whose_inputs_are_lost_waits_for_them(tensors_run):
    """The worker holding a released hit's latent dies before its decode: the decode waits
    for the recomputed result (``drive`` checks that no DECODE names it held nowhere)."""
    killed: list[str] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if not killed and isinstance(job, DecodeMessage) and job.value is not None:
            ref = job.value.refs[0].ref
            holders = [e for e, store in run.pool.stores.items() if (job.request, ref) in store]
            for endpoint in holders:
                name = endpoint.removeprefix("tcp://").removesuffix(":1")
                killed.append(name)
                assert run.core is not None
                run.route(kill(name)(run, run.core))
            if HonestPool.endpoint(identity.decode()) in holders:
                return None  # the decoder was the holder: lost with it
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = drive(CHORDS, answer=answer)
    assert killed and isinstance(run.final, DoneMessage), run.final
    same_hits(run, tensors_run)
    assert run.final.stats["replays"] > 0


# -- what the broker holds (issue 25: its peak RSS within 2 latents) ----------------------------


def test_the_broker_holds_no_initial_latent_on_the_data_plane():
    """By name the plan starts from a stand-in of x0's shape and dtype that holds no memory;
    off the data plane, or with a stop rule that reads the hits' values, the plan computes
    with x0 and the broker keeps it."""
    seen: list[tuple[bool, bool, int, tuple[int, ...]]] = []

    def look(run: Run, core: BrokerCore) -> list[Send]:
        (session,) = core.sessions.values()
        seen.append((session.named, session.x0.is_meta, session.latent_bytes, session.latent_shape))
        assert session.held_bytes() == 0 or not session.named
        return []

    residual = dataclasses.replace(CHORDS, stop="residual:1e-9")
    for spec, data_plane in ((CHORDS, True), (CHORDS, False), (residual, True)):
        run = drive(spec, data_plane=data_plane, events={10: look})
        assert isinstance(run.final, DoneMessage), run.final
    assert seen == [
        (True, True, LATENT, (4,)),
        (False, False, LATENT, (4,)),
        (False, False, LATENT, (4,)),
    ]


def test_hits_are_computed_one_at_a_time_in_release_order():
    """A hit's latent crosses the broker on its way to the client: its DECODE goes out only
    once the hit before it has arrived (and gone on), so the broker holds at most the hit
    going out and the one arriving. Here cores 1 to 4 all hit at round 20, released at once."""
    spec = dataclasses.replace(CHORDS, init_sequence=[0, 1, 2, 3])
    order: list[tuple[int, int]] = []  # (DECODE answered, DECODEs sent by then)

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if isinstance(job, DecodeMessage):
            order.append((job.task or 0, len(run.sent(Kind.DECODE))))
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    run = drive(spec, answer=answer)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, drive(spec, data_plane=False))
    assert len(order) == len(run.hits) == CHORDS.cores + 1
    assert [sent for _, sent in order] == list(range(1, len(order) + 1))
