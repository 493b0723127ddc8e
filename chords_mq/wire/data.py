"""The data plane's messages: one worker FETCHes results by name from another, which answers
with DATA (the tensors) or REFUSED (a typed reason); a producer PUTs a result to the worker that
will read it (a push, issue 25), which answers KEPT or REFUSED. Same framing as the control
plane (a small msgpack header, then one raw zero-copy frame per tensor; ``codec``'s tensor
checks), its own version and kinds, so the two protocols never mix. Nothing is unpickled;
every field is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.wire.base import (
    UINT63,
    WireError,
    WireLimits,
    is_id,
    is_uint,
)
from chords_mq.wire.codec import frame_tensor, read_header, tensor_payload, tensor_spec
from chords_mq.wire.named import parse_refs

DATA_VERSION = 1
MAX_DETAIL = 200  # characters of a refusal's text
# A fetch names the inputs of a few tasks; a reply's header lists one spec per tensor.
DATA_LIMITS = WireLimits(max_header_bytes=16 * 1024, max_tensors=32)


class DataKind(StrEnum):
    FETCH = "FETCH"
    DATA = "DATA"
    REFUSED = "REFUSED"
    PUT = "PUT"  # a pushed result: the tensors, as DATA carries them
    KEPT = "KEPT"  # the answer to a PUT: the refs kept


class RefusalReason(StrEnum):
    """Why a data server did not send what was asked."""

    NOT_HELD = "not_held"  # the request is known here, some of its refs are not (dropped?)
    UNKNOWN_REQUEST = "unknown_request"  # nothing of that request is held here
    TOO_LARGE = "too_large"  # the reply would pass the server's bytes-per-reply bound
    BAD_REQUEST = "bad_request"  # a malformed message
    BUSY = "busy"  # the server's bytes in flight are at their bound; ask again later
    NO_ROOM = "no_room"  # a PUT past the receiver's budget for pushed copies
    MISMATCH = "mismatch"  # a PUT's tensor is not the request's latent dtype and shape
    UNWANTED = "unwanted"  # a PUT of a copy already read (or given up on) there


@dataclass(frozen=True)
class FetchMessage:
    """Ask for the tensors of ``refs`` of ``request``; ``fetch_id`` matches the answer."""

    fetch_id: int
    request: str
    refs: tuple[Ref, ...]


@dataclass(frozen=True)
class DataMessage:
    """The answer: one tensor per asked ref, in the asked order."""

    fetch_id: int
    request: str
    tensors: tuple[tuple[Ref, torch.Tensor], ...]


@dataclass(frozen=True)
class RefusedMessage:
    """A typed refusal; ``refs``: the asked refs it concerns (those not held, say)."""

    fetch_id: int
    request: str | None
    reason: RefusalReason
    detail: str = ""
    refs: tuple[Ref, ...] = ()


@dataclass(frozen=True)
class PutMessage:
    """A pushed result: keep ``tensors`` (by ref) of ``request`` for an EVAL that will read
    them; answered by KEPT or REFUSED with the same ``fetch_id``."""

    fetch_id: int
    request: str
    tensors: tuple[tuple[Ref, torch.Tensor], ...]


@dataclass(frozen=True)
class KeptMessage:
    """A PUT's answer: every one of its ``refs`` is kept."""

    fetch_id: int
    request: str
    refs: tuple[Ref, ...]


DataPlaneMessage = FetchMessage | DataMessage | RefusedMessage | PutMessage | KeptMessage

_KEYS = {
    DataKind.FETCH: frozenset({"v", "kind", "id", "req", "refs"}),
    DataKind.DATA: frozenset({"v", "kind", "id", "req", "tensors"}),
    DataKind.PUT: frozenset({"v", "kind", "id", "req", "tensors"}),
    DataKind.KEPT: frozenset({"v", "kind", "id", "req", "refs"}),
    DataKind.REFUSED: frozenset({"v", "kind", "id", "req", "reason", "detail", "refs"}),
}


_KINDS = frozenset(kind.value for kind in DataKind)
_REASONS = frozenset(reason.value for reason in RefusalReason)


def ref_name(ref: Ref) -> str:
    """A result's name as a tensor frame's name: ``task:target``."""
    return f"{ref.task}:{ref.target}"


def _ref_of_name(name: str) -> Ref:
    task, sep, target = name.partition(":")
    if not (sep and task.isdigit() and target.isdigit()):
        raise WireError(f"tensor name {name!r} is not task:target")
    ref = Ref(int(task), int(target))
    if ref.task >= UINT63 or ref.target >= UINT63 or ref_name(ref) != name:
        raise WireError(f"tensor name {name!r} is not task:target")
    return ref


def encode_data_message(
    message: DataPlaneMessage, limits: WireLimits = DATA_LIMITS
) -> list[bytes | memoryview]:
    """Frames for ``message``: the msgpack header, then (DATA) one raw frame per tensor."""
    if not is_uint(message.fetch_id):
        raise WireError(f"bad fetch id {message.fetch_id!r}")
    if message.request is not None and not is_id(message.request):
        raise WireError(f"bad request id {message.request!r}")
    header: dict[str, Any] = {"v": DATA_VERSION, "id": message.fetch_id, "req": message.request}
    frames: list[bytes | memoryview] = []
    if isinstance(message, DataMessage | PutMessage):
        header["kind"] = (DataKind.DATA if isinstance(message, DataMessage) else DataKind.PUT).value
        if len(message.tensors) > limits.max_tensors:
            raise WireError(f"{len(message.tensors)} tensors exceed the limit {limits.max_tensors}")
        specs = []
        for ref, tensor in message.tensors:
            dtype, payload = tensor_payload(str(ref), tensor, limits)
            specs.append([ref_name(_checked_ref(ref)), dtype, list(tensor.shape)])
            frames.append(payload)
        header["tensors"] = specs
    else:
        refs = [list(_pair(_checked_ref(ref))) for ref in message.refs]
        if len(refs) > limits.max_tensors:
            raise WireError(f"{len(refs)} refs exceed the limit {limits.max_tensors}")
        header["refs"] = refs
        if isinstance(message, FetchMessage):
            header["kind"] = DataKind.FETCH.value
        elif isinstance(message, KeptMessage):
            header["kind"] = DataKind.KEPT.value
        else:
            header["kind"] = DataKind.REFUSED.value
            header["reason"] = RefusalReason(message.reason).value
            header["detail"] = message.detail[:MAX_DETAIL]
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > limits.max_header_bytes:
        raise WireError(f"header of {len(packed)} bytes > {limits.max_header_bytes}")
    return [packed, *frames]


def _pair(ref: Ref) -> tuple[int, int]:
    return ref.task, ref.target


def _checked_ref(ref: Any) -> Ref:
    if not (isinstance(ref, Ref) and is_uint(ref.task) and is_uint(ref.target)):
        raise WireError(f"{ref!r} is not a Ref of two unsigned integers")
    return ref


def decode_data_message(
    frames: Sequence[Any], limits: WireLimits = DATA_LIMITS
) -> DataPlaneMessage:
    """Parse and check one data-plane message (without a ROUTER's routing id). Raises
    WireError on anything malformed, oversized or unknown."""
    header = read_header(frames, limits)
    if type(header.get("v")) is not int or header["v"] != DATA_VERSION:
        raise WireError(f"data-plane version {header.get('v')!r} != {DATA_VERSION}")
    name = header.get("kind")
    if type(name) is not str or name not in _KINDS:
        raise WireError(f"unknown data-plane kind {name!r}")
    kind = DataKind(name)
    if header.keys() != _KEYS[kind]:
        raise WireError(f"{kind} header keys {sorted(map(str, header))} != {sorted(_KEYS[kind])}")
    fetch_id, request = header["id"], header["req"]
    if not is_uint(fetch_id):
        raise WireError(f"bad fetch id {fetch_id!r}")
    if not (is_id(request) or (request is None and kind is DataKind.REFUSED)):
        raise WireError(f"bad request id {request!r}")
    if kind is DataKind.DATA:
        return DataMessage(fetch_id, request, _tensors(header["tensors"], frames[1:], limits))
    if kind is DataKind.PUT:
        tensors = _tensors(header["tensors"], frames[1:], limits)
        if not tensors:
            raise WireError("PUT carries no tensor")
        return PutMessage(fetch_id, request, tensors)
    if len(frames) != 1:
        raise WireError(f"{kind} carries no tensor frames, got {len(frames) - 1}")
    refs = _refs(kind, header["refs"], limits)
    if kind is DataKind.FETCH:
        if not refs:
            raise WireError("FETCH names no refs")
        return FetchMessage(fetch_id, request, refs)
    if kind is DataKind.KEPT:
        return KeptMessage(fetch_id, request, refs)
    if type(header["reason"]) is not str or header["reason"] not in _REASONS:
        raise WireError(f"unknown refusal reason {header['reason']!r}")
    reason = RefusalReason(header["reason"])
    detail = header["detail"]
    if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
        raise WireError("a refusal's detail must be a string of at most 200 characters")
    return RefusedMessage(fetch_id, request, reason, detail, refs)


def _refs(kind: DataKind, value: Any, limits: WireLimits) -> tuple[Ref, ...]:
    refs = parse_refs(kind.value, value, limits.max_tensors)
    if len(set(refs)) != len(refs):
        raise WireError(f"{kind}: a ref is named twice")
    return refs


def _tensors(
    specs: Any, frames: Sequence[Any], limits: WireLimits
) -> tuple[tuple[Ref, torch.Tensor], ...]:
    if not isinstance(specs, list) or len(specs) != len(frames):
        raise WireError("header lists a different number of tensors than frames follow")
    tensors: dict[Ref, torch.Tensor] = {}
    for spec, frame in zip(specs, frames):
        name, dtype, shape = tensor_spec(spec, limits)
        ref = _ref_of_name(name)
        if ref in tensors:
            raise WireError(f"{ref} appears twice")
        tensors[ref] = frame_tensor(str(ref), dtype, shape, frame, limits)
    return tuple(tensors.items())
