"""The wire format (chords_mq.wire): bitwise tensor round trips, zero-copy send and receive,
one frozen type per kind that survives ``decode(encode(m))`` field for field, every limit,
header and body rule raising WireError, and fuzzing that lets no other exception out of
``decode``.

Malformed input is fed to ``decode`` as headers packed by hand: the typed messages cannot hold
most of it, and raw headers are the best test of the decoder. ``SCHEMAS`` below is this test's
own statement of every kind's body, independent of the annotations the types derive theirs from.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chords_mq.algorithms.base import MAX_TARGETS, Rectify, Ref
from chords_mq.errors import ChordsError
from chords_mq.wire import (
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    MAX_POOL_KEYS,
    MAX_TASKS,
    PROTOCOL_VERSION,
    TYPES,
    AcceptedMessage,
    CancelMessage,
    ComparedMessage,
    CompareMessage,
    DecodedMessage,
    DecodeMessage,
    DisconnectMessage,
    DoneMessage,
    DropMessage,
    ErrorMessage,
    EvalMessage,
    FailedMessage,
    HeartbeatMessage,
    HelloMessage,
    HitMessage,
    Kind,
    Message,
    PartMessage,
    PoolMessage,
    PreparedMessage,
    PrepareMessage,
    ProgressMessage,
    ReleaseMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    StatusMessage,
    SubmitMessage,
    TaskEntry,
    WelcomeMessage,
    WireError,
    WireLimits,
    decode,
    encode,
    failed_for,
    tensor_digest,
)
from chords_mq.wire.named import (
    X0_REF,
    Fetched,
    HeldResult,
    Holder,
    NamedInput,
    NamedRef,
    Push,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER_KEYS = ("v", "kind", "epoch", "req", "task", "attempt", "tensors", "body")
# Same-width integer dtypes, so tensors compare bit for bit (NaN payloads and -0.0 included).
BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.uint8: torch.uint8,
}


def random_tensor(shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    bits = BITS[want.dtype]
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def assert_same(got: Any, want: Any) -> None:
    """Equal values of the same types, tensors bit for bit, containers in the same order."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, torch.Tensor):
        assert_bitwise_equal(got, want)
    elif isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):  # NamedTuples included: their type is checked above
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_same(a, b)
    else:
        assert got == want


def assert_same_message(got: Message, want: Message) -> None:
    """The same type with equal fields: header ids, body fields, entries and tensors."""
    assert type(got) is type(want)
    for item in dataclasses.fields(want):
        assert_same(getattr(got, item.name), getattr(want, item.name))


def ids_of(message: Message) -> tuple:
    return (message.kind, message.epoch, message.request, message.task, message.attempt)


def round_trip(message: Message, limits: WireLimits | None = None) -> Message:
    limits = limits or WireLimits()
    return decode([bytes(frame) for frame in encode(message, limits)], limits)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame) -> dict:
    return msgpack.unpackb(bytes(frame), raw=False)


def header(**changes) -> dict:
    """A valid RELEASE header (no tensors, empty body), with ``changes`` applied."""
    base = {
        "v": PROTOCOL_VERSION,
        "kind": "RELEASE",
        "epoch": 0,
        "req": None,
        "task": None,
        "attempt": None,
        "tensors": [],
        "body": {},
    }
    return {**base, **changes}


def latent_header(*specs, **changes) -> dict:
    """A DECODE header listing ``specs`` (valid with the one spec ["latent", "float32", [1]])."""
    return header(kind="DECODE", tensors=[*specs], **changes)


LATENT = ["latent", "float32", [1]]


def with_body(frames, body) -> list:
    """``frames`` with the header's body replaced, the tensor frames kept."""
    return [pack({**unpack(frames[0]), "body": body}), *frames[1:]]


def with_header(frames, **changes) -> list:
    return [pack({**unpack(frames[0]), **changes}), *frames[1:]]


def body_of(frames) -> dict:
    return unpack(frames[0])["body"]


# -- every kind's body, as this test states it ---------------------------------------------------

NONE = type(None)
NUM = (int, float)
# Per kind: required body keys and their types, then optional ones. An optional field whose
# type admits None (an ``X | None`` annotation) may be sent as null, which reads as left out.
SCHEMAS: dict[Kind, tuple[dict[str, Any], dict[str, Any]]] = {
    Kind.HELLO: (
        {
            "worker": str,
            "model": str,
            "device": str,
            "dtype": str,
            "max_batch": int,
            "version": str,
        },
        {
            "capabilities": (list, NONE),
            "protocol": int,
            "session": (str, NONE),
            "solver": (str, NONE),
            "data": (str, NONE),
            "device_class": (str, NONE),
        },
    ),
    Kind.PREPARED: (
        {"solver": dict, "x0_digest": str},
        {
            "prepare_s": (*NUM, NONE),
            "shape": (list, NONE),
            "dtype": (str, NONE),
            "result_dtype": (str, NONE),
        },
    ),
    Kind.RESULT: (
        {"tasks": list},
        {"compute_s": (*NUM, NONE), "fetched": (list, NONE), "cold": (bool, NONE)},
    ),
    Kind.DECODED: ({}, {"compute_s": (*NUM, NONE), "parts": (int, NONE)}),
    Kind.PART: ({"index": int, "parts": int}, {"core": (int, NONE)}),
    Kind.FAILED: (
        {"code": str, "message": str},
        {"tasks": list, "lost_ref": (list, NONE), "lost_holder": (str, NONE)},
    ),
    Kind.WELCOME: ({"heartbeat_ms": int}, {"pool_keys": (list, NONE)}),
    Kind.POOL: ({"pool_keys": list}, {}),
    Kind.PREPARE: ({"request": dict}, {"initial": bool, "max_latent_bytes": (int, NONE)}),
    Kind.EVAL: (
        {"tasks": list},
        {
            "inputs": list,
            "dtype": (str, NONE),
            "chain": (bool, NONE),
            "digests": (bool, NONE),
            "push": list,
            "pushed": list,
        },
    ),
    Kind.DECODE: (
        {},
        {"value": list, "media": (bool, NONE), "want_latent": (bool, NONE), "parts": (int, NONE)},
    ),
    Kind.RELEASE: ({}, {}),
    Kind.DROP: ({"refs": list}, {}),
    Kind.COMPARE: ({"mine": list, "theirs": list, "dtype": str}, {}),
    Kind.COMPARED: ({}, {"distances": list, "digests": list, "error": (str, NONE)}),
    Kind.HEARTBEAT: ({}, {"in_flight": (list, NONE), "missing": (list, NONE)}),
    Kind.DISCONNECT: ({}, {"reason": (str, NONE), "shutdown": (bool, NONE)}),
    Kind.SUBMIT: (
        {"request": dict},
        {"wait_for_worker_s": (*NUM, NONE), "hit_parts": (bool, NONE)},
    ),
    Kind.CANCEL: ({}, {}),
    Kind.STATUS: (
        {},
        {
            "offset": (int, NONE),
            "workers": (list, NONE),
            "sessions": (list, NONE),
            "epoch": (int, NONE),
            "sessions_total": (int, NONE),
            "workers_total": (int, NONE),
            "role": (str, NONE),
        },
    ),
    Kind.ACCEPTED: (
        {"steps": int, "method": str, "hit_rounds": list},
        {
            "init_sequence": (list, NONE),
            "workers": (int, NONE),
            "cores": (int, NONE),
            "requested_cores": (int, NONE),
        },
    ),
    Kind.PROGRESS: (
        {"evaluations": int},
        {"hits": (int, NONE), "cores": (list, NONE), "waiting": (dict, NONE)},
    ),
    Kind.HIT: (
        {"core": int, "round": int, "steps": int, "elapsed_s": NUM},
        {"parts": (int, NONE), "shape": (list, NONE), "dtype": (str, NONE)},
    ),
    Kind.DONE: ({"stats": dict}, {}),
    Kind.ERROR: ({"code": str, "message": str}, {"retry_after_s": (*NUM, NONE)}),
}
# Optional body keys a message sends even when nobody set them: non-None defaults, and ALWAYS.
SENT_BY_DEFAULT = {
    Kind.HELLO: {"protocol"},
    Kind.PREPARE: {"initial"},
    Kind.ACCEPTED: {"init_sequence"},
    Kind.COMPARED: {"distances"},
}
# The tensor frames each kind may carry (a name ending in "*": any suffix).
TENSOR_NAMES = {
    Kind.PREPARED: "solver.* x0",
    Kind.RESULT: "result.*",
    Kind.DECODED: "media latent",
    Kind.PART: "data",
    Kind.EVAL: "latent.*",
    Kind.DECODE: "latent",
    Kind.HIT: "latent media",
}

POOL_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a z85 public key's 40 characters
# One instance of every type with every field set, and one with the required fields only.
FULL: dict[Kind, Message] = {
    Kind.HELLO: HelloMessage(
        worker="w-1",
        model="synthetic",
        device="cpu",
        dtype="float32",
        max_batch=4,
        version="0.1.0",
        capabilities=["decode", "batch"],
        protocol=PROTOCOL_VERSION,
        session="s-1",
        solver="DDIMScheduler (first order of PNDMScheduler)",
        data="tcp://10.0.0.5:40123",
        device_class="cpu:x86_64|2.5.1+cpu|0123456789abcdef",
    ),
    Kind.PREPARED: PreparedMessage(
        solver=SolverSpec(
            {"kind": "ddim", "steps": 12, "eta": 0.0},
            {
                "sigmas": random_tensor((5,), torch.float64, seed=1),
                "alphas": random_tensor((5,), torch.float32, seed=2),
            },
        ),
        x0_digest="ab" * 16,
        x0=random_tensor((1, 4, 2, 2), torch.bfloat16, seed=3),
        prepare_s=0.5,
        shape=[1, 4, 2, 2],
        dtype="bfloat16",
        result_dtype="bfloat16",
        epoch=3,
        request="r-1",
    ),
    Kind.RESULT: ResultMessage(
        entries=(
            ResultEntry(7, 1, {4: random_tensor((3,), seed=4), 6: random_tensor((3,), seed=5)}),
            ResultEntry(8, 0, {9: random_tensor((3,), seed=6)}),
        ),
        compute_s=0.25,
        epoch=3,
        request="r-1",
        task=7,
        attempt=1,
    ),
    Kind.DECODED: DecodedMessage(
        media=random_tensor((2, 2, 3), torch.uint8, seed=7),
        compute_s=0.125,
        latent=random_tensor((2, 3), seed=11),
        task=3,
    ),
    Kind.PART: PartMessage(
        index=2,
        parts=4,
        data=random_tensor((12,), torch.uint8, seed=13),
        core=3,
        epoch=3,
        request="r-1",
        task=3,
        attempt=1,
    ),
    Kind.FAILED: FailedMessage(
        code="lost_input",
        message="boom",
        tasks=((7, 1), (8, 0)),
        lost_ref=[3, 4],
        lost_holder="tcp://127.0.0.1:9",
        request="r-1",
        task=7,
    ),
    Kind.WELCOME: WelcomeMessage(heartbeat_ms=500, pool_keys=(POOL_KEY,), epoch=3),
    Kind.POOL: PoolMessage(pool_keys=(POOL_KEY, "b" * 40), epoch=3),
    Kind.PREPARE: PrepareMessage(
        spec={"model": "synthetic", "steps": 10, "seed": 0},
        initial=False,
        max_latent_bytes=1 << 30,
        request="r-1",
    ),
    Kind.EVAL: EvalMessage(
        entries=(TaskEntry(7, 1, 3, 2, (4, 6)), TaskEntry(8, 0, 5, 3, (9,))),
        latents=(random_tensor((2, 3), seed=8), random_tensor((2, 3), seed=9)),
        epoch=5,
        request="r-1",
        task=7,
        attempt=1,
    ),
    Kind.DECODE: DecodeMessage(latent=random_tensor((1, 4, 2, 2), torch.bfloat16, seed=10), task=3),
    Kind.RELEASE: ReleaseMessage(request="r-1"),
    Kind.DROP: DropMessage(refs=(Ref(3, 4), Ref(5, 6)), request="r-1"),
    Kind.COMPARE: CompareMessage(
        mine=(Ref(9, 4),),
        theirs=(NamedInput("ref", (NamedRef(Ref(3, 4), (Holder("tcp://h:1", None),)),)),),
        dtype="bfloat16",
        request="r-1",
        task=3,
    ),
    Kind.COMPARED: ComparedMessage(
        distances=((1e-6, 2e-7),), digests=("ab" * 16,), error="e", request="r-1", task=3
    ),
    Kind.HEARTBEAT: HeartbeatMessage(in_flight=["a", "b"], missing=["b"]),
    Kind.DISCONNECT: DisconnectMessage(reason="bye", shutdown=True),
    Kind.SUBMIT: SubmitMessage(
        spec={"model": "synthetic", "steps": 10},
        wait_for_worker_s=2.5,
        hit_parts=True,
        request="r-1",
    ),
    Kind.CANCEL: CancelMessage(request="r-1"),
    Kind.STATUS: StatusMessage(
        offset=64,
        workers=[{"id": "w-1"}],
        sessions=[{"id": "r-1"}],
        status_epoch=9,
        sessions_total=65,
        workers_total=1,
        role="broker",
    ),
    Kind.ACCEPTED: AcceptedMessage(
        steps=10,
        method="chords",
        hit_rounds=[1, 2],
        init_sequence=[0, 4],
        workers=2,
        cores=2,
        requested_cores=3,
        request="r-1",
    ),
    Kind.PROGRESS: ProgressMessage(
        evaluations=12,
        hits=1,
        cores=[[0, 3], [4, 2]],
        waiting={"for": "worker", "model": "m", "since_s": 1.0, "fails_in_s": 5.0},
    ),
    Kind.HIT: HitMessage(
        core=1,
        round=4,
        steps=10,
        elapsed_s=0.5,
        latent=random_tensor((1, 4, 2, 2), seed=11),
        media=random_tensor((2, 2, 3), torch.uint8, seed=12),
        epoch=2,
        request="r-1",
    ),
    Kind.DONE: DoneMessage(stats={"evaluations": 12, "cancelled": False}, request="r-1"),
    Kind.ERROR: ErrorMessage(code="busy", message="m", retry_after_s=1.5, request="r-1"),
}
MINIMAL: dict[Kind, Message] = {
    Kind.HELLO: HelloMessage(
        worker="w-1", model="synthetic", device="cpu", dtype="float32", max_batch=1, version="0"
    ),
    Kind.PREPARED: PreparedMessage(solver=SolverSpec({}, {}), x0_digest="00"),
    Kind.RESULT: ResultMessage(entries=(ResultEntry(1, 0, {4: torch.zeros(2)}),)),
    Kind.DECODED: DecodedMessage(),
    Kind.PART: PartMessage(index=0, parts=1, data=torch.ones(1, dtype=torch.uint8)),
    Kind.FAILED: FailedMessage(code="worker_error", message=""),
    Kind.WELCOME: WelcomeMessage(heartbeat_ms=0),
    Kind.POOL: PoolMessage(pool_keys=()),
    Kind.PREPARE: PrepareMessage(spec={}),
    Kind.EVAL: EvalMessage(entries=(TaskEntry(0, 0, 0, 0, (1,)),), latents=(torch.zeros(2),)),
    Kind.DECODE: DecodeMessage(latent=torch.zeros(2)),
    Kind.RELEASE: ReleaseMessage(),
    Kind.DROP: DropMessage(refs=()),
    Kind.COMPARE: CompareMessage(
        mine=(Ref(0, 1),), theirs=(NamedInput("ref", (NamedRef(Ref(0, 1), ()),)),), dtype="float32"
    ),
    Kind.COMPARED: ComparedMessage(),
    Kind.HEARTBEAT: HeartbeatMessage(),
    Kind.DISCONNECT: DisconnectMessage(),
    Kind.SUBMIT: SubmitMessage(spec={}),
    Kind.CANCEL: CancelMessage(),
    Kind.STATUS: StatusMessage(),
    Kind.ACCEPTED: AcceptedMessage(steps=1, method="sequential", hit_rounds=[]),
    Kind.PROGRESS: ProgressMessage(evaluations=0),
    Kind.HIT: HitMessage(core=0, round=0, steps=1, elapsed_s=0),
    Kind.DONE: DoneMessage(stats={}),
    Kind.ERROR: ErrorMessage(code="x", message=""),
}
# The by-name variants (protocol 7): an EVAL's inputs and a DECODE's value instead of tensors.
BY_NAME: dict[Kind, Message] = {
    Kind.EVAL: EvalMessage(
        entries=(TaskEntry(7, 1, 3, 2, (4, 6)), TaskEntry(8, 0, 5, 3, (9,))),
        inputs=(
            NamedInput("x0", (NamedRef(X0_REF, (Holder("tcp://127.0.0.1:9", POOL_KEY),)),)),
            NamedInput(
                "rectify",
                tuple(NamedRef(Ref(t, 4), (Holder("tcp://h:1"),)) for t in (1, 2, 3)),
                True,
            ),
        ),
        dtype="float32",
        chain=True,
        digests=False,
        push=(Push(7, 6, (Holder("tcp://h:2", POOL_KEY),)),),
        pushed=(Ref(3, 4),),
        epoch=5,
        request="r-1",
        task=7,
        attempt=1,
    ),
    Kind.DECODE: DecodeMessage(
        value=NamedInput("ref", (NamedRef(Ref(5, 9), (Holder("tcp://h:1"),)),)),
        media=True,
        want_latent=True,
        parts=4,
        task=3,
    ),
    # (a latent sent in PARTs: the DECODED and the HIT after them carry none)
    Kind.DECODED: DecodedMessage(compute_s=0.5, parts=4, task=3),
    Kind.HIT: HitMessage(
        core=1, round=2, steps=3, elapsed_s=0.5, parts=2, shape=[2, 3], dtype="float32"
    ),
    Kind.RESULT: ResultMessage(
        entries=(
            ResultEntry(7, 1, {}, {4: HeldResult("float32", (2, 3), 24, True, "0f" * 16)}),
            ResultEntry(8, 0, {}, {9: HeldResult("bfloat16", (1,), 2, False)}),
        ),
        fetched=(Fetched("tcp://h:1", 24, 0.002),),  # protocol 8
        cold=True,
        task=7,
        attempt=1,
    ),
}
KINDS = list(Kind)
FULL_FRAMES = {kind: [bytes(frame) for frame in encode(FULL[kind])] for kind in KINDS}

SCHEMA_FIELDS = [
    (kind, key, expected)
    for kind, (required, optional) in SCHEMAS.items()
    for key, expected in {**required, **optional}.items()
]
REQUIRED_FIELDS = [(kind, key) for kind, (required, _) in SCHEMAS.items() for key in required]
# (the by-name keys change what a message carries: left out, it needs its tensors)
OPTIONAL_FIELDS = [
    (kind, key)
    for kind, (_, optional) in SCHEMAS.items()
    for key in optional
    if key in FULL[kind].body()
]
CANDIDATES = ["x", 3, 0.5, True, False, None, [1], {"a": 1}, b"x"]


def wrong_values(expected) -> list:
    types = expected if isinstance(expected, tuple) else (expected,)
    return [
        value
        for value in CANDIDATES
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    ]


def check_body(kind: Kind, body: dict) -> None:
    """``body`` holds what SCHEMAS says ``kind``'s body holds, and nothing else."""
    required, optional = SCHEMAS[kind]
    assert set(required) <= set(body), (kind, body)
    for key, value in body.items():
        assert key in required or key in optional, (kind, key)
        expected = {**required, **optional}[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        assert isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def check_tensor_names(kind: Kind, names) -> None:
    allowed = TENSOR_NAMES.get(kind, "").split()
    for name in names:
        assert any(
            name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1]))
            for pattern in allowed
        ), (kind, name)


def assert_valid(message: Message) -> None:
    """What ``decode`` returns is its kind's type, holds what the kind's schema allows, and
    re-encodes to a message that decodes to the same."""
    assert isinstance(message, Message)
    assert type(message) is TYPES[message.kind]
    body = message.body()
    check_body(message.kind, body)
    check_tensor_names(message.kind, message.tensors)
    for tensor in message.tensors.values():
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype in DTYPE_NAMES
    if isinstance(message, EvalMessage):
        assert len(message.entries) == len(message.latents) >= 1
    again = decode([bytes(frame) for frame in encode(message)])
    assert type(again) is type(message)
    assert ids_of(again) == ids_of(message)
    assert pack(again.body()) == pack(body)  # bytes, not values: NaN != NaN
    assert list(again.tensors) == list(message.tensors)


def decode_or_wire_error(frames) -> None:
    try:
        message = decode(frames)
    except WireError:
        return
    assert_valid(message)


# -- the types -----------------------------------------------------------------------------------


def test_every_kind_has_exactly_one_type():
    assert set(TYPES) == set(Kind)
    assert len(set(TYPES.values())) == len(Kind) == 25
    for kind, cls in TYPES.items():
        assert cls.KIND is kind
        assert issubclass(cls, Message)
        assert dataclasses.is_dataclass(cls)
    subclasses = Message.__subclasses__()
    assert sorted(cls.__name__ for cls in subclasses) == sorted(
        cls.__name__ for cls in TYPES.values()
    )
    assert {Kind(kind.value) for kind in Kind} == set(Kind)
    assert all(kind == kind.value for kind in Kind)  # the header's string


def test_the_samples_cover_every_kind_and_every_body_field():
    assert set(FULL) == set(MINIMAL) == set(SCHEMAS) == set(Kind)
    for kind in KINDS:
        assert FULL[kind].kind is kind and MINIMAL[kind].kind is kind
        required, optional = SCHEMAS[kind]
        keys = set(FULL[kind].body()) | set(BY_NAME[kind].body() if kind in BY_NAME else ())
        assert keys == {*required, *optional}, kind
        assert set(body_of(FULL_FRAMES[kind])) <= {*required, *optional}, kind


@pytest.mark.parametrize("kind", list(BY_NAME), ids=lambda k: k.value)
def test_by_name_messages_round_trip_without_tensors(kind):
    message = BY_NAME[kind]
    frames = [bytes(frame) for frame in encode(message)]
    assert len(frames) == 1  # the header only: no latent crosses
    got = decode(frames)
    assert got.body() == message.body()


def test_a_by_name_eval_names_its_holders_and_the_operation():
    got = decode([bytes(f) for f in encode(BY_NAME[Kind.EVAL])])
    assert isinstance(got, EvalMessage) and got.inputs is not None and got.latents == ()
    x0, rectify = got.inputs
    assert x0.latent() == X0_REF and x0.refs[0].holders[0].key == POOL_KEY
    assert rectify.latent() == Rectify(Ref(1, 4), Ref(2, 4), Ref(3, 4), False)  # out of place
    assert rectify.exclusive


@pytest.mark.parametrize(
    "inputs",
    [
        [["x0", [[1, 0, []]], False]],  # an x0 input names X0's name only
        [["ref", [[1, 0, []], [2, 0, []]], False]],  # a ref input names one ref
        [["rectify", [[1, 0, []]], False]],  # an operation names three
        [["sum", [[1, 0, []]], False]],
        [["ref", [[1, 0, [["tcp://h:1", None]] * 9]], False]],  # at most 8 holders
        [["ref", [[1, 0, [["ipc://h", None]]]], False]],
        [["ref", [[1, 0, [["tcp://h:1", "short"]]]], False]],
        [["ref", [[-1, 0, []]], False]],
        [["ref", [[1, 0, []]], 1]],
        [],  # one per task
    ],
)
def test_bad_by_name_inputs_are_refused(inputs):
    body = {**body_of(FULL_FRAMES[Kind.EVAL]), "tasks": [[7, 1, 3, 2, [4]]], "inputs": inputs}
    header = msgpack.unpackb(FULL_FRAMES[Kind.EVAL][0])
    header["tensors"] = []
    header["body"] = body
    with pytest.raises(WireError):
        decode([msgpack.packb(header)])


def test_drop_is_bounded():
    too_many = DropMessage(refs=tuple(Ref(i, 1) for i in range(257)))
    with pytest.raises(WireError):
        decode([bytes(f) for f in encode(too_many)])


def test_messages_are_frozen():
    message = FULL[Kind.HIT]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.core = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.epoch = 1


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("sample", ["full", "minimal"])
def test_every_type_round_trips_with_equal_fields(kind, sample):
    message = (FULL if sample == "full" else MINIMAL)[kind]
    got = round_trip(message)
    assert_same_message(got, message)
    assert got.kind is kind
    assert list(got.tensors) == list(message.tensors)
    assert pack(got.body()) == pack(message.body())
    assert_valid(got)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_optional_fields_left_none_are_not_sent(kind):
    required, _ = SCHEMAS[kind]
    expected = {*required, *SENT_BY_DEFAULT.get(kind, ())}
    minimal = MINIMAL[kind]
    assert set(minimal.body()) == expected
    assert set(body_of(encode(minimal))) == expected
    assert None not in [
        value for key, value in minimal.body().items() if key not in SENT_BY_DEFAULT.get(kind, ())
    ]


def test_accepted_always_sends_its_init_sequence():
    sequential = AcceptedMessage(steps=10, method="sequential", hit_rounds=[10])
    assert sequential.body() == {
        "steps": 10,
        "method": "sequential",
        "hit_rounds": [10],
        "init_sequence": None,
    }
    assert body_of(encode(sequential))["init_sequence"] is None
    assert round_trip(sequential).init_sequence is None
    chords = AcceptedMessage(steps=10, method="chords", hit_rounds=[3], init_sequence=[0, 4])
    assert round_trip(chords).body()["init_sequence"] == [0, 4]
    # a peer that leaves it out is still understood
    frames = with_body(encode(sequential), {"steps": 10, "method": "s", "hit_rounds": []})
    assert decode(frames).init_sequence is None


@pytest.mark.parametrize(
    ("kind", "key"), OPTIONAL_FIELDS, ids=[f"{k.value}.{f}" for k, f in OPTIONAL_FIELDS]
)
def test_an_optional_field_may_be_left_out(kind, key):
    body = body_of(FULL_FRAMES[kind])
    del body[key]
    got = decode(with_body(FULL_FRAMES[kind], body))
    assert type(got) is TYPES[kind]
    assert key not in got.body() or key in SENT_BY_DEFAULT.get(kind, ())


def test_kind_stamped_and_ids():
    eval_ = FULL[Kind.EVAL]
    assert eval_.kind is Kind.EVAL and eval_.kind == "EVAL"
    assert eval_.stamped(eval_.epoch) is eval_
    stamped = eval_.stamped(11)
    assert stamped.epoch == 11 and eval_.epoch == 5
    assert stamped.entries is eval_.entries and stamped.latents is eval_.latents
    answer = ResultMessage(entries=FULL[Kind.RESULT].entries).ids(eval_)
    assert ids_of(answer)[1:] == ids_of(eval_)[1:] == (5, "r-1", 7, 1)
    assert answer.entries is FULL[Kind.RESULT].entries


def test_failed_for_an_eval_names_its_tasks_with_the_evals_ids_and_round_trips():
    job = FULL[Kind.EVAL]
    failed = round_trip(failed_for(job, "worker_error", "boom"))
    assert isinstance(failed, FailedMessage)
    assert (failed.code, failed.message) == ("worker_error", "boom")
    assert failed.tasks == ((7, 1), (8, 0))
    assert ids_of(failed)[1:] == ids_of(job)[1:]
    assert failed.body()["tasks"] == [[7, 1], [8, 0]]
    prepare = failed_for(FULL[Kind.PREPARE], "invalid_request", "no prompt")
    assert prepare.tasks == () and "tasks" not in prepare.body()
    assert prepare.request == "r-1"
    assert round_trip(prepare).tasks == ()


# -- round trips ---------------------------------------------------------------------------------


def carry(tensor: torch.Tensor) -> DecodeMessage:
    return DecodeMessage(latent=tensor)


def carried(message: Message) -> torch.Tensor:
    assert isinstance(message, DecodeMessage)
    return message.latent


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_allowed_dtype_round_trips_bitwise(name):
    tensor = random_tensor((3, 4, 5), DTYPES[name])
    assert_bitwise_equal(carried(round_trip(carry(tensor))), tensor)


def test_bfloat16_round_trip_is_bitwise():
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    tensor = every_pattern.view(torch.bfloat16).reshape(256, 256)
    assert_bitwise_equal(carried(round_trip(carry(tensor))), tensor)


def test_float16_round_trip_is_bitwise_for_every_bit_pattern():
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    tensor = every_pattern.view(torch.float16)
    assert_bitwise_equal(carried(round_trip(carry(tensor))), tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),
        lambda t: t[::2, 1::3],
        lambda t: t[1:, 2:],
        lambda t: t[:, :1].expand(6, 5),
    ],
    ids=["transposed", "strided-slice", "offset-slice", "expanded"],
)
def test_non_contiguous_tensors_round_trip_as_contiguous_copies(name, make):
    tensor = make(random_tensor((6, 9), DTYPES[name]))
    assert not tensor.is_contiguous()
    got = carried(round_trip(carry(tensor)))
    assert got.is_contiguous()
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_zero_dim_tensor_round_trips(name):
    tensor = random_tensor((), DTYPES[name])
    got = carried(round_trip(carry(tensor)))
    assert got.dim() == 0
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_empty_tensor_round_trips_with_its_shape(name, shape):
    tensor = torch.empty(shape, dtype=DTYPES[name])
    frames = encode(carry(tensor))
    assert memoryview(frames[1]).nbytes == 0
    assert_bitwise_equal(carried(decode(frames)), tensor)


def test_several_tensors_keep_their_names_order_and_values():
    tensors = {
        "zeta": random_tensor((2, 3), torch.float32, seed=1),
        "alpha": random_tensor((4,), torch.bfloat16, seed=2),
        "mid": random_tensor((2, 2, 3), torch.uint8, seed=3),
        "beta": random_tensor((), torch.float64, seed=4),
        "empty": torch.empty(0, dtype=torch.float16),
    }
    x0 = random_tensor((2,), torch.float16, seed=5)
    message = PreparedMessage(solver=SolverSpec({"kind": "x"}, tensors), x0_digest="00", x0=x0)
    frames = encode(message)
    assert [name for name, _, _ in unpack(frames[0])["tensors"]] == [
        "solver.zeta",
        "solver.alpha",
        "solver.mid",
        "solver.beta",
        "solver.empty",
        "x0",
    ]
    got = decode(frames)
    assert isinstance(got, PreparedMessage)
    assert list(got.solver.tensors) == ["zeta", "alpha", "mid", "beta", "empty"]
    for name, tensor in tensors.items():
        assert_bitwise_equal(got.solver.tensors[name], tensor)
    assert got.x0 is not None
    assert_bitwise_equal(got.x0, x0)
    assert got.solver.fields == {"kind": "x"}


def test_eval_header_fields_are_preserved():
    latent = random_tensor((1, 4, 8, 8), torch.bfloat16)
    message = EvalMessage(
        entries=(TaskEntry(7, 1, 3, 2, (4, 6)),),
        latents=(latent,),
        epoch=5,
        request="req-1",
        task=7,
        attempt=1,
    )
    got = round_trip(message)
    assert ids_of(got) == (Kind.EVAL, 5, "req-1", 7, 1)
    assert isinstance(got, EvalMessage)
    assert got.entries == (TaskEntry(7, 1, 3, 2, (4, 6)),)
    assert_bitwise_equal(got.latents[0], latent)


def test_hit_header_fields_are_preserved_at_their_bounds():
    latent = random_tensor((2, 3), torch.float32)
    message = HitMessage(
        core=1,
        round=4,
        steps=10,
        elapsed_s=0.5,
        latent=latent,
        epoch=2**64 - 1,
        request="a" * 128,
        task=2**63 - 1,
        attempt=0,
    )
    got = round_trip(message)
    assert ids_of(got) == (Kind.HIT, 2**64 - 1, "a" * 128, 2**63 - 1, 0)
    assert_same_message(got, message)
    assert isinstance(got, HitMessage) and got.media is None


def test_absent_ids_stay_none():
    got = round_trip(HeartbeatMessage())
    assert ids_of(got) == (Kind.HEARTBEAT, 0, None, None, None)
    assert got.body() == {}
    assert got.tensors == {}


def test_numeric_and_nullable_fields_accept_each_allowed_type():
    for message in (
        HitMessage(core=1, round=4, steps=10, elapsed_s=0),
        HitMessage(core=1, round=4, steps=10, elapsed_s=2.5),
        AcceptedMessage(steps=10, method="chords", hit_rounds=[1, 2], init_sequence=None),
        AcceptedMessage(steps=10, method="chords", hit_rounds=[1, 2], init_sequence=[0, 4]),
    ):
        got = round_trip(message)
        assert got.body() == message.body()
        assert_same_message(got, message)
    assert type(round_trip(HitMessage(core=1, round=4, steps=10, elapsed_s=0)).elapsed_s) is int


def test_tensors_that_require_grad_are_sent_detached():
    tensor = torch.randn(4, requires_grad=True)
    got = carried(round_trip(carry(tensor)))
    assert not got.requires_grad
    assert_bitwise_equal(got, tensor.detach())


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda b: zmq.Frame(bytes(b))],
    ids=["bytes", "bytearray", "memoryview", "zmq.Frame"],
)
def test_decode_accepts_every_buffer_type(wrap):
    tensor = random_tensor((5, 7), torch.float32)
    message = EvalMessage(entries=(TaskEntry(7, 1, 3, 2, (4, 6)),), latents=(tensor,), epoch=1)
    got = decode([wrap(bytes(frame)) for frame in encode(message)])
    assert isinstance(got, EvalMessage)
    assert (got.kind, got.epoch) == (Kind.EVAL, 1)
    assert_bitwise_equal(got.latents[0], tensor)


def test_wire_error_is_a_value_error_and_a_chords_error():
    with pytest.raises(ValueError):
        decode([])
    assert issubclass(WireError, ChordsError)


# -- zero copy -----------------------------------------------------------------------------------


def test_encode_sends_contiguous_tensor_memory_without_copying():
    tensor = random_tensor((64, 64), torch.bfloat16)
    frames = encode(carry(tensor))
    assert torch.frombuffer(frames[1], dtype=torch.uint8).data_ptr() == tensor.data_ptr()
    results = ResultMessage(entries=(ResultEntry(0, 0, {3: tensor}),))
    assert torch.frombuffer(encode(results)[1], dtype=torch.uint8).data_ptr() == tensor.data_ptr()


def test_decode_of_aligned_writable_frame_shares_its_memory():
    tensor = random_tensor((16, 16), torch.float32)
    head, payload = encode(carry(tensor))
    backing = torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()
    assert backing.data_ptr() % 16 == 0
    got = carried(decode([head, memoryview(backing.numpy())]))
    assert got.data_ptr() == backing.data_ptr()
    assert_bitwise_equal(got, tensor)
    backing[:4] = 0  # the receive buffer and the tensor are the same memory
    assert got[0, 0].item() == 0.0


def offset_frame(payload, offset: int) -> tuple[torch.Tensor, memoryview]:
    """A writable copy of ``payload`` starting ``offset`` bytes into 64-byte aligned memory."""
    backing = torch.zeros(memoryview(payload).nbytes + offset, dtype=torch.uint8)
    backing[offset:] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    assert backing.data_ptr() % 64 == 0
    return backing, memoryview(backing.numpy())[offset:]


def test_decode_shares_frames_aligned_to_the_element_size():
    tensor = random_tensor((16,), torch.float64)
    head, payload = encode(carry(tensor))
    backing, frame = offset_frame(payload, 8)
    got = carried(decode([head, frame]))
    assert got.data_ptr() == backing.data_ptr() + 8
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", ["float64", "float32", "bfloat16"])
def test_decode_copies_frames_not_aligned_to_the_element_size(name):
    tensor = random_tensor((16,), DTYPES[name])
    head, payload = encode(carry(tensor))
    backing, frame = offset_frame(payload, 1)
    got = carried(decode([head, frame]))
    assert got.data_ptr() % got.element_size() == 0
    assert got.data_ptr() != backing.data_ptr() + 1
    assert_bitwise_equal(got, tensor)


def test_decode_of_read_only_frame_returns_a_writable_copy():
    tensor = random_tensor((8,), torch.float32)
    head, payload = encode(carry(tensor))
    raw = bytes(payload)
    got = carried(decode([head, raw]))
    got.add_(1.0)
    assert raw == bytes(encode(carry(tensor))[1])


@pytest.mark.parametrize("transport", ["inproc-pair", "tcp-dealer-router"])
def test_zeromq_zero_copy_round_trip_is_bitwise(transport):
    tensor = random_tensor((512, 1024), torch.bfloat16)  # 1 MiB
    assert tensor.numel() * tensor.element_size() == 1 << 20
    message = EvalMessage(
        entries=(TaskEntry(3, 0, 1, 0, (2,)),), latents=(tensor,), epoch=9, request="req-9", task=3
    )
    ctx = zmq.Context()
    if transport == "inproc-pair":
        sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        address = "inproc://wire-test"
    else:
        sender, receiver = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
        address = "tcp://127.0.0.1:*"
    try:
        for sock in (sender, receiver):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 5000)
        receiver.bind(address)
        sender.connect(receiver.getsockopt(zmq.LAST_ENDPOINT).decode())
        sender.send_multipart(encode(message), copy=False)
        frames = receiver.recv_multipart(copy=False)
        if transport == "tcp-dealer-router":
            frames = frames[1:]  # the ROUTER's routing id
        got = decode(frames)
        assert isinstance(got, EvalMessage)
        received = torch.frombuffer(frames[-1].buffer, dtype=torch.uint8).data_ptr()
        assert got.latents[0].data_ptr() == received  # zero-copy receive
    finally:
        sender.close()
        receiver.close()
        ctx.term()
    assert_same_message(got, message)


# -- limits --------------------------------------------------------------------------------------


def test_header_over_max_header_bytes_is_rejected():
    message = ErrorMessage(code="boom", message="m" * 100)
    size = len(encode(message)[0])
    limits = WireLimits(max_header_bytes=size)
    assert round_trip(message, limits).body() == message.body()
    small = WireLimits(max_header_bytes=size - 1)
    with pytest.raises(WireError):
        encode(message, small)
    with pytest.raises(WireError):
        decode(encode(message), small)


def solver_of(count: int) -> PreparedMessage:
    tensors = {f"t{i}": torch.zeros(1) for i in range(count)}
    return PreparedMessage(solver=SolverSpec({}, tensors), x0_digest="00")


def test_more_tensors_than_max_tensors_is_rejected_on_encode():
    limits = WireLimits(max_tensors=2)
    assert list(round_trip(solver_of(2), limits).tensors) == ["solver.t0", "solver.t1"]
    with pytest.raises(WireError, match="exceed the limit"):
        encode(solver_of(3), limits)
    eval_ = EvalMessage(
        entries=tuple(TaskEntry(i, 0, 0, 0, (1,)) for i in range(3)),
        latents=(torch.zeros(1),) * 3,
    )
    with pytest.raises(WireError, match="exceed the limit"):
        encode(eval_, limits)
    with pytest.raises(WireError, match="exceed the limit"):
        encode(solver_of(DEFAULT_LIMITS.max_tensors + 1))


def test_more_tensor_frames_than_max_tensors_is_rejected_on_decode():
    frames = encode(solver_of(3))
    assert list(decode(frames).tensors) == ["solver.t0", "solver.t1", "solver.t2"]
    with pytest.raises(WireError, match="exceed the limit"):
        decode(frames, WireLimits(max_tensors=2))
    too_many = DEFAULT_LIMITS.max_tensors + 1  # refused before the header is read
    with pytest.raises(WireError, match="exceed the limit"):
        decode([pack(header()), *[b"\0" * 4] * too_many])


@pytest.mark.parametrize("extra_frames", [0, 2])
def test_tensor_frame_count_must_match_header(extra_frames):
    head, payload = encode(carry(torch.zeros(2)))
    assert carried(decode([head, payload])).shape == (2,)
    with pytest.raises(WireError):
        decode([head, *[payload] * extra_frames])


def test_frame_over_max_frame_bytes_is_rejected():
    limits = WireLimits(max_frame_bytes=16)
    assert carried(round_trip(carry(torch.zeros(4)), limits)).shape == (4,)
    big = carry(torch.zeros(5))
    with pytest.raises(WireError):
        encode(big, limits)
    with pytest.raises(WireError):
        decode(encode(big), limits)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.int8, torch.int16, torch.bool, torch.complex64]
)
def test_dtype_outside_the_allow_list_is_rejected_on_encode(dtype):
    with pytest.raises(WireError):
        encode(carry(torch.zeros(2, dtype=dtype)))
    with pytest.raises(WireError):
        encode(HitMessage(core=0, round=0, steps=1, elapsed_s=0, media=torch.zeros(2, dtype=dtype)))


def test_the_base_headers_are_valid():
    assert isinstance(decode([pack(header())]), ReleaseMessage)
    assert isinstance(decode([pack(latent_header(LATENT)), b"\0" * 4]), DecodeMessage)


@pytest.mark.parametrize(
    "dtype", ["int32", "complex64", "float", "torch.float32", "FLOAT32", 4, None]
)
def test_dtype_outside_the_allow_list_is_rejected_on_decode(dtype):
    head = pack(latent_header(["latent", dtype, [1]]))
    with pytest.raises(WireError):
        decode([head, b"\0" * 4])


@pytest.mark.parametrize("value", [b"\0" * 4, [1.0], 1.0, memoryview(b"\0" * 4), None])
def test_non_tensor_values_are_rejected_on_encode(value):
    with pytest.raises(WireError):
        encode(carry(value))
    with pytest.raises(WireError):
        encode(PreparedMessage(solver=SolverSpec({}, {"eps": value}), x0_digest="00"))


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [
        ("float32", [2, 3], 23),
        ("float32", [2, 3], 25),
        ("float32", [2, 3], 48),
        ("float32", [2, 3], 0),
        ("bfloat16", [3], 5),
        ("float64", [], 4),
        ("uint8", [0], 1),
        ("float16", [3, 0, 2], 2),
    ],
)
def test_frame_length_must_match_shape(dtype, shape, nbytes):
    head = pack(latent_header(["latent", dtype, shape]))
    with pytest.raises(WireError):
        decode([head, b"\0" * nbytes])


@pytest.mark.parametrize(
    ("shape", "nbytes"),
    [
        ([-1], 4),
        ([-1, -1], 4),  # the product matches the frame, the shape is still invalid
        ([-2, -2], 16),
        ([True], 4),
        ([1.0], 4),
        ([1.5], 4),
        (["4"], 16),
        ([None], 4),
        ([[1]], 4),
        ([2**63], 0),
        (4, 16),
        ("4", 16),
        (None, 4),
        ({"0": 4}, 16),
    ],
)
def test_shape_must_be_a_list_of_non_negative_ints(shape, nbytes):
    head = pack(latent_header(["latent", "float32", shape]))
    with pytest.raises(WireError):
        decode([head, b"\0" * nbytes])


def test_too_many_dims_is_rejected():
    assert carried(round_trip(carry(torch.zeros([1] * 8)))).dim() == 8
    with pytest.raises(WireError):
        encode(carry(torch.zeros([1] * 9)))
    with pytest.raises(WireError):
        decode([pack(latent_header(["latent", "float32", [1] * 9])), b"\0" * 4])
    narrow = WireLimits(max_ndim=2)
    with pytest.raises(WireError):
        encode(carry(torch.zeros(1, 1, 1)), narrow)
    with pytest.raises(WireError):
        decode(encode(carry(torch.zeros(1, 1, 1))), narrow)


@pytest.mark.parametrize(
    "spec",
    [
        "latent",
        ["latent", "float32"],
        ["latent", "float32", [1], "extra"],
        {"name": "latent", "dtype": "float32", "shape": [1]},
        ["", "float32", [1]],
        ["has space", "float32", [1]],
        ["x" * 129, "float32", [1]],
        ["é", "float32", [1]],
        [5, "float32", [1]],
        [None, "float32", [1]],
        [b"latent", "float32", [1]],
    ],
)
def test_tensor_spec_must_be_name_dtype_shape_with_a_valid_name(spec):
    with pytest.raises(WireError):
        decode([pack(latent_header(spec)), b"\0" * 4])


def test_duplicate_tensor_names_are_rejected():
    with pytest.raises(WireError, match="twice"):
        decode([pack(latent_header(LATENT, LATENT)), b"\0" * 4, b"\0" * 4])


@pytest.mark.parametrize("name", ["bad name", "é", "x" * 122])
def test_bad_tensor_names_are_rejected_on_encode(name):
    # a solver tensor's frame is named solver.<name>: 7 + 122 characters is over the 128 limit
    message = PreparedMessage(solver=SolverSpec({}, {name: torch.zeros(1)}), x0_digest="00")
    with pytest.raises(WireError, match="tensor name"):
        encode(message)


# -- header rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["NOPE", "eval", "", " EVAL", "RELEASE ", 1, None, ["RELEASE"]])
def test_unknown_kind_is_rejected(kind):
    with pytest.raises(WireError, match="unknown message kind"):
        decode([pack(header(kind=kind))])


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 6, 7, 9, -1, True, "8", None, [8], 8.0])
def test_wrong_protocol_version_is_rejected(version):
    with pytest.raises(WireError):
        decode([pack(header(v=version))])


@pytest.mark.parametrize("key", HEADER_KEYS)
def test_header_missing_a_key_is_rejected(key):
    incomplete = header()
    del incomplete[key]
    with pytest.raises(WireError):
        decode([pack(incomplete)])


@pytest.mark.parametrize("extra", [{"extra": 1}, {"V": 1}, {"request": "req-1"}, {b"v": 1}])
def test_header_with_an_extra_key_is_rejected(extra):
    with pytest.raises(WireError):
        decode([pack({**header(), **extra})])


@pytest.mark.parametrize(
    ("kind", "key"), REQUIRED_FIELDS, ids=[f"{k.value}.{f}" for k, f in REQUIRED_FIELDS]
)
def test_body_missing_a_required_field_is_rejected(kind, key):
    body = body_of(FULL_FRAMES[kind])
    del body[key]
    with pytest.raises(WireError):
        decode(with_body(FULL_FRAMES[kind], body))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_body_with_an_unknown_field_is_rejected(kind):
    frames = FULL_FRAMES[kind]
    assert_valid(decode(frames))
    with pytest.raises(WireError, match="unknown body field"):
        decode(with_body(frames, {**body_of(frames), "bogus": 1}))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_field_names_that_are_not_body_keys_are_unknown_body_fields(kind):
    """A type's own field names (entries, latents, spec, status_epoch, x0 ...) and the header's
    are not body keys, unless the kind's body has one of that name."""
    frames = FULL_FRAMES[kind]
    required, optional = SCHEMAS[kind]
    names = {item.name for item in dataclasses.fields(TYPES[kind])} | set(HEADER_KEYS)
    for name in sorted(names - {*required, *optional}):
        with pytest.raises(WireError, match="unknown body field"):
            decode(with_body(frames, {**body_of(frames), name: 1}))


def test_body_with_a_misspelt_field_is_rejected():
    frames = FULL_FRAMES[Kind.EVAL]
    with pytest.raises(WireError):
        decode(with_body(frames, {**body_of(frames), "cores": 2}))
    frames = FULL_FRAMES[Kind.HELLO]
    body = body_of(frames)
    body["max-batch"] = body.pop("max_batch")
    with pytest.raises(WireError):
        decode(with_body(frames, body))


@pytest.mark.parametrize(
    ("kind", "key", "expected"), SCHEMA_FIELDS, ids=[f"{k.value}.{f}" for k, f, _ in SCHEMA_FIELDS]
)
def test_body_field_of_the_wrong_type_is_rejected(kind, key, expected):
    frames = FULL_FRAMES[kind]
    for value in wrong_values(expected):
        with pytest.raises(WireError):
            decode(with_body(frames, {**body_of(frames), key: value}))


@pytest.mark.parametrize(
    ("kind", "key"), OPTIONAL_FIELDS, ids=[f"{k.value}.{f}" for k, f in OPTIONAL_FIELDS]
)
def test_an_optional_field_sent_as_null_is_left_out_or_refused(kind, key):
    frames = FULL_FRAMES[kind]
    expected = SCHEMAS[kind][1][key]
    nullable = isinstance(expected, tuple) and NONE in expected
    if nullable:
        got = decode(with_body(frames, {**body_of(frames), key: None}))
        assert key not in got.body() or key in SENT_BY_DEFAULT.get(kind, ())
    else:
        with pytest.raises(WireError):
            decode(with_body(frames, {**body_of(frames), key: None}))


@pytest.mark.parametrize("value", [True, False])
def test_bool_where_an_int_is_expected_is_rejected(value):
    frames = FULL_FRAMES[Kind.HIT]
    for key in ("core", "round", "steps", "elapsed_s"):
        with pytest.raises(WireError, match="bool"):
            decode(with_body(frames, {**body_of(frames), key: value}))
    frames = FULL_FRAMES[Kind.STATUS]
    with pytest.raises(WireError):
        decode(with_body(frames, {**body_of(frames), "epoch": value}))


def test_an_int_where_a_float_is_expected_is_accepted_and_a_float_for_an_int_is_not():
    frames = FULL_FRAMES[Kind.HIT]
    got = decode(with_body(frames, {**body_of(frames), "elapsed_s": 3}))
    assert isinstance(got, HitMessage) and got.elapsed_s == 3
    with pytest.raises(WireError):
        decode(with_body(frames, {**body_of(frames), "core": 1.0}))


@pytest.mark.parametrize("body", [[], None, "x", [["step", 3], ["core", 2]], 3])
def test_body_must_be_a_map(body):
    with pytest.raises(WireError):
        decode([pack(header(kind="HEARTBEAT", body=body))])


BAD_REQUEST_IDS = [
    "",
    "x" * 129,
    "has space",
    "q?",
    "a#b",
    "é",
    "nul\x00",
    "a\nb",
    "star*",
    5,
    b"req-1",
    ["r"],
    True,
]


@pytest.mark.parametrize("request_id", BAD_REQUEST_IDS)
def test_bad_request_id_is_rejected(request_id):
    assert round_trip(CancelMessage(request="r:1/a_b.c-d")).request == "r:1/a_b.c-d"
    with pytest.raises(WireError, match="request id"):
        encode(CancelMessage(request=request_id))
    with pytest.raises(WireError, match="request id"):
        decode([pack(header(kind="CANCEL", req=request_id))])


@pytest.mark.parametrize("name", ["task", "attempt"])
@pytest.mark.parametrize("value", [-1, 2**63, True, 1.0, "1", [1]])
def test_task_and_attempt_must_be_non_negative_ints(name, value):
    with pytest.raises(WireError):
        encode(ReleaseMessage(**{name: value}))
    with pytest.raises(WireError):
        decode([pack(header(**{name: value}))])


@pytest.mark.parametrize("epoch", [-1, True, 1.0, "0", None, [0]])
def test_epoch_must_be_a_non_negative_int(epoch):
    with pytest.raises(WireError, match="epoch"):
        encode(HeartbeatMessage(epoch=epoch))
    with pytest.raises(WireError, match="epoch"):
        decode([pack(header(kind="HEARTBEAT", epoch=epoch))])


def test_epoch_of_2_to_the_64_is_rejected():
    with pytest.raises(WireError):
        encode(HeartbeatMessage(epoch=2**64))
    with pytest.raises(WireError):
        encode(HeartbeatMessage().stamped(2**64))


@pytest.mark.parametrize("value", [[], 1, "x", None, b"x", [["v", 1]], 1.5])
def test_header_that_is_not_a_map_is_rejected(value):
    with pytest.raises(WireError):
        decode([pack(value)])


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"\x92\x01", b"\x81\xa1v", b"\x80\x80", b"\xdd\xff\xff\xff\xff", b"\xa3ab"],
    ids=[
        "empty",
        "reserved-byte",
        "short-array",
        "short-map",
        "trailing-data",
        "huge-array",
        "short-str",
    ],
)
def test_invalid_msgpack_is_rejected(raw):
    with pytest.raises(WireError):
        decode([raw])


def test_invalid_utf8_in_a_header_string_is_rejected():
    raw = pack(header(kind="RELEASE"))
    with pytest.raises(WireError):
        decode([raw.replace(b"RELEASE", b"REL\xffASE")])


@pytest.mark.parametrize(
    "make",
    [
        lambda ext: ext,
        lambda ext: header(epoch=ext),
        lambda ext: header(kind="PREPARED", body={"solver": {"nested": [ext]}, "x0_digest": "00"}),
        lambda ext: header(kind="HEARTBEAT", body={"in_flight": [ext]}),
    ],
    ids=["whole-header", "epoch", "nested-in-dict", "in-list"],
)
@pytest.mark.parametrize("code", [0, 5, 127])
def test_msgpack_extension_types_are_rejected(make, code):
    with pytest.raises(WireError):
        decode([pack(make(msgpack.ExtType(code, b"data")))])


@pytest.mark.parametrize(
    "obj",
    [
        {**header(), 1: 1},
        {**header(), 1.5: 1},
        {**header(), None: 1},
        header(kind="HEARTBEAT", body={"in_flight": ["a"], 7: 1}),
        header(kind="FAILED", body={b"code": "x", "code": "x", "message": ""}),
        header(kind="PREPARED", body={"solver": {1: "one"}, "x0_digest": "00"}),
    ],
    ids=[
        "int-in-header",
        "float-in-header",
        "nil-in-header",
        "int-in-body",
        "bytes-in-body",
        "int-nested",
    ],
)
def test_non_string_map_keys_are_rejected(obj):
    with pytest.raises(WireError):
        decode([pack(obj)])


def nested(depth: int):
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_bodies_nested_too_deeply_are_rejected():
    # the body is level 0, its "stats" map level 1, then 7 lists: 8 levels of containers
    deep_ok = DoneMessage(stats={"x": nested(7)})
    assert round_trip(deep_ok).body() == deep_ok.body()
    too_deep = DoneMessage(stats={"x": nested(8)})
    with pytest.raises(WireError, match="nested too deeply"):
        encode(too_deep)
    with pytest.raises(WireError, match="nested too deeply"):
        decode([pack(header(kind="DONE", body=too_deep.body()))])
    # far deeper than msgpack's own stack (built by hand: its packer refuses it): a WireError
    placeholder = pack("@" * 8)
    raw = pack(header(kind="DONE", body={"stats": {"x": "@" * 8}}))
    with pytest.raises(WireError):
        decode([raw.replace(placeholder, b"\x91" * 5000 + b"\x01")])


def test_empty_frame_list_is_rejected():
    for frames in ([], ()):
        with pytest.raises(WireError):
            decode(frames)


@pytest.mark.parametrize("frame", ["text", None, 12, 1.5, ["frame"]])
def test_frames_that_are_not_buffers_are_rejected(frame):
    with pytest.raises(WireError):
        decode([frame])
    with pytest.raises(WireError):
        decode([pack(latent_header(["latent", "uint8", [4]])), frame])


# -- what each kind carries beyond plain fields --------------------------------------------------


def eval_frames(tasks, names) -> list:
    specs = [[name, "float32", [1]] for name in names]
    return [
        pack(header(kind="EVAL", body={"tasks": tasks}, tensors=specs)),
        *[b"\0" * 4] * len(names),
    ]


def result_frames(tasks, names) -> list:
    specs = [[name, "float32", [1]] for name in names]
    head = header(kind="RESULT", body={"tasks": tasks}, tensors=specs)
    return [pack(head), *[b"\0" * 4] * len(names)]


def test_well_formed_task_lists_decode_at_their_bounds():
    got = decode(eval_frames([[1, 0, 2, 1, [3, 4, 5, 6]]], ["latent.0"]))
    assert isinstance(got, EvalMessage)
    assert got.entries == (TaskEntry(1, 0, 2, 1, (3, 4, 5, 6)),)
    full = [[i, 0, i, 0, [i + 1]] for i in range(MAX_TASKS)]
    got = decode(eval_frames(full, [f"latent.{i}" for i in range(MAX_TASKS)]))
    assert isinstance(got, EvalMessage) and len(got.entries) == len(got.latents) == MAX_TASKS
    targets = list(range(MAX_TARGETS))
    names = [f"result.0.{k}" for k in range(MAX_TARGETS)]
    got = decode(result_frames([[1, 0, targets]], names))
    assert isinstance(got, ResultMessage)
    assert sorted(got.entries[0].results) == targets


@pytest.mark.parametrize(
    ("tasks", "names"),
    [
        ([], []),
        ("x", ["latent.0"]),
        ([[1, 0, 2, 1]], ["latent.0"]),  # no targets
        ([[1, 0, 2, -1, [3]]], ["latent.0"]),
        ([[1, 0, 2, True, [3]]], ["latent.0"]),
        ([[1, 0, 2, 1.0, [3]]], ["latent.0"]),
        ([[1, 0, 2, 1, [3]]], ["latent.1"]),
        ([[1, 0, 2, 1, [3]]], []),
        ([[1, 0, 2, 1, [2]]], ["latent.0"]),  # a target not above the step
        ([[1, 0, 2, 1, [5, 4]]], ["latent.0"]),  # not ascending
        ([[1, 0, 2, 1, [3, 3]]], ["latent.0"]),
        ([[1, 0, 2, 1, []]], ["latent.0"]),
        ([[1, 0, 2, 1, [3, 4, 5, 6, 7]]], ["latent.0"]),  # over MAX_TARGETS
        ([[1, 0, 2, 1, 3]], ["latent.0"]),
        ([[1, 0, 2, 1, [3]]], ["latent.0", "latent.1"]),
        ([[1, 0, 2, 1, [3]]], ["latent.0", "eps"]),
        ([[1, 0, 2, 1, [3]], "x"], ["latent.0", "latent.1"]),
        ([[1, 0, 2, 1, [3], 9]], ["latent.0"]),
        ([[0, 0, 0, 0, [1]]] * (MAX_TASKS + 1), [f"latent.{i}" for i in range(MAX_TASKS + 1)]),
    ],
)
def test_malformed_eval_task_lists_are_wire_errors(tasks, names):
    with pytest.raises(WireError):
        decode(eval_frames(tasks, names))


@pytest.mark.parametrize(
    ("tasks", "names"),
    [
        ([], []),
        ({"a": 1}, []),
        ([[1, 0]], ["result.0.0"]),  # no targets
        ([[1, 0, [3]]], []),  # its result is missing
        ([[1, 0, [3]]], ["result.0.0", "result.0.1"]),
        ([[1, 0, [3]]], ["result.0.0", "latent.0"]),
        ([[1, 0, [4, 3]]], ["result.0.0", "result.0.1"]),
        ([[1, -1, [3]]], ["result.0.0"]),
        ([[1, False, [3]]], ["result.0.0"]),
        ([[1, 0, [3]]], ["output.0"]),  # protocol 1's naming
        ([[1, 0, [3]]], ["result.1.0"]),
        ([[1, 0, [1, 2, 3, 4, 5]]], [f"result.0.{k}" for k in range(5)]),
        ([[1, 0, [3]]] * (MAX_TASKS + 1), [f"result.{i}.0" for i in range(MAX_TASKS + 1)]),
    ],
)
def test_malformed_result_task_lists_are_wire_errors(tasks, names):
    with pytest.raises(WireError):
        decode(result_frames(tasks, names))


FAILED_BODY = {"code": "worker_error", "message": ""}


@pytest.mark.parametrize(
    "tasks", [[[1]], [[1, 0, 3]], ["x"], [[1, True]], [[1, -1]], "x", [[0, 0]] * (MAX_TASKS + 1)]
)
def test_malformed_failed_task_lists_are_wire_errors(tasks):
    with pytest.raises(WireError):
        decode([pack(header(kind="FAILED", body={**FAILED_BODY, "tasks": tasks}))])
    ok = decode([pack(header(kind="FAILED", body={**FAILED_BODY, "tasks": [[3, 1]]}))])
    assert isinstance(ok, FailedMessage) and ok.tasks == ((3, 1),)
    empty = decode([pack(header(kind="FAILED", body={**FAILED_BODY, "tasks": []}))])
    assert isinstance(empty, FailedMessage) and empty.tasks == ()


def test_eval_entries_pair_each_typed_task_with_its_latent():
    latents = tuple(torch.full((2,), float(i)) for i in range(3))
    entries = tuple(TaskEntry(i, 0, i + 1, 1, (i + 2, i + 5)) for i in range(3))
    message = EvalMessage(entries=entries, latents=latents, epoch=9, request="req-1", task=0)
    frames = encode(message)
    head = unpack(frames[0])
    assert head["body"] == {"tasks": [[i, 0, i + 1, 1, [i + 2, i + 5]] for i in range(3)]}
    assert [name for name, _, _ in head["tensors"]] == ["latent.0", "latent.1", "latent.2"]
    got = decode(frames)
    assert isinstance(got, EvalMessage)
    assert (got.request, got.task, got.attempt, got.epoch) == ("req-1", 0, None, 9)
    assert got.entries == entries
    assert got.entries[1].targets == (3, 6) and got.entries[1].step == 2
    assert [float(t[0]) for t in got.latents] == [0.0, 1.0, 2.0]


def test_result_entries_name_each_result_by_its_target():
    results = {9: torch.ones(3), 4: torch.zeros(3)}  # out of order: frames follow the targets
    message = ResultMessage(entries=(ResultEntry(5, 2, results),), compute_s=0.25)
    assert message.body() == {"compute_s": 0.25, "tasks": [[5, 2, [4, 9]]]}
    got = round_trip(message)
    assert isinstance(got, ResultMessage)
    assert list(got.tensors) == ["result.0.0", "result.0.1"]
    assert torch.equal(got.tensors["result.0.1"], torch.ones(3))
    (entry,) = got.entries
    assert (entry.task, entry.attempt, sorted(entry.results)) == (5, 2, [4, 9])
    assert torch.equal(entry.results[9], torch.ones(3))
    assert torch.equal(entry.results[4], torch.zeros(3))
    assert got.compute_s == 0.25


def test_solver_frames_keep_their_names():
    sigmas = torch.linspace(1, 0, 5)
    message = PreparedMessage(
        solver=SolverSpec({"kind": "x"}, {"sigmas": sigmas}), x0_digest="00", x0=torch.zeros(2)
    )
    assert list(message.tensors) == ["solver.sigmas", "x0"]
    got = round_trip(message)
    assert isinstance(got, PreparedMessage)
    assert list(got.solver.tensors) == ["sigmas"]
    assert torch.equal(got.solver.tensors["sigmas"], sigmas)
    assert got.x0 is not None and torch.equal(got.x0, torch.zeros(2))
    no_x0 = round_trip(PreparedMessage(solver=SolverSpec({}, {"s": sigmas}), x0_digest="00"))
    assert isinstance(no_x0, PreparedMessage) and no_x0.x0 is None


def test_a_prepared_without_its_x0_digest_is_rejected():
    with pytest.raises(WireError, match="x0_digest"):
        decode([pack(header(kind="PREPARED", body={"solver": {"kind": "x"}}))])


@pytest.mark.parametrize("solver", [None, [], "x", 1, [["kind", "x"]]])
def test_a_prepared_solver_must_be_a_map(solver):
    with pytest.raises(WireError):
        decode([pack(header(kind="PREPARED", body={"solver": solver, "x0_digest": "00"}))])


EXTRA_TENSORS = [
    (kind, name)
    for kind in KINDS
    for name in ("eps", "latent", "latent.9", "result.0.5", "solver.x", "x0", "media")
    if name not in {spec[0] for spec in unpack(FULL_FRAMES[kind][0])["tensors"]}
]


@pytest.mark.parametrize(
    ("kind", "name"), EXTRA_TENSORS, ids=[f"{k.value}+{n}" for k, n in EXTRA_TENSORS]
)
def test_a_kind_refuses_a_tensor_it_does_not_carry(kind, name):
    """An extra tensor is refused, but for one more solver tensor in a PREPARED."""
    frames = FULL_FRAMES[kind]
    specs = unpack(frames[0])["tensors"]
    extra = [*with_header(frames, tensors=[*specs, [name, "float32", [1]]]), b"\0" * 4]
    if kind is Kind.PREPARED and name == "solver.x":
        got = decode(extra)
        assert isinstance(got, PreparedMessage) and list(got.solver.tensors)[-1] == "x"
    else:
        with pytest.raises(WireError):
            decode(extra)


def test_a_decode_needs_its_latent():
    with pytest.raises(WireError):
        decode([pack(header(kind="DECODE"))])


def test_busy_errors_carry_a_retry_hint_and_heartbeats_name_missing_ids():
    error = round_trip(ErrorMessage(code="busy", message="m", retry_after_s=1.5))
    assert isinstance(error, ErrorMessage) and error.retry_after_s == 1.5
    assert error.body() == {"code": "busy", "message": "m", "retry_after_s": 1.5}
    beat = round_trip(HeartbeatMessage(in_flight=["a"], missing=["a"]))
    assert isinstance(beat, HeartbeatMessage) and beat.missing == ["a"]


def test_status_carries_the_brokers_epoch_as_its_body_epoch():
    status = StatusMessage(status_epoch=2**64 - 1, epoch=3)
    frames = encode(status)
    head = unpack(frames[0])
    assert (head["epoch"], head["body"]) == (3, {"epoch": 2**64 - 1})
    got = decode(frames)
    assert isinstance(got, StatusMessage) and (got.epoch, got.status_epoch) == (3, 2**64 - 1)
    for bad in (-1, True, "1", 1.5):
        with pytest.raises(WireError):
            decode(with_body(frames, {"epoch": bad}))


def test_prepare_and_submit_carry_their_spec_as_the_body_request():
    for message in (FULL[Kind.PREPARE], FULL[Kind.SUBMIT]):
        body = body_of(encode(message))
        assert body["request"] == message.spec
        assert "spec" not in body


# -- encode raises only WireError ----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            EvalMessage(entries=(TaskEntry(2**64, 0, 0, 0, (1,)),), latents=(torch.zeros(1),)),
            id="int-too-big-for-msgpack",
        ),
        pytest.param(
            PreparedMessage(solver=SolverSpec({"x": object()}, {}), x0_digest="00"),
            id="object-in-body",
        ),
        pytest.param(SubmitMessage(spec={1: "x"}), id="int-key-in-body"),
        pytest.param(SubmitMessage(spec={"x": b"bytes"}), id="bytes-in-body"),
        pytest.param(DoneMessage(stats={"t": torch.zeros(1)}), id="tensor-in-body"),
        pytest.param(
            PreparedMessage(solver=SolverSpec({}, {"bad name": torch.zeros(1)}), x0_digest="00"),
            id="bad-tensor-name",
        ),
        pytest.param(carry(torch.zeros(3).to_sparse()), id="sparse-tensor"),
        pytest.param(carry(torch.zeros(2, dtype=torch.int64)), id="int-tensor"),
        pytest.param(CancelMessage(request="has space"), id="bad-request-id"),
        pytest.param(ErrorMessage(code="x", message="m" * 70_000), id="header-too-big"),
    ],
)
def test_encode_raises_only_wire_errors(message):
    with pytest.raises(WireError):
        encode(message)


def test_non_contiguous_memoryview_frame_is_accepted():
    values = torch.arange(4, dtype=torch.float32)
    data = values.numpy().tobytes()
    raw = bytearray(2 * len(data))
    raw[::2] = data  # the payload sits at every other byte
    strided = memoryview(raw)[::2]
    assert not strided.c_contiguous
    got = decode([pack(latent_header(["latent", "float32", [4]])), strided])
    assert torch.equal(carried(got), values)


def test_tensor_digest_tells_bits_dtype_and_shape_apart():
    x = torch.linspace(-1, 1, 12)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x.reshape(3, 4)) != tensor_digest(x)
    assert tensor_digest(x.double()) != tensor_digest(x)
    nudged = x.clone()
    nudged[5] = torch.nextafter(nudged[5], torch.tensor(2.0))
    assert tensor_digest(nudged) != tensor_digest(x)
    assert tensor_digest(x.to(torch.bfloat16)) == tensor_digest(x.to(torch.bfloat16).clone())


# -- fuzzing -------------------------------------------------------------------------------------

MSGPACK_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
MSGPACK_VALUES = st.recursive(
    MSGPACK_LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), children, max_size=4)
    ),
    max_leaves=8,
)
# Lists shaped like task entries, often well formed: they reach the EVAL/RESULT/FAILED parsing.
SMALL_INTS = st.integers(-1, 6) | st.sampled_from([True, 2**63, 0.5])
TASK_LISTS = st.lists(
    st.lists(SMALL_INTS | st.lists(SMALL_INTS, max_size=5), min_size=2, max_size=6),
    max_size=3,
)
# Every value some sample body holds, by key: the right type for that key, or for another.
SAMPLE_VALUES = sorted(
    {
        repr(value): value
        for kind in KINDS
        for sample in (FULL[kind], MINIMAL[kind])
        for value in sample.body().values()
    }.values(),
    key=repr,
)
BODY_VALUES = (
    st.sampled_from(SAMPLE_VALUES)
    | st.sampled_from([3, "x", 0.5, [1], {"a": 1}, True, None])
    | TASK_LISTS
    | MSGPACK_VALUES
)
# Every body key of every kind, the types' own field names, and the header's keys.
BODY_KEYS = sorted(
    {key for required, optional in SCHEMAS.values() for key in (*required, *optional)}
    | {item.name for cls in TYPES.values() for item in dataclasses.fields(cls)}
    | set(HEADER_KEYS)
)
TENSOR_POOL = [
    "latent",
    "latent.0",
    "latent.1",
    "result.0.0",
    "result.0.1",
    "result.1.0",
    "solver.sigmas",
    "x0",
    "media",
    "eps",
]
# Non-empty tensors only, so no mutated header meets an empty frame.
VALID_MESSAGES = [
    FULL[Kind.EVAL],
    FULL[Kind.HIT],
    FULL[Kind.RESULT],
    FULL[Kind.PREPARED],
    FULL[Kind.DECODED],
    FULL[Kind.DECODE],
]
VALID_FRAMES = [[bytes(frame) for frame in encode(message)] for message in VALID_MESSAGES]


@FUZZ
@given(raw=st.binary(max_size=512))
def test_arbitrary_bytes_as_header_give_a_message_or_wire_error(raw):
    decode_or_wire_error([raw])


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_arbitrary_frame_lists_give_a_message_or_wire_error(frames):
    decode_or_wire_error(frames)


def mutate(frames: list[bytes], data) -> tuple[list[bytes], bool]:
    """``frames`` with one kind of damage, and whether the result may still be a valid message
    (only flipped header bytes can give one; a cut header or a wrong frame count cannot)."""
    frames = list(frames)
    head = bytearray(frames[0])
    mutation = data.draw(st.sampled_from(["flip", "truncate", "drop", "duplicate", "resize"]))
    frame_index = 1 + data.draw(st.integers(0, len(frames) - 2))
    if mutation == "flip":
        for position, mask in data.draw(
            st.lists(
                st.tuples(st.integers(0, len(head) - 1), st.integers(1, 255)),
                min_size=1,
                max_size=6,
            )
        ):
            head[position] ^= mask
        frames[0] = bytes(head)
    elif mutation == "truncate":
        frames[0] = bytes(head[: data.draw(st.integers(0, len(head) - 1))])
    elif mutation == "drop":
        del frames[frame_index]
    elif mutation == "duplicate":
        frames.insert(frame_index, frames[frame_index])
    else:
        delta = data.draw(st.integers(-8, 8).filter(bool))
        payload = frames[frame_index]
        frames[frame_index] = payload[:delta] if delta < 0 else payload + b"\0" * delta
    return frames, mutation == "flip"


@FUZZ
@given(base=st.sampled_from(VALID_FRAMES), data=st.data())
def test_mutated_messages_give_a_message_or_wire_error(base, data):
    frames, may_be_valid = mutate(base, data)
    if may_be_valid:
        decode_or_wire_error(frames)
    else:
        with pytest.raises(WireError):
            decode(frames)


@settings(max_examples=100, deadline=None)
@given(index=st.sampled_from(range(len(VALID_MESSAGES))), data=st.data())
def test_flipped_tensor_bytes_still_decode_with_the_same_header(index, data):
    frames = list(VALID_FRAMES[index])
    frame_index = 1 + data.draw(st.integers(0, len(frames) - 2))
    payload = bytearray(frames[frame_index])
    payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    frames[frame_index] = bytes(payload)
    got, want = decode(frames), VALID_MESSAGES[index]
    assert type(got) is type(want)
    assert ids_of(got) == ids_of(want)
    assert got.body() == want.body()
    assert [t.shape for t in got.tensors.values()] == [t.shape for t in want.tensors.values()]


@FUZZ
@given(
    obj=st.dictionaries(
        st.sampled_from(HEADER_KEYS) | st.text(max_size=8), MSGPACK_VALUES, max_size=9
    ),
    frames=st.lists(st.binary(min_size=1, max_size=16), max_size=2),
)
def test_arbitrary_msgpack_maps_as_header_give_a_message_or_wire_error(obj, frames):
    decode_or_wire_error([pack(obj), *frames])


@st.composite
def tensor_specs(draw) -> tuple[list, list[bytes]]:
    """Specs named from TENSOR_POOL and frames of (mostly) the right length; never empty."""
    names = draw(st.lists(st.sampled_from(TENSOR_POOL), max_size=3, unique=True))
    specs, frames = [], []
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(1, 4), max_size=3))
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize + draw(st.sampled_from([0, 0, 0, -1, 1]))
        specs.append([name, dtype, shape])
        frames.append(draw(st.binary(min_size=max(nbytes, 1), max_size=max(nbytes, 1))))
    return specs, frames


@st.composite
def near_valid_frames(draw) -> list[bytes]:
    """A valid message of a random kind, then a few edits: body fields dropped, retyped or
    added, the kind swapped, header fields replaced, tensor specs and frames replaced."""
    kind = draw(st.sampled_from(KINDS))
    sample = draw(st.sampled_from([FULL[kind], MINIMAL[kind]]))
    frames = [bytes(frame) for frame in encode(sample)]
    obj = unpack(frames[0])
    body = obj["body"]
    for key in draw(st.lists(st.sampled_from([*body, *BODY_KEYS, "bogus"]), max_size=2)):
        if key in body and draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(BODY_VALUES)
    if draw(st.booleans()):
        obj["tensors"], frames[1:] = draw(tensor_specs())
    obj["kind"] = draw(
        st.just(kind.value) | st.sampled_from([k.value for k in KINDS]) | st.text(max_size=6)
    )
    if draw(st.integers(0, 3)) == 0:  # header damage: most examples should reach the body
        changes = st.dictionaries(st.sampled_from(HEADER_KEYS[:-1]), MSGPACK_VALUES, max_size=2)
        obj.update(draw(changes))
    return [pack(obj), *frames[1:]]


@FUZZ
@given(frames=near_valid_frames())
def test_near_valid_messages_give_a_message_or_wire_error(frames):
    decode_or_wire_error(frames)


TYPED_VALUES = {
    str: st.text(max_size=12),
    int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
    float: st.floats(),
    bool: st.booleans(),
    NONE: st.none(),
    list: st.lists(MSGPACK_VALUES, max_size=4) | TASK_LISTS,
    dict: st.dictionaries(st.text(max_size=8), MSGPACK_VALUES, max_size=4),
}


def typed_values(expected) -> st.SearchStrategy:
    """Random values of the types SCHEMAS names (a body key's right type, often)."""
    types = expected if isinstance(expected, tuple) else (expected,)
    return st.one_of(*(TYPED_VALUES[t] for t in types))


@st.composite
def typed_bodies(draw, kind: Kind) -> dict:
    """A random body for ``kind``: its required keys and some optional ones, with values of the
    right type most of the time; now and then a key is dropped or a stray one added."""
    required, optional = SCHEMAS[kind]
    body = {}
    for key, expected in {**required, **optional}.items():
        if key in required or draw(st.booleans()):
            right = draw(st.integers(0, 9)) > 0
            body[key] = draw(typed_values(expected) if right else BODY_VALUES)
    if body and draw(st.integers(0, 9)) == 0:
        del body[draw(st.sampled_from(sorted(body)))]
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(BODY_KEYS) | st.text(max_size=6))] = draw(BODY_VALUES)
    return body


@st.composite
def random_bodies_for_random_kinds(draw) -> list:
    """A kind, a random body (typed for the kind, or anything at all), and tensors: the
    sample's of that kind (so the body's entries can match them) or random ones."""
    kind = draw(st.sampled_from(KINDS))
    anything = st.dictionaries(
        st.sampled_from(BODY_KEYS) | st.text(max_size=6), BODY_VALUES, max_size=6
    )
    body = draw(typed_bodies(kind) | anything)
    if draw(st.booleans()):
        specs, frames = unpack(FULL_FRAMES[kind][0])["tensors"], FULL_FRAMES[kind][1:]
    else:
        specs, frames = draw(tensor_specs())
    return [pack(header(kind=kind.value, body=body, tensors=specs)), *frames]


@FUZZ
@given(frames=random_bodies_for_random_kinds())
def test_random_bodies_for_random_kinds_give_a_message_or_wire_error(frames):
    decode_or_wire_error(frames)


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.data())
def test_each_kinds_body_with_one_field_replaced_gives_a_message_or_wire_error(kind, data):
    frames = FULL_FRAMES[kind]
    body = body_of(frames)
    keys = st.sampled_from(BODY_KEYS)
    key = data.draw(st.sampled_from(sorted(body)) | keys if body else keys)
    required, optional = SCHEMAS[kind]
    expected = {**required, **optional}.get(key)
    typed = typed_values(expected) if expected is not None else BODY_VALUES
    body[key] = data.draw(typed | BODY_VALUES)
    decode_or_wire_error(with_body(frames, body))


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(
            [pack(latent_header(["latent", "float32", [0, 2**62, 2**62]])), b""],
            id="empty-frame-with-overflowing-shape",
        ),
        pytest.param([pack(header(req="req-1\n"))], id="request-id-with-trailing-newline"),
        pytest.param(
            [pack(latent_header(["latent\n", "float32", [1]])), b"\x00" * 4],
            id="tensor-name-with-trailing-newline",
        ),
        pytest.param(
            [
                pack(
                    header(
                        kind="PREPARED",
                        body={"solver": {"t": msgpack.Timestamp(1, 0)}, "x0_digest": "00"},
                    )
                )
            ],
            id="msgpack-timestamp-in-body",
        ),
        pytest.param(
            [pack(header(kind="PREPARED", body={"solver": {b"k": 1}, "x0_digest": "00"}))],
            id="bytes-key-nested-in-body",
        ),
        pytest.param([pack(header(v=float(PROTOCOL_VERSION)))], id="float-protocol-version"),
        pytest.param(
            [
                *with_body(
                    FULL_FRAMES[Kind.EVAL],
                    {"tasks": [[7, 1, 3, 2, [4, 6]], [8, 0, 5, 3, [9]]], "entries": 1},
                )
            ],
            id="type-field-name-as-body-key",
        ),
    ],
)
def test_regressions_found_by_fuzzing_are_wire_errors(frames):
    with pytest.raises(WireError):
        decode(frames)


@pytest.mark.parametrize("kind", [Kind.WELCOME, Kind.POOL])
@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([POOL_KEY[:39]], id="short-key"),
        pytest.param([POOL_KEY + "x"], id="long-key"),
        pytest.param([3], id="not-a-string"),
        pytest.param(["é" * 40], id="not-ascii"),
        pytest.param([POOL_KEY] * (MAX_POOL_KEYS + 1), id="too-many"),
    ],
)
def test_pool_keys_must_be_at_most_max_pool_keys_z85_keys(kind, keys):
    frames = encode(FULL[kind])
    with pytest.raises(WireError, match="pool_keys"):
        decode(with_body(frames, {**body_of(frames), "pool_keys": keys}))


def test_a_pool_message_needs_its_keys_and_takes_the_most_a_header_holds():
    frames = encode(FULL[Kind.POOL])
    with pytest.raises(WireError, match="pool_keys"):
        decode(with_body(frames, {}))
    full = PoolMessage(pool_keys=tuple(f"{i:040d}" for i in range(MAX_POOL_KEYS)))
    assert decode(encode(full)).pool_keys == full.pool_keys
