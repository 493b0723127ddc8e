"""Latents by name on the control plane (protocol 7): what an EVAL or a DECODE says its input is
when the latents stay on the workers, and what a RESULT says of the results it kept.

An input is the plan's operation over named results (``Ref``, ``Rectify``, ``Parareal``, or the
initial latent), each name with the workers that hold it (``Holder``: a data endpoint and, in a
CURVE pool, its public key). It is plain msgpack data, checked and bounded here; the worker that
receives it uses the results it holds itself and fetches the others from a holder. A RESULT by
name carries, per target, what the worker checked of the tensor it kept (``HeldResult``), and
(protocol 8) the fetches its inputs took (``Fetched``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from chords_mq.algorithms.base import Latent, Parareal, Rectify, Ref
from chords_mq.wire.base import DTYPES, UINT63, WireError, is_uint

# The name the initial latent has in a worker's store: never a task's (task ids count up from 0).
X0_REF = Ref(UINT63 - 1, 0)
MAX_HOLDERS = 8  # holders named per ref: the first that answers is enough
MAX_DROP_REFS = 256  # refs in one DROP (more go in several)
MAX_FETCHED = 64  # fetches one RESULT reports (16 tasks of up to 3 refs, and retries)
MAX_NDIM = 8
MAX_PUSHES = 16  # results one EVAL pushes, and pushed inputs one EVAL names
MAX_PUSH_TO = 4  # workers one result is pushed to

Op = Literal["x0", "ref", "rectify", "parareal"]
_ARITY = {"x0": 1, "ref": 1, "rectify": 3, "parareal": 3}


@dataclass(frozen=True)
class Holder:
    """A worker holding a result: its data endpoint, its CURVE public key (z85) if any, and
    the digest it reported for that result (``HeldResult.digest``), where the broker has one:
    the fetching worker checks what it received against it (an optional third field)."""

    endpoint: str
    key: str | None = None
    digest: str | None = None

    def to_wire(self) -> list[Any]:
        fields = [self.endpoint, self.key]
        return fields if self.digest is None else [*fields, self.digest]


@dataclass(frozen=True)
class NamedRef:
    ref: Ref
    holders: tuple[Holder, ...]


@dataclass(frozen=True)
class NamedInput:
    """A task's input (or a hit's latent) by name: ``op`` over ``refs``."""

    op: Op
    refs: tuple[NamedRef, ...]
    exclusive: bool = False

    def latent(self) -> Latent:
        """The plan's value this stands for (the initial latent as ``X0_REF``). An operation is
        computed out of place: held results are never overwritten (same bits)."""
        refs = [named.ref for named in self.refs]
        if self.op in ("x0", "ref"):
            return refs[0]
        if self.op == "rectify":
            return Rectify(refs[0], refs[1], refs[2], False)
        return Parareal(refs[0], refs[1], refs[2], False)

    def holders(self) -> dict[Ref, tuple[Holder, ...]]:
        return {named.ref: named.holders for named in self.refs}

    def to_wire(self) -> list[Any]:
        refs = [[n.ref.task, n.ref.target, [h.to_wire() for h in n.holders]] for n in self.refs]
        return [self.op, refs, self.exclusive]

    @classmethod
    def from_wire(cls, kind: str, value: Any) -> NamedInput:
        """Parse and check one input; WireError naming what is wrong."""
        if not (
            isinstance(value, list)
            and len(value) == 3
            and isinstance(value[0], str)
            and value[0] in _ARITY
        ):
            raise WireError(f"{kind}: input {str(value)[:100]} is not [op, refs, exclusive]")
        op, refs, exclusive = value
        if not isinstance(exclusive, bool):
            raise WireError(f"{kind}: input's exclusive must be a bool")
        if not isinstance(refs, list) or len(refs) != _ARITY[op]:
            raise WireError(f"{kind}: a {op} input names {_ARITY[op]} refs")
        named = []
        for item in refs:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and is_uint(item[0])
                and is_uint(item[1])
                and isinstance(item[2], list)
                and len(item[2]) <= MAX_HOLDERS
            ):
                raise WireError(
                    f"{kind}: ref {str(item)[:100]} is not [task, target, [holders]] with at "
                    f"most {MAX_HOLDERS} holders"
                )
            named.append(NamedRef(Ref(item[0], item[1]), tuple(_holder(kind, h) for h in item[2])))
        if op == "x0" and named[0].ref != X0_REF:
            raise WireError(f"{kind}: an x0 input names {named[0].ref}")
        return cls(op, tuple(named), exclusive)


@dataclass(frozen=True)
class Push:
    """Push the result ``target`` of the EVAL's task ``task`` to each of ``to`` (their data
    endpoints and CURVE keys) as soon as it exists: their workers will read it (issue 25)."""

    task: int
    target: int
    to: tuple[Holder, ...]

    @property
    def ref(self) -> Ref:
        return Ref(self.task, self.target)

    def to_wire(self) -> list[Any]:
        return [self.task, self.target, [[h.endpoint, h.key] for h in self.to]]

    @classmethod
    def from_wire(cls, kind: str, value: Any) -> Push:
        if not (
            isinstance(value, list)
            and len(value) == 3
            and is_uint(value[0])
            and is_uint(value[1])
            and isinstance(value[2], list)
            and 0 < len(value[2]) <= MAX_PUSH_TO
            and all(isinstance(h, list) and len(h) == 2 for h in value[2])
        ):
            raise WireError(
                f"{kind}: push {str(value)[:100]} is not [task, target, [[endpoint, key]]] with "
                f"1 to {MAX_PUSH_TO} endpoints"
            )
        return cls(value[0], value[1], tuple(_holder(kind, h) for h in value[2]))


def parse_pushes(kind: str, value: Any) -> tuple[Push, ...] | None:
    """An EVAL's ``push``: at most ``MAX_PUSHES`` (None: not sent)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_PUSHES:
        raise WireError(f"{kind}: push must be a list of 1 to {MAX_PUSHES} pushes")
    pushes = tuple(Push.from_wire(kind, item) for item in value)
    if len({push.ref for push in pushes}) != len(pushes):
        raise WireError(f"{kind}: a result is pushed twice")
    return pushes


def parse_pushed(kind: str, value: Any) -> tuple[Ref, ...] | None:
    """An EVAL's ``pushed``: the inputs pushed to its worker, at most ``MAX_PUSHES``."""
    if value is None:
        return None
    refs = parse_refs(kind, value, MAX_PUSHES)
    if not refs or len(set(refs)) != len(refs):
        raise WireError(f"{kind}: pushed must name 1 to {MAX_PUSHES} distinct refs")
    return refs


@dataclass(frozen=True)
class Fetched:
    """One fetch a worker made for an EVAL (protocol 8): from which data endpoint, how many
    tensor bytes, and the seconds from asking to having them; the broker learns the bandwidth
    between the two hosts from it (``broker.links``)."""

    endpoint: str
    nbytes: int
    seconds: float

    def to_wire(self) -> list[Any]:
        return [self.endpoint, self.nbytes, self.seconds]

    @classmethod
    def from_wire(cls, kind: str, value: Any) -> Fetched:
        if not (
            isinstance(value, list)
            and len(value) == 3
            and _is_endpoint(value[0])
            and is_uint(value[1])
            and isinstance(value[2], int | float)
            and not isinstance(value[2], bool)
            and math.isfinite(value[2])
            and 0 <= value[2] <= 3600
        ):
            raise WireError(
                f"{kind}: fetch {str(value)[:100]} is not [tcp://HOST:PORT, bytes, seconds]"
            )
        return cls(value[0], value[1], float(value[2]))


def parse_fetched(kind: str, value: Any) -> tuple[Fetched, ...] | None:
    """A RESULT's ``fetched``: at most ``MAX_FETCHED`` fetches (None: not sent)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_FETCHED:
        raise WireError(f"{kind}: fetched must be a list of at most {MAX_FETCHED} fetches")
    return tuple(Fetched.from_wire(kind, item) for item in value)


def _is_endpoint(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("tcp://") and len(value) <= 255


def _holder(kind: str, value: Any) -> Holder:
    if not (isinstance(value, list) and len(value) in (2, 3)):
        raise WireError(f"{kind}: holder {str(value)[:100]} is not [endpoint, key(, digest)]")
    endpoint, key, *digest = value
    if not _is_endpoint(endpoint):
        raise WireError(f"{kind}: holder endpoint {str(endpoint)[:100]!r} is not tcp://HOST:PORT")
    if key is not None and not (isinstance(key, str) and len(key) == 40 and key.isascii()):
        raise WireError(f"{kind}: holder key {str(key)[:60]!r} is not a z85 public key")
    if digest and not is_digest(digest[0]):
        raise WireError(
            f"{kind}: holder digest {str(digest[0])[:60]!r} is not {DIGEST_CHARS} hex characters"
        )
    return Holder(endpoint, key, *digest)


def named_input(value: Latent, holders_of: Callable[[Ref], tuple[Holder, ...]]) -> NamedInput:
    """``value`` (a plan's task input or hit by name; a tensor is the initial latent) as it
    goes on the wire, each ref with ``holders_of(ref)``."""
    if isinstance(value, Ref):
        return NamedInput("ref", (NamedRef(value, holders_of(value)),))
    if isinstance(value, Rectify | Parareal):
        op: Op = "rectify" if isinstance(value, Rectify) else "parareal"
        refs = tuple(NamedRef(ref, holders_of(ref)) for ref in value.refs())
        return NamedInput(op, refs, value.exclusive)
    return NamedInput("x0", (NamedRef(X0_REF, holders_of(X0_REF)),))


@dataclass(frozen=True)
class HeldResult:
    """What a worker checked of a result it kept: dtype, shape, bytes, and no NaN or Inf; and
    its digest (``wire.base.tensor_digest``: SHA-256/128 of dtype, shape and bytes), which the
    broker compares between workers of one device class to verify results without seeing
    them (``broker.verify``). The digest is optional on the wire (a fifth field)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    finite: bool
    digest: str | None = None

    def to_wire(self) -> list[Any]:
        fields = [self.dtype, list(self.shape), self.nbytes, self.finite]
        return fields if self.digest is None else [*fields, self.digest]

    @classmethod
    def from_wire(cls, kind: str, value: Any) -> HeldResult:
        if not (
            isinstance(value, list)
            and len(value) in (4, 5)
            and value[0] in DTYPES
            and isinstance(value[1], list)
            and len(value[1]) <= MAX_NDIM
            and all(is_uint(d, 1 << 40) for d in value[1])
            and is_uint(value[2])
            and isinstance(value[3], bool)
            and (len(value) == 4 or is_digest(value[4]))
        ):
            raise WireError(
                f"{kind}: held result {str(value)[:100]} is not [dtype, shape, bytes, finite"
                f"(, digest: {DIGEST_CHARS} hex characters)]"
            )
        return cls(value[0], tuple(value[1]), value[2], value[3], *value[4:])


DIGEST_CHARS = 32  # SHA-256's first 128 bits, in hex


def is_digest(value: Any) -> bool:
    """Is ``value`` a digest as ``tensor_digest`` writes it (32 lowercase hex)?"""
    return (
        isinstance(value, str)
        and len(value) == DIGEST_CHARS
        and all(c in "0123456789abcdef" for c in value)
    )


def parse_refs(kind: str, value: Any, bound: int) -> tuple[Ref, ...]:
    """A list of ``[task, target]`` of at most ``bound``."""
    if not isinstance(value, list) or len(value) > bound:
        raise WireError(f"{kind}: refs must be a list of at most {bound} [task, target]")
    refs = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(map(is_uint, item))):
            raise WireError(f"{kind}: ref {str(item)[:60]} is not [task, target]")
        refs.append(Ref(item[0], item[1]))
    return tuple(refs)
