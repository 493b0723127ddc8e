"""The wire format: the one module that knows bytes (ARCHITECTURE rule 3).

A message is ``[msgpack header][raw tensor frame]*``. The header holds the protocol version, the
message kind, the broker epoch, the request id, task id and attempt, one ``[name, dtype, shape]``
per tensor frame, and a per-kind body. Tensors go out zero-copy as uint8 views of contiguous
memory (bfloat16 included) and come back zero-copy through ``torch.frombuffer``. Every message
kind, field and limit is defined here, and both ends validate with ``decode``. Anything that
breaks a rule raises ``WireError``; pickle is never used.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import torch

from chords_mq.algorithms.base import MAX_TARGETS
from chords_mq.errors import ChordsError

# 2: tasks carry targets; workers return solver results, not model outputs.
# 3: PREPARED carries x0_digest; ERROR may carry retry_after_s; heartbeats name missing ids.
# 4: PROGRESS may say the request waits for a worker (waiting).
PROTOCOL_VERSION = 4
MAX_TASKS = 16  # tasks in one EVAL (a request's ``batch`` is at most this)


class WireError(ChordsError, ValueError):
    """A message that breaks the wire format: malformed, too large, or of an unknown kind."""


@dataclass(frozen=True)
class WireLimits:
    """Limits enforced on both sides. ``max_frame_bytes`` is also the sockets' MAXMSGSIZE."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = MAX_TASKS * MAX_TARGETS  # a RESULT of a full batch
    max_frame_bytes: int = 1 << 30
    max_ndim: int = 8


DEFAULT_LIMITS = WireLimits()

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,  # decoded media
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_ID = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_UINT63 = 1 << 63
_KNOWN_IDS: set[str] = set()  # ids and tensor names that passed _ID: the hot path repeats them


def _is_id(value: Any) -> bool:
    if type(value) is str and value in _KNOWN_IDS:
        return True
    if not isinstance(value, str) or not _ID.fullmatch(value):
        return False
    if len(_KNOWN_IDS) >= 4096:  # bounded: a peer sending fresh ids cannot grow it
        _KNOWN_IDS.clear()
    _KNOWN_IDS.add(value)
    return True


def _nullable(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return (*kinds, type(None))


_NUM = (int, float)
# Per kind: required body fields and their types, then optional ones. A body may carry nothing
# else, so a typo is an error rather than a silently ignored field.
SCHEMAS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # worker -> broker
    "HELLO": (
        {
            "worker": str,
            "model": str,
            "device": str,
            "dtype": str,
            "max_batch": int,
            "version": str,
        },
        # session: one id per worker socket, so a HELLO repeated on it (queued while the link
        # was down) is recognised and answered again without dropping the worker's state.
        {"capabilities": list, "protocol": int, "session": str},
    ),
    # PREPARED carries the solver spec (tensors solver.*) and, if PREPARE asked, x0.
    # Every PREPARED names the digest of the worker's initial latent (tensor_digest), so the
    # broker can tell that two workers would start the request from the same x0.
    "PREPARED": ({"solver": dict, "x0_digest": str}, {"prepare_s": _NUM}),
    # EVAL carries [[task, attempt, step, core, [target, ...]], ...] with tensors latent.<i>;
    # RESULT answers [[task, attempt, [target, ...]], ...] with result.<i>.<k>, the solver
    # result of task i at its k-th target. See TaskEntry, eval_entries, result_entries.
    "RESULT": ({"tasks": list}, {"compute_s": _NUM}),
    "DECODED": ({}, {"compute_s": _NUM}),
    "FAILED": ({"code": str, "message": str}, {"tasks": list}),
    # broker -> worker
    "WELCOME": ({"heartbeat_ms": int}, {}),
    "PREPARE": ({"request": dict}, {"initial": bool}),
    "EVAL": ({"tasks": list}, {}),
    "DECODE": ({}, {}),
    "RELEASE": ({}, {}),
    # both directions, every peer
    # A client's HEARTBEAT may list (a page of) the request ids it waits on; the broker's reply
    # names those it does not know (lost: the client resubmits them).
    "HEARTBEAT": ({}, {"in_flight": list, "missing": list}),
    "DISCONNECT": ({}, {"reason": str, "shutdown": bool}),
    # client -> broker
    # wait_for_worker_s: wait that long for a worker of the model instead of failing at once
    "SUBMIT": ({"request": dict}, {"wait_for_worker_s": _NUM}),
    "CANCEL": ({}, {}),
    # A STATUS request may ask for a page (offset); the reply lists at most STATUS_PAGE sessions
    # and workers from there, and the totals.
    "STATUS": (
        {},
        {
            "workers": list,
            "sessions": list,
            "epoch": int,
            "offset": int,
            "sessions_total": int,
            "workers_total": int,
            "role": str,
        },
    ),
    # broker -> client
    "ACCEPTED": (
        {"steps": int, "method": str, "hit_rounds": list},
        {"init_sequence": _nullable(list), "workers": int, "cores": int, "requested_cores": int},
    ),
    # waiting: {"for": "worker", "model", "since_s", "fails_in_s"} while no worker serves it
    "PROGRESS": ({"evaluations": int}, {"hits": int, "cores": list, "waiting": dict}),
    "HIT": ({"core": int, "round": int, "steps": int, "elapsed_s": _NUM}, {}),
    "DONE": ({"stats": dict}, {}),
    # busy: a limit was reached; retry_after_s says when trying again is worth it. wrong_port:
    # a client's message at the worker port, or a worker's at the client port (no request id).
    "ERROR": ({"code": str, "message": str}, {"retry_after_s": _NUM}),
}
KINDS = frozenset(SCHEMAS)
STATUS_PAGE = 64  # sessions and workers per STATUS reply: well under the header limit
HEARTBEAT_IDS = 256  # request ids one client HEARTBEAT may list


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short hex digest of a tensor's dtype, shape and bytes: equal digests, equal bits."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{DTYPE_NAMES.get(tensor.dtype, tensor.dtype)}{list(tensor.shape)}".encode())
    digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


@dataclass
class Message:
    """One decoded message. ``tensors`` keeps the frame order."""

    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    request: str | None = None
    task: int | None = None
    attempt: int | None = None


# numpy has no bfloat16: its frames go out through a same-size integer view.
_NUMPY_VIEW = {torch.bfloat16: torch.int16}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # A byte view of contiguous CPU memory, every dtype included. The send is zero-copy, so
    # nobody may mutate ``tensor`` afterwards.
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    as_int = _NUMPY_VIEW.get(tensor.dtype)
    array: Any = (tensor if as_int is None else tensor.view(as_int)).numpy()
    flat = array.reshape(-1)
    return memoryview(flat).cast("B") if flat.size else memoryview(b"")


def encode(message: Message, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Frames for ``message``: the msgpack header, then one raw frame per tensor."""
    validate_fields(message)
    specs, frames = [], []
    if len(message.tensors) > limits.max_tensors:
        raise WireError(f"{len(message.tensors)} tensors exceed the limit {limits.max_tensors}")
    for name, tensor in message.tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise WireError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        dtype = DTYPE_NAMES.get(tensor.dtype)
        if not _is_id(name):
            raise WireError(f"bad tensor name {name!r}")
        if dtype is None:
            raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, not in {sorted(DTYPES)}")
        if tensor.layout != torch.strided:
            raise WireError(f"tensor {name!r} is {tensor.layout}; only dense tensors travel")
        if tensor.dim() > limits.max_ndim:
            raise WireError(f"tensor {name!r} has {tensor.dim()} dims > {limits.max_ndim}")
        payload = _tensor_bytes(tensor)
        if payload.nbytes > limits.max_frame_bytes:
            raise WireError(f"tensor {name!r}: {payload.nbytes} bytes > {limits.max_frame_bytes}")
        specs.append([name, dtype, list(tensor.shape)])
        frames.append(payload)
    try:
        header = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": message.kind,
                "epoch": message.epoch,
                "req": message.request,
                "task": message.task,
                "attempt": message.attempt,
                "tensors": specs,
                "body": message.body,
            },
            use_bin_type=True,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{message.kind}: header cannot be packed: {exc}") from None
    if len(header) > limits.max_header_bytes:
        raise WireError(f"header of {len(header)} bytes > {limits.max_header_bytes}")
    return [header, *frames]


def _buffer(frame: Any) -> memoryview:
    data = getattr(frame, "buffer", frame)  # a zmq.Frame exposes .buffer; bytes are buffers too
    try:
        view = memoryview(data)
    except TypeError:
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer") from None
    return view if view.c_contiguous else memoryview(view.tobytes())


def _tensor_from(view: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))  # frombuffer needs writable memory
    tensor = torch.frombuffer(view, dtype=dtype).view(shape)
    # Small frames are slices of libzmq's receive batch and may sit at odd addresses; large
    # ones are 8-byte aligned, which every allowed dtype accepts, so they are never copied.
    if tensor.data_ptr() % tensor.element_size():
        tensor = tensor.clone()
    return tensor


_HEADER_KEYS = frozenset({"v", "kind", "epoch", "req", "task", "attempt", "tensors", "body"})


def decode(frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one message (without the ROUTER routing id). Raises WireError."""
    if not frames:
        raise WireError("empty message")
    if len(frames) > 1 + limits.max_tensors:
        raise WireError(f"{len(frames) - 1} tensor frames exceed the limit {limits.max_tensors}")
    raw = _buffer(frames[0])
    if raw.nbytes > limits.max_header_bytes:
        raise WireError(f"header of {raw.nbytes} bytes > {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a map")
    if header.keys() != _HEADER_KEYS:
        raise WireError(f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    if type(header["v"]) is not int or header["v"] != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header['v']!r} != {PROTOCOL_VERSION}")
    specs = header["tensors"]
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise WireError("header lists a different number of tensors than frames follow")
    tensors: dict[str, torch.Tensor] = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = _tensor_spec(spec, limits)
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        view = _buffer(frame)
        expected_bytes = math.prod(shape) * DTYPES[dtype].itemsize
        if view.nbytes != expected_bytes:
            raise WireError(
                f"tensor {name!r}: frame has {view.nbytes} bytes, {dtype}{shape} needs "
                f"{expected_bytes}"
            )
        if view.nbytes > limits.max_frame_bytes:
            raise WireError(f"tensor {name!r}: {view.nbytes} bytes > {limits.max_frame_bytes}")
        try:
            tensors[name] = _tensor_from(view, DTYPES[dtype], shape)
        except (RuntimeError, ValueError) as exc:  # torch's own checks, e.g. stride overflow
            raise WireError(f"tensor {name!r}: {exc}") from None
    message = Message(
        kind=header["kind"],
        body=header["body"],
        tensors=tensors,
        epoch=header["epoch"],
        request=header["req"],
        task=header["task"],
        attempt=header["attempt"],
    )
    validate_fields(message)
    return message


def _reject_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _tensor_spec(spec: Any, limits: WireLimits) -> tuple[str, str, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise WireError(f"tensor spec {spec!r} is not [name, dtype, shape]")
    name, dtype, shape = spec
    if not _is_id(name):
        raise WireError(f"bad tensor name {name!r}")
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not allowed ({sorted(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError(f"bad shape {shape!r}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < _UINT63:
            raise WireError(f"bad shape {shape!r}")
    if math.prod(size for size in shape if size) >= _UINT63:
        raise WireError(f"shape {shape!r} overflows")
    return name, dtype, shape


def _is_uint(value: Any, bound: int = _UINT63) -> bool:
    if type(value) is int:  # the common case, and never a bool
        return 0 <= value < bound
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def validate_fields(message: Message) -> None:
    """Check the kind, ids and body of ``message`` against its schema."""
    if not isinstance(message.kind, str) or message.kind not in KINDS:
        raise WireError(f"unknown message kind {message.kind!r}")
    if not _is_uint(message.epoch, 1 << 64):
        raise WireError(f"bad epoch {message.epoch!r}")
    if message.request is not None and not _is_id(message.request):
        raise WireError(f"bad request id {message.request!r}")
    for name in ("task", "attempt"):
        value = getattr(message, name)
        if value is not None and not _is_uint(value):
            raise WireError(f"bad {name} {value!r}")
    body = message.body
    if not isinstance(body, dict):
        raise WireError(f"{message.kind}: body must be a map with string keys")
    _check_plain(message.kind, body)  # string keys, plain values
    required, optional = SCHEMAS[message.kind]
    for key, kind in required.items():
        if key not in body:
            raise WireError(f"{message.kind}: body lacks {key!r}")
        _check_type(message.kind, key, body[key], kind)
    for key, value in body.items():
        if key in required:
            continue
        if key not in optional:
            raise WireError(f"{message.kind}: unknown body field {key!r}")
        _check_type(message.kind, key, value, optional[key])


class TaskEntry(NamedTuple):
    """One task of an EVAL: evaluate the latent at ``step`` and return the solver result at
    each of ``targets`` (ascending, each above ``step``)."""

    task: int
    attempt: int
    step: int
    core: int
    targets: tuple[int, ...]


class ResultEntry(NamedTuple):
    """One task of a RESULT: ``results[j]`` is ``S(x, f(x, step), step, j)`` for each target."""

    task: int
    attempt: int
    results: dict[int, torch.Tensor]


SOLVER_PREFIX = "solver."


def _is_targets(value: Any, above: int = -1) -> bool:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGETS:
        return False
    previous = above
    for target in value:
        if not _is_uint(target) or target <= previous:
            return False
        previous = target
    return True


def _task_list(message: Message) -> list[Any]:
    entries = message.body.get("tasks")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TASKS:
        raise WireError(f"{message.kind}: tasks must be a list of 1 to {MAX_TASKS} entries")
    return entries


def eval_message(
    request: str, entries: Sequence[tuple[TaskEntry, torch.Tensor]], epoch: int = 0
) -> Message:
    """An EVAL of ``entries`` (each a task and its input latent); the header's task and attempt
    are the first entry's, which the worker's answer echoes."""
    first = entries[0][0]
    return Message(
        "EVAL",
        {"tasks": [[e.task, e.attempt, e.step, e.core, list(e.targets)] for e, _ in entries]},
        {f"latent.{i}": latent for i, (_, latent) in enumerate(entries)},
        epoch=epoch,
        request=request,
        task=first.task,
        attempt=first.attempt,
    )


def eval_entries(message: Message) -> list[tuple[TaskEntry, torch.Tensor]]:
    """The tasks of an EVAL with their latents; anything malformed raises WireError."""
    entries = _task_list(message)
    paired = []
    for index, entry in enumerate(entries):
        if not (
            isinstance(entry, list)
            and len(entry) == 5
            and all(_is_uint(value) for value in entry[:4])
            and _is_targets(entry[4], above=entry[2])
        ):
            raise WireError(
                f"EVAL: task entry {entry!r} is not [task, attempt, step, core, [targets]] with "
                f"1 to {MAX_TARGETS} ascending targets above the step"
            )
        latent = message.tensors.get(f"latent.{index}")
        if latent is None:
            raise WireError(f"EVAL: tensor latent.{index} is missing")
        task, attempt, step, core, targets = entry
        paired.append((TaskEntry(task, attempt, step, core, tuple(targets)), latent))
    if len(message.tensors) != len(paired):
        raise WireError(f"EVAL: {len(message.tensors)} tensors for {len(paired)} tasks")
    return paired


def result_message(entries: Sequence[ResultEntry], compute_s: float) -> Message:
    """A RESULT for ``entries``; the caller copies the EVAL's ids into it."""
    tensors: dict[str, torch.Tensor] = {}
    tasks = []
    for i, entry in enumerate(entries):
        targets = sorted(entry.results)
        tasks.append([entry.task, entry.attempt, targets])
        for k, target in enumerate(targets):
            tensors[f"result.{i}.{k}"] = entry.results[target]
    return Message("RESULT", {"tasks": tasks, "compute_s": compute_s}, tensors)


def result_entries(message: Message) -> list[ResultEntry]:
    """The tasks of a RESULT with their solver results; anything malformed raises WireError."""
    entries = _task_list(message)
    parsed = []
    count = 0
    for index, entry in enumerate(entries):
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and _is_uint(entry[0])
            and _is_uint(entry[1])
            and _is_targets(entry[2])
        ):
            raise WireError(
                f"RESULT: task entry {entry!r} is not [task, attempt, [targets]] with 1 to "
                f"{MAX_TARGETS} ascending targets"
            )
        results = {}
        for k, target in enumerate(entry[2]):
            tensor = message.tensors.get(f"result.{index}.{k}")
            if tensor is None:
                raise WireError(f"RESULT: tensor result.{index}.{k} is missing")
            results[target] = tensor
        count += len(results)
        parsed.append(ResultEntry(entry[0], entry[1], results))
    if len(message.tensors) != count:
        raise WireError(f"RESULT: {len(message.tensors)} tensors for {count} results")
    return parsed


def failed_for(eval_message: Message, code: str, text: str) -> Message:
    """The FAILED answering an EVAL (or any job): it names the EVAL's [task, attempt] pairs
    that are well formed, so the broker can tell which tasks to run again."""
    body: dict[str, Any] = {"code": code, "message": text}
    if eval_message.kind == "EVAL":
        tasks = eval_message.body.get("tasks")
        entries = tasks[:MAX_TASKS] if isinstance(tasks, list) else []
        body["tasks"] = [
            entry[:2]
            for entry in entries
            if isinstance(entry, list) and len(entry) >= 2 and all(map(_is_uint, entry[:2]))
        ]
    return Message("FAILED", body)


def failed_tasks(message: Message) -> list[tuple[int, int]]:
    """``(task, attempt)`` of each task a FAILED names (an EVAL's); WireError if malformed."""
    entries = message.body.get("tasks", [])
    if not isinstance(entries, list) or len(entries) > MAX_TASKS:
        raise WireError(f"FAILED: tasks must be a list of at most {MAX_TASKS} entries")
    out = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and all(map(_is_uint, entry))):
            raise WireError(f"FAILED: task entry {entry!r} is not [task, attempt]")
        out.append((entry[0], entry[1]))
    return out


def solver_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A solver spec's tensors as PREPARED frames (``solver.<name>``)."""
    return {f"{SOLVER_PREFIX}{name}": tensor for name, tensor in tensors.items()}


def solver_frames(message: Message) -> dict[str, torch.Tensor]:
    """The solver spec's tensors of a PREPARED, by their own names."""
    return {
        name.removeprefix(SOLVER_PREFIX): tensor
        for name, tensor in message.tensors.items()
        if name.startswith(SOLVER_PREFIX)
    }


_SCALARS = (bool, int, float, str, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)  # exact types: one set lookup on the hot path


def _check_plain(kind: str, value: Any, depth: int = 0) -> None:
    """Bodies hold plain data only: no bytes, extension types, timestamps or non-string keys."""
    if depth > 8:
        raise WireError(f"{kind}: body nested too deeply")
    kind_of = type(value)
    if kind_of is dict or (kind_of is not list and isinstance(value, dict)):
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise WireError(f"{kind}: map keys must be strings, got {type(key).__name__}")
            if type(item) not in _SCALAR_TYPES:
                _check_plain(kind, item, depth + 1)
    elif kind_of is list or isinstance(value, list):
        for item in value:
            if type(item) not in _SCALAR_TYPES:
                _check_plain(kind, item, depth + 1)
    elif not isinstance(value, _SCALARS):
        raise WireError(f"{kind}: {type(value).__name__} is not allowed in a body")


def _check_type(kind: str, key: str, value: Any, expected: Any) -> None:
    types = expected if isinstance(expected, tuple) else (expected,)
    if type(value) in types and type(value) is not bool:  # the common, exact case
        return
    if isinstance(value, bool) and bool not in types:
        raise WireError(f"{kind}: {key!r} must be {_names(types)}, got a bool")
    if not isinstance(value, types):
        raise WireError(f"{kind}: {key!r} must be {_names(types)}, got {type(value).__name__}")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)
