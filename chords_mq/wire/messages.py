"""The message types: one frozen type per kind (``Kind``), its body fields checked against the
type's own annotations, and what a kind carries beyond plain fields (an EVAL's task entries and
latents, a RESULT's solver results, a PREPARED's solver frames), encoded and parsed by the type.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch

from chords_mq.algorithms.base import MAX_TARGETS, Ref
from chords_mq.wire.base import (
    DTYPES,
    MAX_PARTS,
    MAX_POOL_KEYS,
    MAX_TASKS,
    WireError,
    check_type,
    is_uint,
)
from chords_mq.wire.named import (
    DIGEST_CHARS,
    MAX_DROP_REFS,
    Fetched,
    HeldResult,
    NamedInput,
    Push,
    is_digest,
    parse_fetched,
    parse_pushed,
    parse_pushes,
    parse_refs,
)

# -- the message types -----------------------------------------------------------------------


class Kind(str, enum.Enum):
    """Every message kind. The value is what the header's ``kind`` says."""

    # worker -> broker
    HELLO = "HELLO"
    PREPARED = "PREPARED"
    RESULT = "RESULT"
    DECODED = "DECODED"
    FAILED = "FAILED"
    PART = "PART"  # a piece of a hit's latent: worker -> broker, and broker -> client
    # broker -> worker
    WELCOME = "WELCOME"
    POOL = "POOL"
    PREPARE = "PREPARE"
    EVAL = "EVAL"
    DECODE = "DECODE"
    RELEASE = "RELEASE"
    DROP = "DROP"
    COMPARE = "COMPARE"  # (its answer, COMPARED, is worker -> broker)
    COMPARED = "COMPARED"
    # both directions, every peer
    HEARTBEAT = "HEARTBEAT"
    DISCONNECT = "DISCONNECT"
    # client -> broker
    SUBMIT = "SUBMIT"
    CANCEL = "CANCEL"
    STATUS = "STATUS"  # also the broker's reply
    # broker -> client (ERROR also to a worker at the client port)
    ACCEPTED = "ACCEPTED"
    PROGRESS = "PROGRESS"
    HIT = "HIT"
    DONE = "DONE"
    ERROR = "ERROR"

    # A str's own hash, in C: Enum's is a Python call, and kinds are dict and set keys on the
    # hot path. Consistent with equality, which is the str's (Kind.EVAL == "EVAL").
    __hash__ = str.__hash__


M = TypeVar("M", bound="Message")
# The header fields every message has; a type's other fields are its body (and its tensors).
HEADER_FIELDS = ("epoch", "request", "task", "attempt")


@dataclass(frozen=True, kw_only=True, eq=False)
class Message:
    """The fields every message carries in its header. A kind's type adds its body fields (plain
    values, checked against the type's annotations) and, where it has any, its tensors."""

    KIND: ClassVar[Kind]
    NAME: ClassVar[str]  # KIND's value, set at registration (an enum's .value costs a call)
    # Fields that hold tensors or typed entries: the type encodes and parses them itself.
    SPECIAL: ClassVar[frozenset[str]] = frozenset()
    # The body keys the type writes and reads itself (``_special_body``, ``_parse_special``).
    BODY_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Body keys the type's parser checks element by element (plain-data checks skip them).
    SELF_CHECKED: ClassVar[frozenset[str]] = frozenset()
    # Optional fields sent even when None (a reader may expect the key).
    ALWAYS: ClassVar[frozenset[str]] = frozenset()
    _schema: ClassVar[dict[str, tuple[tuple[type, ...], bool]]]
    _body_keys: ClassVar[frozenset[str]]  # every key a body may hold

    epoch: int = 0
    request: str | None = None
    task: int | None = None
    attempt: int | None = None

    @property
    def kind(self) -> Kind:
        return self.KIND

    def stamped(self: M, epoch: int) -> M:
        """This message under ``epoch`` (the broker stamps its own on everything it sends)."""
        return self if self.epoch == epoch else dataclasses.replace(self, epoch=epoch)

    def ids(self: M, other: Message) -> M:
        """This message with ``other``'s epoch, request, task and attempt (an answer's)."""
        if (self.epoch, self.request, self.task, self.attempt) == (
            other.epoch,
            other.request,
            other.task,
            other.attempt,
        ):
            return self
        return dataclasses.replace(
            self,
            epoch=other.epoch,
            request=other.request,
            task=other.task,
            attempt=other.attempt,
        )

    def body(self) -> dict[str, Any]:
        """The header's body: the plain fields (a field left at None is not sent)."""
        out = {}
        for name in self._schema:
            value = getattr(self, name)
            if value is not None or name in self.ALWAYS:
                out[name] = value
        out.update(self._special_body())
        return out

    def _special_body(self) -> dict[str, Any]:
        return {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor frames, by name, in frame order (none for most kinds)."""
        return {}

    @classmethod
    def parse(
        cls: type[M], ids: dict[str, Any], body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> M:
        """Build this type from a decoded header and its frames; WireError if they break it."""
        values = _plain_fields(cls, body)
        values.update(cls._parse_special(body, tensors))
        return cls(**ids, **values)

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError(f"{cls.NAME} carries no tensors, got {sorted(tensors)}")
        return {}


TYPES: dict[Kind, type[Message]] = {}
BY_NAME: dict[str, type[Message]] = {}  # the same, by the header's kind string
_ANY = object()  # "any plain value" in a schema


def _register(cls: type[M]) -> type[M]:
    """Derive a message type's body schema from its annotations and file it under its kind."""
    hints = typing.get_type_hints(cls)
    stray = cls.SPECIAL - {item.name for item in dataclasses.fields(cls)} - set(HEADER_FIELDS)
    if stray:
        raise TypeError(f"{cls.__name__}: SPECIAL names no field of it: {sorted(stray)}")
    schema: dict[str, tuple[tuple[type, ...], bool]] = {}
    for item in dataclasses.fields(cls):
        if item.name in HEADER_FIELDS or item.name in cls.SPECIAL:
            continue
        missing = dataclasses.MISSING
        required = item.default is missing and item.default_factory is missing
        schema[item.name] = (_accepted_types(hints[item.name]), required)
    cls._schema = schema
    cls._body_keys = frozenset(schema) | cls.BODY_KEYS
    if cls.KIND in TYPES:
        raise TypeError(f"{cls.KIND} has two types: {TYPES[cls.KIND].__name__}, {cls.__name__}")
    TYPES[cls.KIND] = cls
    BY_NAME[cls.KIND.value] = cls
    cls.NAME = cls.KIND.value
    return cls


def _accepted_types(hint: Any) -> tuple[type, ...]:
    """The Python types a body field's annotation admits on the wire (a float admits an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _accepted_types(arg))
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (int, float)
    if origin is not None:  # list[int], dict[str, Any] ...
        return (origin,)
    return (hint,)


def _plain_fields(cls: type[Message], body: dict[str, Any]) -> dict[str, Any]:
    name = cls.NAME
    values = {}
    for key, (kinds, required) in cls._schema.items():
        if key not in body:
            if required:
                raise WireError(f"{name}: body lacks {key!r}")
            continue
        value = body[key]
        check_type(name, key, value, kinds)
        values[key] = value
    known = cls._body_keys
    for key in body:
        if key not in known:
            raise WireError(f"{name}: unknown body field {key!r}")
    return values


# worker -> broker ------------------------------------------------------------------------------


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class HelloMessage(Message):
    """A worker registers: who it is, what it serves. ``session`` is one id per worker socket,
    so a HELLO repeated on it (queued while the link was down) is answered again without
    dropping the worker's state. ``solver``: what the worker runs for its model's scheduler,
    in words (e.g. "DDIMScheduler (first order of PNDMScheduler)"), shown in STATUS. ``data``:
    the endpoint its data server advertises (``tcp://host:port``), where other workers of the
    pool fetch the results it holds. ``device_class``: the kind of device and torch build it
    computes on (``workers.device_class``); workers of one class give the same bits, so the
    broker verifies their results by digest (``broker.verify``)."""

    KIND = Kind.HELLO
    worker: str
    model: str
    device: str
    dtype: str
    max_batch: int
    version: str
    capabilities: list[str] | None = None
    protocol: int = 1
    session: str | None = None
    solver: str | None = None
    data: str | None = None
    device_class: str | None = None


class SolverSpec(NamedTuple):
    """A solver as PREPARED carries it: plain fields and named tensors (``solver.<name>``)."""

    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]


SOLVER_PREFIX = "solver."


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedMessage(Message):
    """A worker prepared a request: its solver spec, the digest of its initial latent (so the
    broker can tell two workers would start from the same x0) and, if asked, x0 itself. It
    declares the latent's ``shape`` and ``dtype`` and, where its adapter knows it, the dtype of
    its results (``result_dtype``), so the broker checks sizes before any tensor arrives; a
    worker asked for x0 withholds it past the PREPARE's ``max_latent_bytes``."""

    KIND = Kind.PREPARED
    SPECIAL = frozenset({"solver", "x0"})
    BODY_KEYS = frozenset({"solver"})
    solver: SolverSpec
    x0_digest: str
    x0: torch.Tensor | None = None
    prepare_s: float | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    result_dtype: str | None = None

    def _special_body(self) -> dict[str, Any]:
        return {"solver": self.solver.fields}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        frames = {f"{SOLVER_PREFIX}{name}": t for name, t in self.solver.tensors.items()}
        if self.x0 is not None:
            frames["x0"] = self.x0
        return frames

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        fields = body.get("solver")
        if not isinstance(fields, dict):
            raise WireError("PREPARED: body lacks the solver spec 'solver' (a map)")
        solver, x0 = {}, None
        for name, tensor in tensors.items():
            if name == "x0":
                x0 = tensor
            elif name.startswith(SOLVER_PREFIX):
                solver[name.removeprefix(SOLVER_PREFIX)] = tensor
            else:
                raise WireError(f"PREPARED: unexpected tensor {name!r}")
        return {"solver": SolverSpec(fields, solver), "x0": x0}


class TaskEntry(NamedTuple):
    """One task of an EVAL: evaluate the latent at ``step`` and return the solver result at
    each of ``targets`` (ascending, each above ``step``)."""

    task: int
    attempt: int
    step: int
    core: int
    targets: tuple[int, ...]


class ResultEntry(NamedTuple):
    """One task of a RESULT: ``results[j]`` is ``S(x, f(x, step), step, j)`` for each target;
    by name (``held``, protocol 7) the worker kept the tensors and says what it checked of
    each instead (``results`` is then empty)."""

    task: int
    attempt: int
    results: dict[int, torch.Tensor]
    held: dict[int, HeldResult] | None = None


def _is_targets(value: Any, above: int = -1) -> bool:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TARGETS:
        return False
    previous = above
    for target in value:
        if not is_uint(target) or target <= previous:
            return False
        previous = target
    return True


def _task_list(kind: str, body: dict[str, Any]) -> list[Any]:
    entries = body.get("tasks")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_TASKS:
        raise WireError(f"{kind}: tasks must be a list of 1 to {MAX_TASKS} entries")
    return entries


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class ResultMessage(Message):
    """A worker's answer to an EVAL: for each task, the solver result at each of its targets
    (frames ``result.<i>.<k>``: task i's result at its k-th target). The header's task and
    attempt are the EVAL's. ``fetched`` (protocol 8): the inputs it pulled from other workers
    for it, each [endpoint, bytes, seconds]: what the broker learns each link's bandwidth from."""

    KIND = Kind.RESULT
    SPECIAL = frozenset({"entries", "fetched"})
    BODY_KEYS = frozenset({"tasks", "fetched"})
    SELF_CHECKED = frozenset({"tasks", "fetched"})
    entries: tuple[ResultEntry, ...]
    compute_s: float | None = None
    fetched: tuple[Fetched, ...] | None = None
    # ``cold``: the worker's first forward of this latent's shape and dtype since it started
    # (allocations, on a GPU its kernels' autotuning): slower than the worker is, so the broker
    # learns no speed from it (``WorkerInfo.observe``), once per worker and size.
    cold: bool | None = None

    def _special_body(self) -> dict[str, Any]:
        tasks: list[list[Any]] = []
        for e in self.entries:
            if e.held is not None:
                targets = sorted(e.held)
                tasks.append([e.task, e.attempt, targets, [e.held[t].to_wire() for t in targets]])
            else:
                tasks.append([e.task, e.attempt, sorted(e.results)])
        if self.fetched is not None:
            return {"tasks": tasks, "fetched": [f.to_wire() for f in self.fetched]}
        return {"tasks": tasks}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        frames = {}
        for i, entry in enumerate(self.entries):
            for k, target in enumerate(sorted(entry.results)):
                frames[f"result.{i}.{k}"] = entry.results[target]
        return frames

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        parsed = []
        count = 0
        for index, entry in enumerate(_task_list("RESULT", body)):
            if not (
                isinstance(entry, list)
                and len(entry) in (3, 4)
                and is_uint(entry[0])
                and is_uint(entry[1])
                and _is_targets(entry[2])
            ):
                raise WireError(
                    f"RESULT: task entry {entry!r} is not [task, attempt, [targets]] with 1 to "
                    f"{MAX_TARGETS} ascending targets (and [held] by name)"
                )
            if len(entry) == 4:  # by name: no tensors, what the worker checked of each
                metas = entry[3]
                if not isinstance(metas, list) or len(metas) != len(entry[2]):
                    raise WireError("RESULT: one held result per target")
                held = {t: HeldResult.from_wire("RESULT", m) for t, m in zip(entry[2], metas)}
                parsed.append(ResultEntry(entry[0], entry[1], {}, held))
                continue
            results = {}
            for k, target in enumerate(entry[2]):
                tensor = tensors.get(f"result.{index}.{k}")
                if tensor is None:
                    raise WireError(f"RESULT: tensor result.{index}.{k} is missing")
                results[target] = tensor
            count += len(results)
            parsed.append(ResultEntry(entry[0], entry[1], results))
        if len(tensors) != count:
            raise WireError(f"RESULT: {len(tensors)} tensors for {count} results")
        return {"entries": tuple(parsed), "fetched": parse_fetched("RESULT", body.get("fetched"))}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class DecodedMessage(Message):
    """A worker's answer to a DECODE: the hit's decoded pixels (uint8), if it made any."""

    KIND = Kind.DECODED
    SPECIAL = frozenset({"media", "latent"})
    media: torch.Tensor | None = None
    compute_s: float | None = None
    latent: torch.Tensor | None = None  # a DECODE by name that asked for the hit's latent
    parts: int | None = None  # a DECODE that asked for parts: the PARTs sent before it

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        frames = {} if self.media is None else {"media": self.media}
        if self.latent is not None:
            frames["latent"] = self.latent
        return frames

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if set(tensors) - {"media", "latent"}:
            extra = sorted(set(tensors) - {"media", "latent"})
            raise WireError(f"DECODED: unexpected tensors {extra}")
        if body.get("parts") is not None and (
            "latent" in tensors or not 1 <= body["parts"] <= MAX_PARTS
        ):
            raise WireError(f"DECODED: parts must be 1 to {MAX_PARTS}, and then no latent")
        return {"media": tensors.get("media"), "latent": tensors.get("latent")}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class PartMessage(Message):
    """One piece of a hit's latent (``wire.part_bounds``: piece ``index`` of ``parts``, its
    bytes as ``data``), in order. From a worker, before the DECODED that completes it (the
    header's task is the decode's id); from the broker, to the client, before the HIT of
    ``core`` that completes it. A piece of index 0 starts the latent over."""

    KIND = Kind.PART
    SPECIAL = frozenset({"data"})
    index: int
    parts: int
    data: torch.Tensor
    core: int | None = None  # broker -> client: the hit's core

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        data = tensors.get("data")
        if set(tensors) != {"data"} or data is None or data.dtype != torch.uint8:
            raise WireError("PART carries exactly the uint8 tensor 'data'")
        if data.dim() != 1 or data.numel() == 0:
            raise WireError("PART: 'data' must be a non-empty run of bytes")
        parts, index = body["parts"], body["index"]
        if not 1 <= parts <= MAX_PARTS or not 0 <= index < parts:
            raise WireError(f"PART: index {index} of {parts} (at most {MAX_PARTS} parts)")
        core = body.get("core")
        if core is not None and not is_uint(core, 1 << 16):
            raise WireError(f"PART: bad core {core!r}")
        return {"data": data}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class FailedMessage(Message):
    """A worker could not do a job: why (``code``: not_prepared, invalid_request, worker_error,
    bad_message), and for an EVAL the ``[task, attempt]`` pairs it carried."""

    KIND = Kind.FAILED
    SPECIAL = frozenset({"tasks"})
    BODY_KEYS = frozenset({"tasks"})
    SELF_CHECKED = frozenset({"tasks"})
    code: str
    message: str
    tasks: tuple[tuple[int, int], ...] = ()
    # lost_input (protocol 7): the [task, target] of an input no holder gave, and the holder
    # tried last (its data endpoint); checked by the broker. corrupt_input: the same, the
    # holder being one whose bytes did not have the digest it reported
    lost_ref: list[int] | None = None
    lost_holder: str | None = None

    def _special_body(self) -> dict[str, Any]:
        return {"tasks": [list(pair) for pair in self.tasks]} if self.tasks else {}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("FAILED carries no tensors")
        entries = body.get("tasks", [])
        if not isinstance(entries, list) or len(entries) > MAX_TASKS:
            raise WireError(f"FAILED: tasks must be a list of at most {MAX_TASKS} entries")
        pairs = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and all(map(is_uint, entry))):
                raise WireError(f"FAILED: task entry {entry!r} is not [task, attempt]")
            pairs.append((entry[0], entry[1]))
        return {"tasks": tuple(pairs)}


# broker -> worker ------------------------------------------------------------------------------


def _pool_keys(kind: str, body: dict[str, Any]) -> tuple[str, ...] | None:
    keys = body.get("pool_keys")
    if keys is None:
        return None
    if not isinstance(keys, list) or len(keys) > MAX_POOL_KEYS:
        raise WireError(f"{kind}: pool_keys must be a list of at most {MAX_POOL_KEYS} keys")
    for key in keys:
        if not (isinstance(key, str) and len(key) == 40 and key.isascii()):
            raise WireError(f"{kind}: {key!r} in pool_keys is not a z85 public key")
    return tuple(keys)


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class WelcomeMessage(Message):
    """The broker accepted a HELLO; the header's epoch is the broker's. In a CURVE pool
    ``pool_keys`` are the public keys of the pool's workers (z85): the only peers the worker's
    data server admits."""

    KIND = Kind.WELCOME
    SPECIAL = frozenset({"pool_keys"})
    BODY_KEYS = frozenset({"pool_keys"})
    SELF_CHECKED = frozenset({"pool_keys"})
    heartbeat_ms: int
    pool_keys: tuple[str, ...] | None = None

    def _special_body(self) -> dict[str, Any]:
        return {} if self.pool_keys is None else {"pool_keys": list(self.pool_keys)}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("WELCOME carries no tensors")
        return {"pool_keys": _pool_keys("WELCOME", body)}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class PoolMessage(Message):
    """The pool's worker keys changed (the broker re-read its allow-list): the worker's data
    server admits exactly these from now on, its open connections included."""

    KIND = Kind.POOL
    SPECIAL = frozenset({"pool_keys"})
    BODY_KEYS = frozenset({"pool_keys"})
    SELF_CHECKED = frozenset({"pool_keys"})
    pool_keys: tuple[str, ...]

    def _special_body(self) -> dict[str, Any]:
        return {"pool_keys": list(self.pool_keys)}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("POOL carries no tensors")
        keys = _pool_keys("POOL", body)
        if keys is None:
            raise WireError("POOL: body lacks 'pool_keys'")
        return {"pool_keys": keys}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class PrepareMessage(Message):
    """Prepare a request (encode its prompt once, cache the context); ``initial``: send x0,
    unless it is larger than ``max_latent_bytes`` (the broker would refuse it as too large)."""

    KIND = Kind.PREPARE
    SPECIAL = frozenset({"spec"})
    BODY_KEYS = frozenset({"request"})
    spec: dict[str, Any]  # RequestSpec.to_dict(); the body's "request"
    initial: bool = True
    max_latent_bytes: int | None = None

    def _special_body(self) -> dict[str, Any]:
        return {"request": self.spec}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        return _request_field("PREPARE", body, tensors)


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class EvalMessage(Message):
    """Evaluate tasks (usually one; up to ``MAX_TASKS`` in batch mode), each with its input
    latent (frames ``latent.<i>``). The header's task and attempt are the first task's, which
    the answer echoes."""

    KIND = Kind.EVAL
    SPECIAL = frozenset({"entries", "latents", "inputs", "push", "pushed"})
    BODY_KEYS = frozenset({"tasks", "inputs", "push", "pushed"})
    SELF_CHECKED = frozenset({"tasks", "inputs", "push", "pushed"})
    entries: tuple[TaskEntry, ...]
    latents: tuple[torch.Tensor, ...] = ()
    # By name (protocol 7): each task's input as the plan's operation over named results at
    # their holders, instead of ``latents``; ``dtype`` is what a fetched result must be.
    inputs: tuple[NamedInput, ...] | None = None
    dtype: str | None = None
    # ``chain`` (by name): the entries are one core's consecutive steps, run one after another,
    # each reading the fine result of the one before, kept here; each entry answers with its
    # own RESULT as it finishes (the header's task and attempt are that entry's).
    chain: bool | None = None
    # ``digests`` False: kept results are reported without their digest (the broker verifies
    # nothing: ``--verify off``); None or True: each one's digest (``HeldResult.digest``).
    digests: bool | None = None
    # By name (issue 25): ``push``, results of this EVAL's tasks its worker sends, once kept, to
    # the workers that will read them (over the data plane, a PUT each); ``pushed``, inputs of
    # its tasks that their producers push here: used if they came, waited for (bounded) if on
    # their way, else fetched from a holder.
    push: tuple[Push, ...] | None = None
    pushed: tuple[Ref, ...] | None = None

    def steps(self) -> tuple[EvalMessage, ...]:
        """A chain as the EVALs a worker runs in a row: one per entry, with that entry's ids
        (what its RESULT carries). Not a chain (or not by name): itself."""
        if not self.chain or self.inputs is None or len(self.inputs) != len(self.entries):
            return (self,)
        return tuple(
            dataclasses.replace(
                self,
                entries=(entry,),
                inputs=(value,),
                chain=None,
                task=entry.task,
                attempt=entry.attempt,
                push=tuple(p for p in self.push or () if p.task == entry.task) or None,
            )
            for entry, value in zip(self.entries, self.inputs, strict=True)
        )

    def _special_body(self) -> dict[str, Any]:
        tasks = [[e.task, e.attempt, e.step, e.core, list(e.targets)] for e in self.entries]
        if self.inputs is None:
            return {"tasks": tasks}
        body: dict[str, Any] = {"tasks": tasks, "inputs": [v.to_wire() for v in self.inputs]}
        if self.push:
            body["push"] = [push.to_wire() for push in self.push]
        if self.pushed:
            body["pushed"] = [[ref.task, ref.target] for ref in self.pushed]
        return body

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"latent.{i}": latent for i, latent in enumerate(self.latents)}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        entries, latents = [], []
        for index, entry in enumerate(_task_list("EVAL", body)):
            if not (
                isinstance(entry, list)
                and len(entry) == 5
                and all(is_uint(value) for value in entry[:4])
                and _is_targets(entry[4], above=entry[2])
            ):
                raise WireError(
                    f"EVAL: task entry {entry!r} is not [task, attempt, step, core, [targets]] "
                    f"with 1 to {MAX_TARGETS} ascending targets above the step"
                )
            task, attempt, step, core, targets = entry
            entries.append(TaskEntry(task, attempt, step, core, tuple(targets)))
            if "inputs" in body:
                continue
            latent = tensors.get(f"latent.{index}")
            if latent is None:
                raise WireError(f"EVAL: tensor latent.{index} is missing")
            latents.append(latent)
        if "inputs" in body:
            raw = body["inputs"]
            if not isinstance(raw, list) or len(raw) != len(entries):
                raise WireError("EVAL: inputs must be one input per task")
            if tensors:
                raise WireError("EVAL: an EVAL by name carries no tensors")
            inputs = tuple(NamedInput.from_wire("EVAL", value) for value in raw)
            push = parse_pushes("EVAL", body.get("push"))
            made = {(e.task, target) for e in entries for target in e.targets}
            if push is not None and any((p.task, p.target) not in made for p in push):
                raise WireError("EVAL: a push names a result the EVAL does not make")
            return {
                "entries": tuple(entries),
                "latents": (),
                "inputs": inputs,
                "push": push,
                "pushed": parse_pushed("EVAL", body.get("pushed")),
            }
        if "push" in body or "pushed" in body:
            raise WireError("EVAL: push and pushed are for an EVAL by name")
        if len(tensors) != len(entries):
            raise WireError(f"EVAL: {len(tensors)} tensors for {len(entries)} tasks")
        return {"entries": tuple(entries), "latents": tuple(latents)}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class DecodeMessage(Message):
    """Decode a hit's latent to pixels; the header's task is the decode's id."""

    KIND = Kind.DECODE
    SPECIAL = frozenset({"latent", "value"})
    BODY_KEYS = frozenset({"value"})
    SELF_CHECKED = frozenset({"value"})
    latent: torch.Tensor | None = None
    # By name (protocol 7): the hit's latent as an operation over named results, computed by
    # the worker; ``media``: decode it to pixels; ``want_latent``: send the latent back.
    value: NamedInput | None = None
    media: bool | None = None
    want_latent: bool | None = None
    # the latent back in this many pieces (``wire.part_bounds``): PARTs, then the DECODED;
    # only to a worker whose HELLO lists "parts"
    parts: int | None = None

    def _special_body(self) -> dict[str, Any]:
        if self.value is None and self.latent is None:
            raise WireError("DECODE needs a latent or a value by name")
        return {} if self.value is None else {"value": self.value.to_wire()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.latent is None else {"latent": self.latent}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        parts = body.get("parts")
        if parts is not None and (not 1 <= parts <= MAX_PARTS or not body.get("want_latent")):
            raise WireError(f"DECODE: parts must be 1 to {MAX_PARTS}, for a latent sent back")
        if "value" in body:
            if tensors:
                raise WireError("DECODE by name carries no tensors")
            return {"value": NamedInput.from_wire("DECODE", body["value"])}
        if set(tensors) != {"latent"}:
            raise WireError(f"DECODE needs exactly the tensor 'latent', got {sorted(tensors)}")
        return {"latent": tensors["latent"]}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class ReleaseMessage(Message):
    """Forget the request's context (the header's request)."""

    KIND = Kind.RELEASE


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class DropMessage(Message):
    """Let go of these results of the request (no later task or hit reads them): at most
    ``MAX_DROP_REFS`` per message."""

    KIND = Kind.DROP
    SPECIAL = frozenset({"refs"})
    BODY_KEYS = frozenset({"refs"})
    SELF_CHECKED = frozenset({"refs"})
    refs: tuple[Ref, ...]

    def _special_body(self) -> dict[str, Any]:
        return {"refs": [[ref.task, ref.target] for ref in self.refs]}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("DROP carries no tensors")
        return {"refs": parse_refs("DROP", body.get("refs"), MAX_DROP_REFS)}


MAX_COMPARE_REFS = MAX_TARGETS  # results one COMPARE compares: one task's


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class CompareMessage(Message):
    """Verification across device classes (``broker.verify``): fetch each result of
    ``theirs`` (a ref at its holders, as an EVAL's input; of ``dtype``) and tell how far it is
    from the result of ``mine`` at the same place, which this worker holds (COMPARED). Sent only
    to a worker whose HELLO lists the capability "compare"; the header's task is the check's.

    Without ``mine`` it is a *probe* (``broker.probes``): fetch each of ``theirs`` as served,
    its holder named without a digest, and tell the digest of what arrived (COMPARED
    ``digests``), so the broker judges a corrupt_input claim. Sent only to a worker whose HELLO
    lists the capability "probe"; the header's task is the probe's id."""

    KIND = Kind.COMPARE
    SPECIAL = frozenset({"mine", "theirs"})
    BODY_KEYS = frozenset({"mine", "theirs"})
    SELF_CHECKED = frozenset({"mine", "theirs"})
    mine: tuple[Ref, ...]
    theirs: tuple[NamedInput, ...]
    dtype: str

    def _special_body(self) -> dict[str, Any]:
        return {
            "mine": [[ref.task, ref.target] for ref in self.mine],
            "theirs": [value.to_wire() for value in self.theirs],
        }

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("COMPARE carries no tensors")
        mine = parse_refs("COMPARE", body.get("mine"), MAX_COMPARE_REFS)
        raw = body.get("theirs")
        if not isinstance(raw, list) or not raw or (mine and len(raw) != len(mine)):
            raise WireError(
                "COMPARE: theirs must name one result for each of mine (at least 1), or, a "
                f"probe without mine, 1 to {MAX_COMPARE_REFS} results"
            )
        if len(raw) > MAX_COMPARE_REFS:
            raise WireError(f"COMPARE: theirs names more than {MAX_COMPARE_REFS} results")
        theirs = tuple(NamedInput.from_wire("COMPARE", value) for value in raw)
        if any(value.op != "ref" for value in theirs):
            raise WireError("COMPARE: each of theirs is one result (a ref input)")
        return {"mine": mine, "theirs": theirs}

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise WireError(f"COMPARE: dtype {self.dtype[:40]!r} is not a latent dtype")


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class ComparedMessage(Message):
    """A COMPARE's answer, its ids echoed: for each pair, ``[max_rel, rms_rel]`` (float32:
    max |a-b| and rms(a-b), each over the larger result's; ``algorithms.distance``), numbers >= 0
    (``inf`` for a NaN or Inf, or another shape); or ``error``: it could not compare (a result
    it could not fetch or no longer holds). A probe's answer (a COMPARE without ``mine``)
    carries ``digests`` instead: ``tensor_digest`` of each result of ``theirs`` as it arrived
    (optional on the wire: sent only when not empty)."""

    KIND = Kind.COMPARED
    SPECIAL = frozenset({"distances", "digests"})
    BODY_KEYS = frozenset({"distances", "digests"})
    SELF_CHECKED = frozenset({"distances", "digests"})
    distances: tuple[tuple[float, float], ...] = ()
    digests: tuple[str, ...] = ()
    error: str | None = None

    def _special_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"distances": [list(pair) for pair in self.distances]}
        if self.digests:
            body["digests"] = list(self.digests)
        return body

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("COMPARED carries no tensors")
        raw = body.get("distances", [])
        if not isinstance(raw, list) or len(raw) > MAX_COMPARE_REFS:
            raise WireError(f"COMPARED: distances must be a list of at most {MAX_COMPARE_REFS}")
        pairs = []
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in item
                )
            ):
                raise WireError(f"COMPARED: {str(item)[:60]} is not [max_rel, rms_rel], each >= 0")
            pairs.append((float(item[0]), float(item[1])))
        digests = body.get("digests", [])
        if not isinstance(digests, list) or len(digests) > MAX_COMPARE_REFS:
            raise WireError(f"COMPARED: digests must be a list of at most {MAX_COMPARE_REFS}")
        for digest in digests:
            if not is_digest(digest):
                raise WireError(
                    f"COMPARED: digest {str(digest)[:60]!r} is not {DIGEST_CHARS} hex characters"
                )
        return {"distances": tuple(pairs), "digests": tuple(digests)}


# both directions -------------------------------------------------------------------------------


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class HeartbeatMessage(Message):
    """Liveness, both ways. A client's lists (a page of) the request ids it waits on
    (``in_flight``); the broker's reply names those it does not know (``missing``: lost, the
    client resubmits them). A worker's carries neither."""

    KIND = Kind.HEARTBEAT
    in_flight: list[str] | None = None
    missing: list[str] | None = None


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class DisconnectMessage(Message):
    """Leave (a worker shutting down), or be told to register again; ``shutdown``: the broker
    is stopping in order."""

    KIND = Kind.DISCONNECT
    reason: str | None = None
    shutdown: bool | None = None


# client -> broker ------------------------------------------------------------------------------


def _request_field(
    kind: str, body: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    if tensors:
        raise WireError(f"{kind} carries no tensors")
    spec = body.get("request")
    if not isinstance(spec, dict):
        raise WireError(f"{kind}: body lacks 'request' (a map)")
    return {"spec": spec}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class SubmitMessage(Message):
    """A new request (the header's request id is the client's own). ``wait_for_worker_s``: wait
    that long for a worker of the model instead of failing at once."""

    KIND = Kind.SUBMIT
    SPECIAL = frozenset({"spec"})
    BODY_KEYS = frozenset({"request"})
    spec: dict[str, Any]  # RequestSpec.to_dict(); the body's "request"
    wait_for_worker_s: float | None = None
    hit_parts: bool | None = None  # the client takes a hit's latent in PARTs

    def _special_body(self) -> dict[str, Any]:
        return {"request": self.spec}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        return _request_field("SUBMIT", body, tensors)


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class CancelMessage(Message):
    """Cancel the client's request of the header's id."""

    KIND = Kind.CANCEL


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class StatusMessage(Message):
    """A client asks for a page (``offset``); the broker's reply lists at most ``STATUS_PAGE``
    workers and sessions from there, and the totals."""

    KIND = Kind.STATUS
    offset: int | None = None
    workers: list[Any] | None = None
    sessions: list[Any] | None = None
    status_epoch: int | None = None  # the body's "epoch": the broker's
    sessions_total: int | None = None
    workers_total: int | None = None
    role: str | None = None
    SPECIAL = frozenset({"status_epoch"})
    BODY_KEYS = frozenset({"epoch"})

    def _special_body(self) -> dict[str, Any]:
        return {} if self.status_epoch is None else {"epoch": self.status_epoch}

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if tensors:
            raise WireError("STATUS carries no tensors")
        epoch = body.get("epoch")
        if epoch is not None and not is_uint(epoch, 1 << 64):
            raise WireError(f"STATUS: 'epoch' must be int, got {type(epoch).__name__}")
        return {"status_epoch": epoch}


# broker -> client ------------------------------------------------------------------------------


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class AcceptedMessage(Message):
    """The broker took a request: its shape (steps, method, the rounds its hits land at), the
    init sequence and cores it granted (``requested_cores``: asked), the workers it has."""

    KIND = Kind.ACCEPTED
    ALWAYS = frozenset({"init_sequence"})  # None for a sequential request
    steps: int
    method: str
    hit_rounds: list[Any]
    init_sequence: list[int] | None = None
    workers: int | None = None
    cores: int | None = None
    requested_cores: int | None = None


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class ProgressMessage(Message):
    """How far a request is; ``waiting`` ({"for": "worker", "model", "since_s", "fails_in_s"})
    while no worker serves it."""

    KIND = Kind.PROGRESS
    evaluations: int
    hits: int | None = None
    cores: list[Any] | None = None
    waiting: dict[str, Any] | None = None


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class HitMessage(Message):
    """One core's output: its latent and/or its decoded media."""

    KIND = Kind.HIT
    SPECIAL = frozenset({"latent", "media"})
    core: int
    round: int
    steps: int
    elapsed_s: float
    latent: torch.Tensor | None = None
    media: torch.Tensor | None = None
    # the latent came before it in this many PARTs (a client whose SUBMIT said hit_parts):
    # their bytes, in order, are a tensor of ``dtype`` and ``shape``
    parts: int | None = None
    shape: list[int] | None = None
    dtype: str | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        frames = {}
        if self.latent is not None:
            frames["latent"] = self.latent
        if self.media is not None:
            frames["media"] = self.media
        return frames

    @classmethod
    def _parse_special(
        cls, body: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        if set(tensors) - {"latent", "media"}:
            raise WireError(f"HIT: unexpected tensors {sorted(set(tensors) - {'latent', 'media'})}")
        if body.get("parts") is not None:
            shape = body.get("shape")
            if (
                not 1 <= body["parts"] <= MAX_PARTS
                or "latent" in tensors
                or body.get("dtype") not in DTYPES
                or not isinstance(shape, list)
                or not 1 <= len(shape) <= 8
                or not all(is_uint(n, 1 << 40) for n in shape)
            ):
                raise WireError("HIT: parts needs its dtype and shape, and no latent")
        return {"latent": tensors.get("latent"), "media": tensors.get("media")}


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class DoneMessage(Message):
    """The request is over; its stats (``cancelled`` when it was)."""

    KIND = Kind.DONE
    stats: dict[str, Any]


@_register
@dataclass(frozen=True, kw_only=True, eq=False)
class ErrorMessage(Message):
    """A request failed, or a message was refused. ``busy``: a limit was reached, and
    ``retry_after_s`` says when trying again is worth it. ``wrong_port`` (no request id): a
    client's message at the worker port, or a worker's at the client port."""

    KIND = Kind.ERROR
    code: str
    message: str
    retry_after_s: float | None = None


WORKER_SENDS = frozenset(
    {Kind.HELLO, Kind.PREPARED, Kind.RESULT, Kind.DECODED, Kind.FAILED, Kind.COMPARED, Kind.PART}
)
CLIENT_SENDS = frozenset({Kind.SUBMIT, Kind.CANCEL, Kind.STATUS})


def failed_for(job: Message, code: str, text: str) -> FailedMessage:
    """The FAILED answering ``job`` (an EVAL names its [task, attempt] pairs, so the broker can
    tell which tasks to run again), with the job's ids."""
    tasks = tuple((e.task, e.attempt) for e in job.entries) if isinstance(job, EvalMessage) else ()
    return FailedMessage(code=code, message=text, tasks=tasks).ids(job)
