"""The wire format (chords_mq.wire): bitwise tensor round trips, zero-copy send and receive,
every limit and schema rule raising WireError, and fuzzing that lets no other exception out."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chords_mq.errors import ChordsError
from chords_mq.wire import (
    DTYPE_NAMES,
    DTYPES,
    PROTOCOL_VERSION,
    SCHEMAS,
    Message,
    ResultEntry,
    TaskEntry,
    WireError,
    WireLimits,
    decode,
    encode,
    eval_entries,
    eval_message,
    failed_for,
    failed_tasks,
    result_entries,
    result_message,
    solver_frames,
    solver_tensors,
    tensor_digest,
    validate_fields,
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
EVAL_BODY = {"tasks": [[7, 1, 3, 2, [4, 6]]]}  # [task, attempt, step, core, [targets]]
HIT_BODY = {"core": 1, "round": 4, "steps": 10, "elapsed_s": 0.5}
RESULT_BODY = {"tasks": [[1, 0, [4, 6]]]}  # [task, attempt, [targets]]


def random_tensor(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    bits = BITS[want.dtype]
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def fields(message: Message) -> tuple:
    """Everything in a message but its tensors."""
    return (
        message.kind,
        message.body,
        message.epoch,
        message.request,
        message.task,
        message.attempt,
    )


def round_trip(message: Message, limits: WireLimits | None = None) -> Message:
    limits = limits or WireLimits()
    return decode([bytes(frame) for frame in encode(message, limits)], limits)


def header(**changes) -> dict:
    """A valid EVAL header (no tensors) as ``encode`` writes it, with ``changes`` applied."""
    base = {
        "v": PROTOCOL_VERSION,
        "kind": "EVAL",
        "epoch": 0,
        "req": None,
        "task": None,
        "attempt": None,
        "tensors": [],
        "body": dict(EVAL_BODY),
    }
    return {**base, **changes}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header_of(message: Message) -> dict:
    return header(
        kind=message.kind,
        epoch=message.epoch,
        req=message.request,
        task=message.task,
        attempt=message.attempt,
        body=message.body,
    )


def assert_rejected_both_ways(message: Message) -> None:
    """``encode`` refuses ``message``, and ``decode`` refuses the same header packed by hand."""
    with pytest.raises(WireError):
        encode(message)
    with pytest.raises(WireError):
        decode([pack(header_of(message))])


def assert_valid(message: Message) -> None:
    """What ``decode`` returns is a message that passes every rule and re-encodes."""
    assert isinstance(message, Message)
    validate_fields(message)
    for tensor in message.tensors.values():
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype in DTYPE_NAMES
    again = decode([bytes(frame) for frame in encode(message)])
    assert again.kind == message.kind
    assert fields(again)[2:] == fields(message)[2:]  # not the body: NaN != NaN
    assert list(again.tensors) == list(message.tensors)


def decode_or_wire_error(frames) -> None:
    try:
        message = decode(frames)
    except WireError:
        return
    assert_valid(message)


def sample_value(expected):
    first = expected[0] if isinstance(expected, tuple) else expected
    return {str: "x", int: 3, float: 0.5, dict: {"a": 1}, list: [1, 2], bool: True}[first]


def full_body(kind: str, optional: bool = False) -> dict:
    required, extra = SCHEMAS[kind]
    fields = {**required, **extra} if optional else required
    return {key: sample_value(expected) for key, expected in fields.items()}


SCHEMA_FIELDS = [
    (kind, key, expected)
    for kind, (required, optional) in sorted(SCHEMAS.items())
    for key, expected in {**required, **optional}.items()
]
REQUIRED_FIELDS = [
    (kind, key) for kind, (required, _) in sorted(SCHEMAS.items()) for key in required
]
CANDIDATES = ["x", 3, 0.5, True, False, None, [1], {"a": 1}, b"x"]


def wrong_values(expected) -> list:
    types = expected if isinstance(expected, tuple) else (expected,)
    return [
        value
        for value in CANDIDATES
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    ]


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_allowed_dtype_round_trips_bitwise(name):
    tensor = random_tensor((3, 4, 5), DTYPES[name])
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    assert_bitwise_equal(got.tensors["eps"], tensor)


def test_bfloat16_round_trip_is_bitwise():
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    tensor = every_pattern.view(torch.bfloat16).reshape(256, 256)
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    assert_bitwise_equal(got.tensors["eps"], tensor)


def test_float16_round_trip_is_bitwise_for_every_bit_pattern():
    every_pattern = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    tensor = every_pattern.view(torch.float16)
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    assert_bitwise_equal(got.tensors["eps"], tensor)


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
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": tensor})).tensors["eps"]
    assert got.is_contiguous()
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_zero_dim_tensor_round_trips(name):
    tensor = random_tensor((), DTYPES[name])
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"scalar": tensor})).tensors["scalar"]
    assert got.dim() == 0
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_empty_tensor_round_trips_with_its_shape(name, shape):
    tensor = torch.empty(shape, dtype=DTYPES[name])
    frames = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    assert memoryview(frames[1]).nbytes == 0
    got = decode(frames).tensors["eps"]
    assert_bitwise_equal(got, tensor)


def test_several_tensors_keep_their_names_order_and_values():
    tensors = {
        "zeta": random_tensor((2, 3), torch.float32, seed=1),
        "alpha": random_tensor((4,), torch.bfloat16, seed=2),
        "mid": random_tensor((2, 2, 3), torch.uint8, seed=3),
        "beta": random_tensor((), torch.float64, seed=4),
        "empty": torch.empty(0, dtype=torch.float16),
    }
    got = round_trip(Message("RESULT", dict(RESULT_BODY), tensors)).tensors
    assert list(got) == ["zeta", "alpha", "mid", "beta", "empty"]
    for name, tensor in tensors.items():
        assert_bitwise_equal(got[name], tensor)


def test_eval_header_fields_are_preserved():
    latent = random_tensor((1, 4, 8, 8), torch.bfloat16)
    message = Message(
        "EVAL", dict(EVAL_BODY), {"latent": latent}, epoch=5, request="req-1", task=7, attempt=1
    )
    got = round_trip(message)
    assert fields(got) == ("EVAL", EVAL_BODY, 5, "req-1", 7, 1)
    assert_bitwise_equal(got.tensors["latent"], latent)


def test_hit_header_fields_are_preserved():
    x0 = random_tensor((2, 3), torch.float32)
    message = Message(
        "HIT",
        dict(HIT_BODY),
        {"x0": x0},
        epoch=2**64 - 1,
        request="a" * 128,
        task=2**63 - 1,
        attempt=0,
    )
    got = round_trip(message)
    assert fields(got) == ("HIT", HIT_BODY, 2**64 - 1, "a" * 128, 2**63 - 1, 0)
    assert_bitwise_equal(got.tensors["x0"], x0)


def test_absent_ids_stay_none():
    got = round_trip(Message("HEARTBEAT"))
    assert fields(got) == ("HEARTBEAT", {}, 0, None, None, None)
    assert got.tensors == {}


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@pytest.mark.parametrize("optional", [False, True], ids=["required", "all-fields"])
def test_every_kind_round_trips_a_body_valid_for_its_schema(kind, optional):
    body = full_body(kind, optional)
    got = round_trip(Message(kind, body, request="r:1/a_b.c-d", task=0, attempt=2))
    assert fields(got) == (kind, body, 0, "r:1/a_b.c-d", 0, 2)


def test_numeric_and_nullable_fields_accept_each_allowed_type():
    accepted = {"steps": 10, "method": "chords", "hit_rounds": [1, 2]}
    for kind, body in (
        ("HIT", {**HIT_BODY, "elapsed_s": 0}),
        ("HIT", {**HIT_BODY, "elapsed_s": 2.5}),
        ("ACCEPTED", {**accepted, "init_sequence": None}),
        ("ACCEPTED", {**accepted, "init_sequence": [0, 4]}),
    ):
        assert round_trip(Message(kind, body)).body == body


def test_tensors_that_require_grad_are_sent_detached():
    tensor = torch.randn(4, requires_grad=True)
    got = round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": tensor})).tensors["eps"]
    assert not got.requires_grad
    assert_bitwise_equal(got, tensor.detach())


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda b: zmq.Frame(bytes(b))],
    ids=["bytes", "bytearray", "memoryview", "zmq.Frame"],
)
def test_decode_accepts_every_buffer_type(wrap):
    tensor = random_tensor((5, 7), torch.float32)
    frames = encode(Message("EVAL", dict(EVAL_BODY), {"latent": tensor}, epoch=1))
    got = decode([wrap(bytes(frame)) for frame in frames])
    assert (got.kind, got.epoch) == ("EVAL", 1)
    assert_bitwise_equal(got.tensors["latent"], tensor)


def test_wire_error_is_a_value_error_and_a_chords_error():
    with pytest.raises(ValueError):
        decode([])
    assert issubclass(WireError, ChordsError)


# -- zero copy -----------------------------------------------------------------------------------


def test_encode_sends_contiguous_tensor_memory_without_copying():
    tensor = random_tensor((64, 64), torch.bfloat16)
    frames = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    assert torch.frombuffer(frames[1], dtype=torch.uint8).data_ptr() == tensor.data_ptr()


def test_decode_of_aligned_writable_frame_shares_its_memory():
    tensor = random_tensor((16, 16), torch.float32)
    head, payload = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    backing = torch.frombuffer(bytearray(payload), dtype=torch.uint8).clone()
    assert backing.data_ptr() % 16 == 0
    got = decode([head, memoryview(backing.numpy())]).tensors["eps"]
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
    head, payload = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    backing, frame = offset_frame(payload, 8)
    got = decode([head, frame]).tensors["eps"]
    assert got.data_ptr() == backing.data_ptr() + 8
    assert_bitwise_equal(got, tensor)


@pytest.mark.parametrize("name", ["float64", "float32", "bfloat16"])
def test_decode_copies_frames_not_aligned_to_the_element_size(name):
    tensor = random_tensor((16,), DTYPES[name])
    head, payload = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    backing, frame = offset_frame(payload, 1)
    got = decode([head, frame]).tensors["eps"]
    assert got.data_ptr() % got.element_size() == 0
    assert got.data_ptr() != backing.data_ptr() + 1
    assert_bitwise_equal(got, tensor)


def test_decode_of_read_only_frame_returns_a_writable_copy():
    tensor = random_tensor((8,), torch.float32)
    head, payload = encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))
    raw = bytes(payload)
    got = decode([head, raw]).tensors["eps"]
    got.add_(1.0)
    assert raw == bytes(encode(Message("RESULT", dict(RESULT_BODY), {"eps": tensor}))[1])


@pytest.mark.parametrize("transport", ["inproc-pair", "tcp-dealer-router"])
def test_zeromq_zero_copy_round_trip_is_bitwise(transport):
    tensor = random_tensor((512, 1024), torch.bfloat16)  # 1 MiB
    assert tensor.numel() * tensor.element_size() == 1 << 20
    message = Message("EVAL", dict(EVAL_BODY), {"latent": tensor}, epoch=9, request="req-9", task=3)
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
        received = torch.frombuffer(frames[-1].buffer, dtype=torch.uint8).data_ptr()
        assert got.tensors["latent"].data_ptr() == received  # zero-copy receive
    finally:
        sender.close()
        receiver.close()
        ctx.term()
    assert fields(got) == fields(message)
    assert_bitwise_equal(got.tensors["latent"], tensor)


# -- limits --------------------------------------------------------------------------------------


def test_header_over_max_header_bytes_is_rejected():
    message = Message("ERROR", {"code": "boom", "message": "m" * 100})
    size = len(encode(message)[0])
    limits = WireLimits(max_header_bytes=size)
    assert round_trip(message, limits).body == message.body
    small = WireLimits(max_header_bytes=size - 1)
    with pytest.raises(WireError):
        encode(message, small)
    with pytest.raises(WireError):
        decode(encode(message), small)


def test_more_tensors_than_max_tensors_is_rejected_on_encode():
    limits = WireLimits(max_tensors=2)
    two = {f"t{i}": torch.zeros(1) for i in range(2)}
    assert list(round_trip(Message("RESULT", dict(RESULT_BODY), two), limits).tensors) == [
        "t0",
        "t1",
    ]
    with pytest.raises(WireError):
        encode(Message("RESULT", dict(RESULT_BODY), {**two, "t2": torch.zeros(1)}), limits)


def test_more_tensor_frames_than_max_tensors_is_rejected_on_decode():
    frames = encode(
        Message("RESULT", dict(RESULT_BODY), {f"t{i}": torch.zeros(1) for i in range(3)})
    )
    with pytest.raises(WireError):
        decode(frames, WireLimits(max_tensors=2))
    with pytest.raises(WireError):
        decode([pack(header()), *[b"\0" * 4] * 17])  # default limit 16, before the header


@pytest.mark.parametrize("extra_frames", [0, 2])
def test_tensor_frame_count_must_match_header(extra_frames):
    head, payload = encode(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(2)}))
    frames = [head, *[payload] * extra_frames]
    with pytest.raises(WireError):
        decode(frames)


def test_frame_over_max_frame_bytes_is_rejected():
    limits = WireLimits(max_frame_bytes=16)
    assert round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(4)}), limits).tensors
    big = Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(5)})
    with pytest.raises(WireError):
        encode(big, limits)
    with pytest.raises(WireError):
        decode(encode(big), limits)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.int8, torch.int16, torch.bool, torch.complex64]
)
def test_dtype_outside_the_allow_list_is_rejected_on_encode(dtype):
    with pytest.raises(WireError):
        encode(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(2, dtype=dtype)}))


@pytest.mark.parametrize(
    "dtype", ["int32", "complex64", "float", "torch.float32", "FLOAT32", 4, None]
)
def test_dtype_outside_the_allow_list_is_rejected_on_decode(dtype):
    head = pack(header(tensors=[["eps", dtype, [1]]]))
    with pytest.raises(WireError):
        decode([head, b"\0" * 4])


def test_non_tensor_values_are_rejected_on_encode():
    for value in (b"\0" * 4, [1.0], 1.0, memoryview(b"\0" * 4)):
        with pytest.raises(WireError):
            encode(Message("RESULT", dict(RESULT_BODY), {"eps": value}))


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
    head = pack(header(tensors=[["eps", dtype, shape]]))
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
    head = pack(header(tensors=[["eps", "float32", shape]]))
    with pytest.raises(WireError):
        decode([head, b"\0" * nbytes])


def test_too_many_dims_is_rejected():
    assert round_trip(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros([1] * 8)})).tensors
    with pytest.raises(WireError):
        encode(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros([1] * 9)}))
    with pytest.raises(WireError):
        decode([pack(header(tensors=[["eps", "float32", [1] * 9]])), b"\0" * 4])
    narrow = WireLimits(max_ndim=2)
    with pytest.raises(WireError):
        encode(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(1, 1, 1)}), narrow)
    with pytest.raises(WireError):
        decode(encode(Message("RESULT", dict(RESULT_BODY), {"eps": torch.zeros(1, 1, 1)})), narrow)


@pytest.mark.parametrize(
    "spec",
    [
        "eps",
        ["eps", "float32"],
        ["eps", "float32", [1], "extra"],
        {"name": "eps", "dtype": "float32", "shape": [1]},
        ["", "float32", [1]],
        ["has space", "float32", [1]],
        ["x" * 129, "float32", [1]],
        ["é", "float32", [1]],
        [5, "float32", [1]],
        [None, "float32", [1]],
        [b"eps", "float32", [1]],
    ],
)
def test_tensor_spec_must_be_name_dtype_shape_with_a_valid_name(spec):
    with pytest.raises(WireError):
        decode([pack(header(tensors=[spec])), b"\0" * 4])


def test_duplicate_tensor_names_are_rejected():
    spec = ["eps", "float32", [1]]
    with pytest.raises(WireError):
        decode([pack(header(tensors=[spec, spec])), b"\0" * 4, b"\0" * 4])


# -- header rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["NOPE", "eval", "", " EVAL", 1, None, ["EVAL"]])
def test_unknown_kind_is_rejected(kind):
    assert_rejected_both_ways(Message(kind, {}))


@pytest.mark.parametrize("version", [0, 1, 2, 3, 5, -1, True, "4", None, [4]])
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


@pytest.mark.parametrize(("kind", "key"), REQUIRED_FIELDS)
def test_body_missing_a_required_field_is_rejected(kind, key):
    body = full_body(kind, optional=True)
    del body[key]
    assert_rejected_both_ways(Message(kind, body))


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_body_with_an_unknown_field_is_rejected(kind):
    assert_rejected_both_ways(Message(kind, {**full_body(kind, optional=True), "bogus": 1}))


def test_body_with_a_misspelt_field_is_rejected():
    assert_rejected_both_ways(Message("EVAL", {**EVAL_BODY, "cores": 2}))


@pytest.mark.parametrize(
    ("kind", "key", "expected"), SCHEMA_FIELDS, ids=[f"{k}.{f}" for k, f, _ in SCHEMA_FIELDS]
)
def test_body_field_of_the_wrong_type_is_rejected(kind, key, expected):
    for value in wrong_values(expected):
        assert_rejected_both_ways(Message(kind, {**full_body(kind), key: value}))


@pytest.mark.parametrize("value", [True, False])
def test_bool_where_an_int_is_expected_is_rejected(value):
    assert_rejected_both_ways(Message("HIT", {**HIT_BODY, "core": value}))
    assert_rejected_both_ways(Message("HIT", {**HIT_BODY, "elapsed_s": value}))


@pytest.mark.parametrize("body", [[], None, "x", [["step", 3], ["core", 2]], 3])
def test_body_must_be_a_map(body):
    assert_rejected_both_ways(Message("HEARTBEAT", body))


@pytest.mark.parametrize(
    "request_id",
    [
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
    ],
)
def test_bad_request_id_is_rejected(request_id):
    assert_rejected_both_ways(Message("CANCEL", {}, request=request_id))


@pytest.mark.parametrize("name", ["task", "attempt"])
@pytest.mark.parametrize("value", [-1, 2**63, True, 1.0, "1", [1]])
def test_task_and_attempt_must_be_non_negative_ints(name, value):
    assert_rejected_both_ways(Message("RELEASE", {}, **{name: value}))


@pytest.mark.parametrize("epoch", [-1, True, 1.0, "0", None, [0]])
def test_epoch_must_be_a_non_negative_int(epoch):
    assert_rejected_both_ways(Message("HEARTBEAT", {}, epoch=epoch))


def test_epoch_of_2_to_the_64_is_rejected():
    with pytest.raises(WireError):
        encode(Message("HEARTBEAT", {}, epoch=2**64))


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
    raw = pack(header(kind="EVAL"))
    with pytest.raises(WireError):
        decode([raw.replace(b"EVAL", b"EV\xffL")])


@pytest.mark.parametrize(
    "make",
    [
        lambda ext: ext,
        lambda ext: header(epoch=ext),
        lambda ext: header(kind="PREPARED", body={"solver": {"nested": [ext]}}),
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
        header(body={**EVAL_BODY, 7: 1}),
        header(body={b"tasks": [[7, 1, 3, 2]]}),
        header(kind="PREPARED", body={"solver": {1: "one"}}),
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


def test_empty_frame_list_is_rejected():
    for frames in ([], ()):
        with pytest.raises(WireError):
            decode(frames)


@pytest.mark.parametrize("frame", ["text", None, 12, 1.5, ["frame"]])
def test_frames_that_are_not_buffers_are_rejected(frame):
    with pytest.raises(WireError):
        decode([frame])
    with pytest.raises(WireError):
        decode([pack(header(tensors=[["eps", "uint8", [4]]])), frame])


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
# Non-empty tensors only, so no mutated header meets an empty frame: an empty frame whose shape
# is like [0, 2**62, 2**62] still escapes as torch's RuntimeError (stride overflow), an open bug.
VALID_MESSAGES = [
    Message(
        "EVAL",
        dict(EVAL_BODY),
        {
            "latent": random_tensor((2, 3), torch.float32),
            "noise": random_tensor((4,), torch.bfloat16),
        },
        epoch=5,
        request="req-1",
        task=7,
        attempt=1,
    ),
    Message(
        "HIT",
        dict(HIT_BODY),
        {"x0": random_tensor((3,), torch.float16), "image": random_tensor((2, 2, 3), torch.uint8)},
        epoch=2,
    ),
    Message(
        "RESULT",
        {**RESULT_BODY, "compute_s": 0.25},
        {"eps": random_tensor((5,), torch.float64)},
        task=1,
    ),
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
    assert fields(got) == fields(want)
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
def near_valid_frames(draw) -> list[bytes]:
    """A valid header and frames, then a few edits: body fields dropped, retyped or added, the
    kind swapped, header fields replaced, frames lengthened or shortened. Never an empty tensor."""
    schema = draw(st.sampled_from(sorted(SCHEMAS)))
    body = full_body(schema, optional=draw(st.booleans()))
    for key in draw(st.lists(st.sampled_from([*body, "bogus"]), max_size=2)):
        if key in body and draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(MSGPACK_VALUES | st.sampled_from([3, "x", 0.5, [1], {"a": 1}]))
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["eps", "latent", "x0"]),
                st.sampled_from(sorted(DTYPES)),
                st.lists(st.integers(1, 4), max_size=3),
            ),
            max_size=2,
        )
    )
    frames = []
    for _, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize + draw(st.sampled_from([0, 0, 0, -1, 1]))
        frames.append(draw(st.binary(min_size=max(nbytes, 1), max_size=max(nbytes, 1))))
    kind = draw(st.just(schema) | st.sampled_from(sorted(SCHEMAS)) | st.text(max_size=6))
    obj = header(kind=kind, body=body, tensors=[list(spec) for spec in specs])
    obj.update(draw(st.dictionaries(st.sampled_from(HEADER_KEYS[:-1]), MSGPACK_VALUES, max_size=2)))
    return [pack(obj), *frames]


@FUZZ
@given(frames=near_valid_frames())
def test_near_valid_messages_give_a_message_or_wire_error(frames):
    decode_or_wire_error(frames)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(
            [pack(header(tensors=[["x", "float32", [0, 2**62, 2**62]]])), b""],
            id="empty-frame-with-overflowing-shape",
        ),
        pytest.param([pack(header(req="req-1\n"))], id="request-id-with-trailing-newline"),
        pytest.param(
            [pack(header(tensors=[["x\n", "float32", [1]]])), b"\x00" * 4],
            id="tensor-name-with-trailing-newline",
        ),
        pytest.param(
            [pack(header(kind="PREPARED", body={"solver": {"t": msgpack.Timestamp(1, 0)}}))],
            id="msgpack-timestamp-in-body",
        ),
        pytest.param(
            [pack(header(kind="PREPARED", body={"solver": {b"k": 1}}))],
            id="bytes-key-nested-in-body",
        ),
        pytest.param([pack(header(v=1.0))], id="float-protocol-version"),
    ],
)
def test_regressions_found_by_fuzzing_are_wire_errors(frames):
    with pytest.raises(WireError):
        decode(frames)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(Message("EVAL", {"tasks": [[2**64, 0, 0, 0]]}), id="int-too-big-for-msgpack"),
        pytest.param(Message("PREPARED", {"solver": {"x": object()}}), id="object-in-body"),
        pytest.param(
            Message("EVAL", EVAL_BODY, {"bad name": torch.zeros(1)}),
            id="bad-tensor-name",
        ),
        pytest.param(
            Message("EVAL", EVAL_BODY, {"x": torch.zeros(3).to_sparse()}),
            id="sparse-tensor",
        ),
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
    got = decode([pack(header(tensors=[["x", "float32", [4]]])), strided]).tensors["x"]
    assert torch.equal(got, values)


def test_eval_entries_pair_each_typed_task_with_its_latent():
    latents = [torch.full((2,), float(i)) for i in range(3)]
    entries = [(TaskEntry(i, 0, i + 1, 1, (i + 2, i + 5)), latents[i]) for i in range(3)]
    message = round_trip(eval_message("req-1", entries, epoch=9))
    assert (message.request, message.task, message.attempt, message.epoch) == ("req-1", 0, 0, 9)
    paired = eval_entries(message)
    assert [entry for entry, _ in paired] == [entry for entry, _ in entries]
    assert paired[1][0].targets == (3, 6) and paired[1][0].step == 2
    assert [float(t[0]) for _, t in paired] == [0.0, 1.0, 2.0]


def test_result_entries_name_each_result_by_its_target():
    results = {4: torch.zeros(3), 9: torch.ones(3)}
    message = round_trip(result_message([ResultEntry(5, 2, results)], compute_s=0.25))
    assert message.body["tasks"] == [[5, 2, [4, 9]]] and message.body["compute_s"] == 0.25
    assert list(message.tensors) == ["result.0.0", "result.0.1"]
    (entry,) = result_entries(message)
    assert (entry.task, entry.attempt, sorted(entry.results)) == (5, 2, [4, 9])
    assert torch.equal(entry.results[9], torch.ones(3))


def test_solver_frames_keep_their_names():
    tensors = {"sigmas": torch.linspace(1, 0, 5)}
    message = Message(
        "PREPARED", {"solver": {"kind": "x"}, "x0_digest": "00"}, {**solver_tensors(tensors)}
    )
    message.tensors["x0"] = torch.zeros(2)
    assert list(solver_frames(round_trip(message))) == ["sigmas"]


@pytest.mark.parametrize(
    ("tasks", "tensors"),
    [
        ([], {}),
        ([[1, 0, 2, 1]], {"latent.0": torch.zeros(1)}),  # no targets
        ([[1, 0, 2, -1, [3]]], {"latent.0": torch.zeros(1)}),
        ([[1, 0, 2, True, [3]]], {"latent.0": torch.zeros(1)}),
        ([[1, 0, 2, 1, [3]]], {"latent.1": torch.zeros(1)}),
        ([[1, 0, 2, 1, [2]]], {"latent.0": torch.zeros(1)}),  # a target not above the step
        ([[1, 0, 2, 1, [5, 4]]], {"latent.0": torch.zeros(1)}),  # not ascending
        ([[1, 0, 2, 1, [3, 3]]], {"latent.0": torch.zeros(1)}),
        ([[1, 0, 2, 1, [3, 4, 5, 6, 7]]], {"latent.0": torch.zeros(1)}),  # over MAX_TARGETS
        ([[1, 0, 2, 1, [3]]], {"latent.0": torch.zeros(1), "latent.1": torch.zeros(1)}),
        ([[1, 0, 2, 1, [3]], "x"], {"latent.0": torch.zeros(1), "latent.1": torch.zeros(1)}),
        ([[0, 0, 0, 0, [1]]] * 17, {}),
    ],
)
def test_malformed_eval_task_lists_are_wire_errors(tasks, tensors):
    with pytest.raises(WireError):
        eval_entries(Message("EVAL", {"tasks": tasks}, tensors))


@pytest.mark.parametrize(
    ("tasks", "tensors"),
    [
        ([], {}),
        ([[1, 0]], {"result.0.0": torch.zeros(1)}),  # no targets
        ([[1, 0, [3]]], {}),  # its result is missing
        ([[1, 0, [3]]], {"result.0.0": torch.zeros(1), "result.0.1": torch.zeros(1)}),
        ([[1, 0, [4, 3]]], {"result.0.0": torch.zeros(1), "result.0.1": torch.zeros(1)}),
        ([[1, -1, [3]]], {"result.0.0": torch.zeros(1)}),
        ([[1, 0, [3]]], {"output.0": torch.zeros(1)}),  # protocol 1's naming
    ],
)
def test_malformed_result_task_lists_are_wire_errors(tasks, tensors):
    with pytest.raises(WireError):
        result_entries(Message("RESULT", {"tasks": tasks}, tensors))


@pytest.mark.parametrize("tasks", [[[1]], [[1, 0, 3]], ["x"], [[1, True]], [[0, 0]] * 17])
def test_malformed_failed_task_lists_are_wire_errors(tasks):
    with pytest.raises(WireError):
        failed_tasks(Message("FAILED", {"code": "worker_error", "message": "", "tasks": tasks}))
    ok = Message("FAILED", {"code": "worker_error", "message": "", "tasks": [[3, 1]]})
    assert failed_tasks(ok) == [(3, 1)]


def test_failed_for_an_eval_names_its_well_formed_tasks_and_round_trips():
    message = Message("EVAL", {"tasks": [[3, 1, 2, 1, [3]], ["x", 0], [4, 0, 5, 2, [6]]]})
    failed = round_trip(failed_for(message, "worker_error", "boom"))
    assert failed.body["code"] == "worker_error" and failed.body["message"] == "boom"
    assert failed_tasks(failed) == [(3, 1), (4, 0)]
    prepare = failed_for(Message("PREPARE", {"request": {}}), "invalid_request", "no prompt")
    assert "tasks" not in prepare.body


def test_tensor_digest_tells_bits_dtype_and_shape_apart():
    x = torch.linspace(-1, 1, 12)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x.reshape(3, 4)) != tensor_digest(x)
    assert tensor_digest(x.double()) != tensor_digest(x)
    nudged = x.clone()
    nudged[5] = torch.nextafter(nudged[5], torch.tensor(2.0))
    assert tensor_digest(nudged) != tensor_digest(x)
    assert tensor_digest(x.to(torch.bfloat16)) == tensor_digest(x.to(torch.bfloat16).clone())


def test_a_prepared_without_its_x0_digest_is_rejected():
    with pytest.raises(WireError, match="x0_digest"):
        round_trip(Message("PREPARED", {"solver": {"kind": "x"}}))


def test_busy_errors_carry_a_retry_hint_and_heartbeats_name_missing_ids():
    error = Message("ERROR", {"code": "busy", "message": "m", "retry_after_s": 1.5})
    assert round_trip(error).body["retry_after_s"] == 1.5
    beat = Message("HEARTBEAT", {"in_flight": ["a"], "missing": ["a"]})
    assert round_trip(beat).body["missing"] == ["a"]
