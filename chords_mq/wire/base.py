"""What both ends of the wire share: the protocol version, the limits, the tensor dtypes, the
checks of ids and plain values, and ``WireError``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chords_mq.algorithms.base import MAX_TARGETS
from chords_mq.errors import ChordsError

# 2: tasks carry targets; workers return solver results, not model outputs.
# 3: PREPARED carries x0_digest; ERROR may carry retry_after_s; heartbeats name missing ids.
# 4: PROGRESS may say the request waits for a worker (waiting).
# 5: HELLO may say what the worker runs for its scheduler (solver).
# 6: HELLO may carry the worker's data endpoint (data); in a CURVE pool WELCOME carries the
#    pool's worker keys (pool_keys), and POOL hands out a new set when the allow-list reloads.
# 7: latents by name: an EVAL may carry its inputs as operations over named results at their
#    holders (inputs), a RESULT what the worker checked of the results it kept (held), DROP
#    lets results go, a DECODE by name computes the hit's latent (and DECODED may return it),
#    FAILED lost_input names an input no holder gave. Still 7 (optional fields): a held
#    result may carry its digest (a fifth field), a HELLO its device_class (verification).
# 8: a RESULT may report the fetches its inputs took (fetched: [endpoint, bytes, seconds]), from
#    which the broker learns the bandwidth between hosts. Still 8 (optional fields): a holder
#    named in an EVAL may carry the digest it reported (its third field), FAILED corrupt_input
#    names a holder whose bytes do not have it. Still 8 (new kinds behind a capability): COMPARE
#    and COMPARED, only to and from a worker whose HELLO lists "compare". Still 8 (an optional
#    field, behind a capability): a COMPARE without mine is a probe, only to a worker whose HELLO
#    lists "probe", and its COMPARED carries the digests of what it fetched (digests).
#    Still 8 (a new kind and optional fields, behind a capability both ways): a DECODE may ask
#    for the hit's latent in ``parts`` pieces (``part_bounds``), only of a worker whose HELLO
#    lists "parts" and for a client whose SUBMIT said ``hit_parts``; the worker sends each as a
#    PART, then the DECODED (``parts``: their count, no latent); the broker checks and sends
#    each on to the client as a PART, and the HIT (``parts``, ``shape``, ``dtype``) after them.
PROTOCOL_VERSION = 8
MAX_TASKS = 16  # tasks in one EVAL (a request's ``batch`` is at most this)
STATUS_PAGE = 64  # sessions and workers per STATUS reply: well under the header limit
HEARTBEAT_IDS = 256  # request ids one client HEARTBEAT may list
# Worker keys one WELCOME or POOL may carry (z85, 40 characters each: about 42 KiB of header,
# under max_header_bytes). A broker whose allow-list has more hands out none past it (it says so).
MAX_POOL_KEYS = 1024
# A hit's latent sent on in pieces (PART): at most this many, each at least PART_MIN_BYTES, so
# a latent under twice that goes whole. 16 pieces of a 16 MiB latent: the second hop starts
# after 1 MiB has crossed the first (8 ms at 1 Gbit), not 16 MiB (134 ms).
MAX_PARTS = 16
PART_MIN_BYTES = 1 << 20


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
UINT63 = 1 << 63
_KNOWN_IDS: set[str] = set()  # ids and tensor names that passed _ID: the hot path repeats them


def is_id(value: Any) -> bool:
    if type(value) is str and value in _KNOWN_IDS:
        return True
    if not isinstance(value, str) or not _ID.fullmatch(value):
        return False
    if len(_KNOWN_IDS) >= 4096:  # bounded: a peer sending fresh ids cannot grow it
        _KNOWN_IDS.clear()
    _KNOWN_IDS.add(value)
    return True


def is_uint(value: Any, bound: int = UINT63) -> bool:
    if type(value) is int:  # the common case, and never a bool
        return 0 <= value < bound
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


class TensorDigest:
    """``tensor_digest`` of a tensor of ``dtype`` and ``shape`` whose bytes come in runs, in
    order (a hit's latent in pieces, ``broker.parts``)."""

    def __init__(self, dtype: torch.dtype, shape: Sequence[int]) -> None:
        self._sha = hashlib.sha256()
        self._sha.update(f"{DTYPE_NAMES.get(dtype, dtype)}{list(shape)}".encode())

    def update(self, tensor: torch.Tensor) -> None:
        self._sha.update(tensor_bytes(tensor))

    def hexdigest(self) -> str:
        return self._sha.hexdigest()[:32]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A short hex digest of a tensor's dtype, shape and bytes: equal digests, equal bits.
    SHA-256, its first 128 bits: where the CPU has SHA instructions (recent x86 and ARM) it is
    about 3x faster than blake2b (7.8 against 23.6 ms per 16 MiB measured here), and it runs on
    the worker's critical path for every result it keeps."""
    digest = TensorDigest(tensor.dtype, tensor.shape)
    digest.update(tensor)
    return digest.hexdigest()


_SCALARS = (bool, int, float, str, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)  # exact types: one set lookup on the hot path


def check_body(kind: str, body: dict[str, Any], self_checked: frozenset[str]) -> None:
    """``check_plain`` of a body, but for the keys in ``self_checked``: those a message type
    parses and checks to the last element itself (an EVAL's or a RESULT's task list, on the
    hot path)."""
    for key, item in body.items():
        if type(key) is not str:
            raise WireError(f"{kind}: map keys must be strings, got {type(key).__name__}")
        if key not in self_checked and type(item) not in _SCALAR_TYPES:
            check_plain(kind, item, 1)


def check_plain(kind: str, value: Any, depth: int = 0) -> None:
    """Bodies hold plain data only: no bytes, extension types, timestamps or non-string keys."""
    if depth > 8:
        raise WireError(f"{kind}: body nested too deeply")
    kind_of = type(value)
    if kind_of is dict or (kind_of is not list and isinstance(value, dict)):
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise WireError(f"{kind}: map keys must be strings, got {type(key).__name__}")
            if type(item) not in _SCALAR_TYPES:
                check_plain(kind, item, depth + 1)
    elif kind_of is list or isinstance(value, list):
        for item in value:
            if type(item) not in _SCALAR_TYPES:
                check_plain(kind, item, depth + 1)
    elif not isinstance(value, _SCALARS):
        raise WireError(f"{kind}: {type(value).__name__} is not allowed in a body")


def check_type(kind: str, key: str, value: Any, types_: tuple[type, ...]) -> None:
    if type(value) in types_ and type(value) is not bool:  # the common, exact case
        return
    if isinstance(value, bool) and bool not in types_:
        raise WireError(f"{kind}: {key!r} must be {_names(types_)}, got a bool")
    if not isinstance(value, types_):
        raise WireError(f"{kind}: {key!r} must be {_names(types_)}, got {type(value).__name__}")


def _names(types_: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(t.__name__ for t in types_))


def check_ids(kind: str, epoch: Any, request: Any, task: Any, attempt: Any) -> None:
    if not is_uint(epoch, 1 << 64):
        raise WireError(f"bad epoch {epoch!r}")
    if request is not None and not is_id(request):
        raise WireError(f"bad request id {request!r}")
    for name, value in (("task", task), ("attempt", attempt)):
        if value is not None and not is_uint(value):
            raise WireError(f"bad {name} {value!r}")


# numpy has no bfloat16: its frames go out through a same-size integer view.
_NUMPY_VIEW = {torch.bfloat16: torch.int16}


def parts_for(nbytes: int) -> int:
    """How many pieces a hit's latent of ``nbytes`` is asked in: 1 (whole) under
    2 x ``PART_MIN_BYTES``, else pieces of at least ``PART_MIN_BYTES``, at most ``MAX_PARTS``."""
    return max(1, min(MAX_PARTS, nbytes // PART_MIN_BYTES))


def part_bounds(nbytes: int, element_size: int, parts: int) -> list[tuple[int, int]]:
    """The byte ranges ``[start, stop)`` a latent of ``nbytes`` is sent in when asked for
    ``parts`` pieces: equal runs of whole elements, the last one shorter where they do not
    divide (so there may be fewer than ``parts``). Both ends compute them; each PART must be
    exactly its range."""
    if nbytes <= 0 or element_size <= 0 or nbytes % element_size or not 1 <= parts <= MAX_PARTS:
        raise WireError(f"no parts for {nbytes} bytes of {element_size}-byte elements in {parts}")
    elements = nbytes // element_size
    per = -(-elements // parts) * element_size  # bytes a piece, whole elements
    return [(start, min(start + per, nbytes)) for start in range(0, nbytes, per)]


def split_bytes(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``tensor``'s bytes as the pieces ``part_bounds`` cuts them into, uint8 views of its
    memory (no copy). WireError where there are no bytes to cut."""
    raw = tensor_bytes(tensor)
    bounds = part_bounds(raw.nbytes, tensor.element_size(), parts)
    data = torch.frombuffer(raw, dtype=torch.uint8)
    return [data[start:stop] for start, stop in bounds]


def bytes_as(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A run of bytes (uint8, whole elements) as ``dtype``'s values: a view, or a copy where
    the run does not start at a multiple of the element size."""
    if data.data_ptr() % dtype.itemsize:
        data = data.clone()
    return data.view(dtype)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
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
