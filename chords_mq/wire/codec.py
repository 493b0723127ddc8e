"""Frames: a message is ``[msgpack header][raw tensor frame]*``. ``encode`` turns a typed
message into frames (tensors zero-copy, as uint8 views of contiguous memory); ``decode`` checks
the header and the frames and builds the kind's type. Pickle is never used."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from chords_mq.wire.base import (
    DEFAULT_LIMITS,
    DTYPE_NAMES,
    DTYPES,
    PROTOCOL_VERSION,
    UINT63,
    WireError,
    WireLimits,
    check_body,
    check_ids,
    is_id,
    tensor_bytes,
)
from chords_mq.wire.messages import BY_NAME, Message


def encode(message: Message, limits: WireLimits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """Frames for ``message``: the msgpack header, then one raw frame per tensor."""
    check_ids(message.NAME, message.epoch, message.request, message.task, message.attempt)
    tensors = message.tensors
    specs, frames = [], []
    if len(tensors) > limits.max_tensors:
        raise WireError(f"{len(tensors)} tensors exceed the limit {limits.max_tensors}")
    for name, tensor in tensors.items():
        if not is_id(name):
            raise WireError(f"bad tensor name {name!r}")
        dtype, payload = tensor_payload(f"tensor {name!r}", tensor, limits)
        specs.append([name, dtype, list(tensor.shape)])
        frames.append(payload)
    body = message.body()
    check_body(message.NAME, body, message.SELF_CHECKED)
    try:
        header = msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": message.NAME,
                "epoch": message.epoch,
                "req": message.request,
                "task": message.task,
                "attempt": message.attempt,
                "tensors": specs,
                "body": body,
            },
            use_bin_type=True,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"{message.NAME}: header cannot be packed: {exc}") from None
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
    """Parse and validate one message (without the ROUTER routing id) into its kind's type.
    Raises WireError."""
    header = read_header(frames, limits)
    if header.keys() != _HEADER_KEYS:
        raise WireError(f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    if type(header["v"]) is not int or header["v"] != PROTOCOL_VERSION:
        raise WireError(f"protocol version {header['v']!r} != {PROTOCOL_VERSION}")
    kind = header["kind"]
    cls = BY_NAME.get(kind) if type(kind) is str else None
    if cls is None:
        raise WireError(f"unknown message kind {kind!r}")
    specs = header["tensors"]
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise WireError("header lists a different number of tensors than frames follow")
    tensors: dict[str, torch.Tensor] = {}
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = tensor_spec(spec, limits)
        if name in tensors:
            raise WireError(f"tensor {name!r} appears twice")
        tensors[name] = frame_tensor(f"tensor {name!r}", dtype, shape, frame, limits)
    ids = {"epoch": header["epoch"], "request": header["req"]}
    ids.update(task=header["task"], attempt=header["attempt"])
    check_ids(kind, **ids)
    body = header["body"]
    if not isinstance(body, dict):
        raise WireError(f"{kind}: body must be a map with string keys")
    check_body(kind, body, cls.SELF_CHECKED)
    return cls.parse(ids, body, tensors)


def read_header(frames: Sequence[Any], limits: WireLimits) -> dict[Any, Any]:
    """The msgpack map that opens ``frames``, read only once the frame count and its size are
    within ``limits``; the control and the data plane both start here. Raises WireError."""
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
    return header


def tensor_payload(label: str, tensor: Any, limits: WireLimits) -> tuple[str, memoryview]:
    """``tensor``'s dtype name and its bytes as one zero-copy frame, if it may travel (a dense
    tensor of an allowed dtype within ``limits``); ``label`` names it in errors."""
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"{label} is a {type(tensor).__name__}, not a torch.Tensor")
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{label} has dtype {tensor.dtype}, not in {sorted(DTYPES)}")
    if tensor.layout != torch.strided:
        raise WireError(f"{label} is {tensor.layout}; only dense tensors travel")
    if tensor.dim() > limits.max_ndim:
        raise WireError(f"{label} has {tensor.dim()} dims > {limits.max_ndim}")
    payload = tensor_bytes(tensor)
    if payload.nbytes > limits.max_frame_bytes:
        raise WireError(f"{label}: {payload.nbytes} bytes > {limits.max_frame_bytes}")
    return dtype, payload


def frame_tensor(
    label: str, dtype: str, shape: list[int], frame: Any, limits: WireLimits
) -> torch.Tensor:
    """The tensor ``frame`` carries, as its checked spec (``tensor_spec``) says; ``label`` names
    it in errors."""
    view = _buffer(frame)
    expected_bytes = math.prod(shape) * DTYPES[dtype].itemsize
    if view.nbytes != expected_bytes:
        raise WireError(
            f"{label}: frame has {view.nbytes} bytes, {dtype}{shape} needs {expected_bytes}"
        )
    if view.nbytes > limits.max_frame_bytes:
        raise WireError(f"{label}: {view.nbytes} bytes > {limits.max_frame_bytes}")
    try:
        return _tensor_from(view, DTYPES[dtype], shape)
    except (RuntimeError, ValueError) as exc:  # torch's own checks, e.g. stride overflow
        raise WireError(f"{label}: {exc}") from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def tensor_spec(spec: Any, limits: WireLimits) -> tuple[str, str, list[int]]:
    if not (isinstance(spec, list) and len(spec) == 3):
        raise WireError(f"tensor spec {spec!r} is not [name, dtype, shape]")
    name, dtype, shape = spec
    if not is_id(name):
        raise WireError(f"bad tensor name {name!r}")
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not allowed ({sorted(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError(f"bad shape {shape!r}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < UINT63:
            raise WireError(f"bad shape {shape!r}")
    if math.prod(size for size in shape if size) >= UINT63:
        raise WireError(f"shape {shape!r} overflows")
    return name, dtype, shape
