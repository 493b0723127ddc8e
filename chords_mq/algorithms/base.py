"""The Plan protocol: a sampling method as a pure dataflow state machine.

``ready()`` hands out every task whose inputs exist. A task names the steps its result is needed
at (its *targets*); whoever evaluates it computes ``v = f(x, step)`` and then, next to the
model, ``S(x, v, step, j)`` for every target ``j``. ``complete(id, results)`` feeds those solver
results back, in any order, and returns the hits they released. A plan itself only adds and
subtracts latents, operations that round the same on any hardware. The broker,
``local.simulate`` and the benchmarks all drive plans through exactly this interface. No I/O,
no asyncio, no zmq.

**Latents by name.** A driver may feed a plan names of results (``Ref``) instead of tensors.
A plan that only adds and subtracts results (CHORDS, sequential, SRDS) then never holds a
tensor: its tasks and hits carry a ``Ref``, or the operation that makes their latent from refs
(``Rectify``, ``Parareal``), and the driver keeps the tensors wherever it likes and evaluates the
operation (``evaluate``) where they are. The same code runs both ways; ``rectified`` and
``parareal`` build the operation when given refs and compute it when given tensors, so the bits
are the same. A plan that must read values to decide (ParaDIGMS' acceptance test, a stop rule
that reads hits' latents) needs tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, overload, runtime_checkable

import torch

from chords_mq.errors import InvalidPlanConfig, PlanProtocolError

# At most this many targets per task: CHORDS needs three (the fine step, the coarse init of the
# next core, the own-anchor jump) and the wire sizes its frame limit by it.
MAX_TARGETS = 4


@dataclass(frozen=True)
class Ref:
    """A solver result by name: the result for step ``target`` of task ``task``."""

    task: int
    target: int


@dataclass(frozen=True)
class Rectify:
    """CHORDS' rectification ``(fine - own) + slower``, to be computed where its inputs are
    (``rectified``). ``exclusive``: no other role reads ``fine``, so it may be overwritten."""

    fine: Ref
    own: Ref
    slower: Ref
    exclusive: bool

    def refs(self) -> tuple[Ref, ...]:
        return (self.fine, self.own, self.slower)


@dataclass(frozen=True)
class Parareal:
    """The Parareal update ``(fine + new) - old``, to be computed where its inputs are."""

    fine: Ref
    new: Ref
    old: Ref
    exclusive: bool

    def refs(self) -> tuple[Ref, ...]:
        return (self.fine, self.new, self.old)


Operation = Rectify | Parareal
# What a task's input and a hit's latent are: a tensor, a result by name, or an operation on
# results by name (see the module docstring).
Latent = torch.Tensor | Ref | Operation


def refs_of(value: Latent) -> tuple[Ref, ...]:
    """The results ``value`` names (none for a tensor)."""
    if isinstance(value, Ref):
        return (value,)
    if isinstance(value, Rectify | Parareal):
        return value.refs()
    return ()


def as_tensor(value: Latent) -> torch.Tensor:
    """``value`` as the tensor it is; a named result here is the driver's mistake."""
    if not isinstance(value, torch.Tensor):
        raise PlanProtocolError(f"expected a tensor, got {value!r}: evaluate it first")
    return value


@dataclass(frozen=True, eq=False)
class Task:
    """One network evaluation the plan asks for: the solver results of ``latent`` at ``step``
    for each step in ``targets`` (ascending, each in ``step + 1 .. N``).

    ``round`` is the task's depth in the task graph: 1 + the longest chain of evaluations its
    latent depends on. Under a synchronous round-by-round driver it is the round it runs in.
    """

    id: int
    core: int
    step: int
    round: int
    latent: Latent
    targets: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Hit:
    """A latent a core delivers at step N. Core 0 is the coarse "zero-th hit"."""

    core: int
    round: int
    latent: Latent


# A result as a plan holds it: the tensor, or its name.
Value = torch.Tensor | Ref
# target step -> S(x, f(x, step), step, target), each a tensor or its name
Results = Mapping[int, Value]


class HitHistory:
    """The hits a plan has published, as a stop rule reads them: how many, and the latest.

    Only the last two hits, and the last two of real cores, keep their latents, and only for a
    stop rule that reads latents (``keep_latents``): a plan never holds every hit of a request
    (video latents are tens of MB each), and usually none.
    """

    KEEP = 2

    def __init__(self, keep_latents: bool = True) -> None:
        self.keep_latents = keep_latents
        self.count = 0
        self.records: list[tuple[int, int]] = []  # (core, round) of every hit, in order
        self._last: list[Hit] = []
        self._last_real: list[Hit] = []

    def append(self, hit: Hit) -> None:
        self.count += 1
        self.records.append((hit.core, hit.round))
        if not self.keep_latents:
            return
        self._last = [*self._last, hit][-self.KEEP :]
        if hit.core > 0:
            self._last_real = [*self._last_real, hit][-self.KEEP :]

    def latest(self, cores_only: bool = False) -> list[Hit]:
        """The last (up to) two hits, oldest first; ``cores_only`` skips the zero-th hit."""
        return list(self._last_real if cores_only else self._last)

    def clear_latents(self) -> None:
        self._last, self._last_real = [], []

    def held(self) -> list[Hit]:
        return [*self._last, *(h for h in self._last_real if h not in self._last)]


class StopRule(Protocol):
    """Decides, after a round's hits are appended, whether the plan stops (CHORDS-SPEC 4).
    ``reads_latents``: whether it looks at the hits' latents (or only at their count)."""

    reads_latents: bool

    def should_stop(self, hits: HitHistory) -> bool: ...


@runtime_checkable
class Plan(Protocol):
    """What every sampling method exposes to whatever drives it."""

    def rank(self, task: Task) -> int:
        """How urgent ``task`` is for the result the request returns: HEFT's upward rank, the
        longest chain of evaluations from it to that result (itself included), or 0 when
        the plan does not know (every task then counts alike), or -1 for a task none of the
        request's hits depends on (a driver may then ``abandon`` it). Placement only: any order
        gives the same bits."""
        ...

    @property
    def steps(self) -> int: ...

    def ready(self) -> list[Task]:
        """Every task whose inputs exist and that has not been handed out yet."""
        ...

    def complete(self, task_id: int, results: Results) -> list[Hit]:
        """Feed back one task's solver results (one per target); returns the hits this
        completion released (maybe none). The plan takes ownership of the result tensors and
        may reuse their memory."""
        ...

    @property
    def published(self) -> Sequence[tuple[int, int]]:
        """``(core, round)`` of every hit released so far, in release order."""
        ...

    @property
    def done(self) -> bool: ...

    @property
    def returned(self) -> Hit | None:
        """The hit the plan returns: set once ``done``, else None."""
        ...

    def retained_latents(self) -> int:
        """How many latents the plan holds: its stores and the tasks it handed out."""
        ...

    def abandon(self, task_id: int) -> None:
        """Forget a handed-out task that will not be run (one of ``rank`` -1)."""
        ...

    def goal(self) -> Mapping[tuple[int, int], Sequence[tuple[int, int]]] | None:
        """The tasks the request's hits depend on, as ``(core, step)`` nodes each with the
        nodes it reads, when the plan knows them in advance (then ``rank`` is computed on it);
        None otherwise. Placement only: a broker may schedule the whole graph ahead."""
        ...

    def follow(self, task_id: int) -> Task | None:
        """For a driver that feeds names: the task that the handed-out task ``task_id``'s
        fine result alone will make ready (its core's next step, reading ``Ref(task_id,
        step + 1)``), handed out now, before that result exists, so a worker can run both in
        a row (a chain). None where that next step reads more (a rectification), is a hit,
        or is not needed (``rank`` -1), and for a plan that does not chain. Completing
        ``task_id`` later does not ready that task again."""
        ...

    def unfollow(self, task_id: int) -> bool:
        """Take back a task ``follow`` handed out while the task it follows has not
        completed (its chain was cut: the worker failed, left or is late): completing that
        one readies it again, under a new id. False, and nothing changes, for any other
        task (one whose input now exists is an ordinary task)."""
        ...

    def readers(self, task: Task) -> Mapping[int, Sequence[tuple[int, int]]]:
        """For each target of ``task`` that a task of another core will read, those tasks as
        ``(core, step)`` nodes (empty where the plan does not say). Placement only: a broker
        may push such a result to the worker of the core that reads it (issue 25)."""
        ...


# Elements summed at once by ``all_finite``: torch casts what it sums to float64 first, so a
# whole float32 latent would cost a copy twice its size. A chunk's copy is 512 KiB: small
# enough that glibc serves it from its heap without growing it (with 8 MiB chunks the
# broker's heap grew by 24 to 64 MiB per 64 MiB request, benchmarks/big_latents.py).
FINITE_CHUNK = 1 << 16


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no Inf in ``tensor``. NaN and Inf propagate through a sum, so a finite sum
    in the tensor's own dtype proves it (one pass, nothing allocated: 0.13 ms per 16 MiB of
    float32 here); only a sum that is not finite, NaN or Inf inside or finite values that
    overflowed it, needs the exact check. Below float64 that is float64 sums, which finite
    float32 values cannot overflow, ``FINITE_CHUNK`` elements at a time, so what it allocates
    stays small whatever the latent's size (1.3 ms per 16 MiB)."""
    if tensor.numel() and math.isfinite(float(tensor.sum())):
        return True
    if tensor.dtype == torch.float64:
        return bool(torch.isfinite(tensor).all())
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start : start + FINITE_CHUNK]
        if not math.isfinite(float(chunk.sum(dtype=torch.float64))):
            return False
    return True


def check_latent(x0: object) -> torch.Tensor:
    """The initial latent must be a floating-point tensor (any float dtype, float64 included)."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise InvalidPlanConfig(
            f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}"
        )
    return x0


def distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct memory ``tensors`` hold: a storage several share counts once."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor.is_meta:  # a stand-in of a shape and dtype (the broker's x0 by name)
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def reusable(result: torch.Tensor, *others: torch.Tensor) -> bool:
    """May ``result``, a result the caller holds exclusively, be overwritten in place with an
    expression of ``others``? Only if none of them is the same memory and all share its dtype
    and shape, so in-place and out-of-place ops round and promote alike."""
    return all(
        other is not result
        and other.dtype == result.dtype
        and other.shape == result.shape
        and other.data_ptr() != result.data_ptr()
        for other in others
    )


@overload
def rectified(
    fine: torch.Tensor, own: torch.Tensor, slower: torch.Tensor, exclusive: bool
) -> torch.Tensor: ...
@overload
def rectified(fine: Value, own: Value, slower: Value, exclusive: bool) -> Latent: ...
def rectified(fine: Value, own: Value, slower: Value, exclusive: bool) -> Latent:
    """CHORDS' rectification ``(F - G) + cur_G`` in the reference code's association. When the
    plan holds ``fine`` exclusively (no other role reads the same result), it is computed in
    ``fine``'s memory: the same bits as the out-of-place expression, without two latent-sized
    temporaries. Given names (``Ref``), it is the operation (``Rectify``) for whoever holds
    the tensors to compute, the same way."""
    if isinstance(fine, Ref) and isinstance(own, Ref) and isinstance(slower, Ref):
        return Rectify(fine, own, slower, exclusive)
    if not isinstance(fine, torch.Tensor):
        raise PlanProtocolError(f"rectification of {fine!r} with tensors")
    own, slower = as_tensor(own), as_tensor(slower)
    if exclusive and reusable(fine, own, slower):
        return fine.sub_(own).add_(slower)
    return (fine - own) + slower


@overload
def parareal(
    fine: torch.Tensor, new: torch.Tensor, old: torch.Tensor, exclusive: bool
) -> torch.Tensor: ...
@overload
def parareal(fine: Value, new: Value, old: Value, exclusive: bool) -> Latent: ...
def parareal(fine: Value, new: Value, old: Value, exclusive: bool) -> Latent:
    """The Parareal update ``(F + G_new) - G_old``, in ``fine``'s memory when that is safe;
    given names, the operation (``Parareal``)."""
    if isinstance(fine, Ref) and isinstance(new, Ref) and isinstance(old, Ref):
        return Parareal(fine, new, old, exclusive)
    if not isinstance(fine, torch.Tensor):
        raise PlanProtocolError(f"parareal update of {fine!r} with tensors")
    new, old = as_tensor(new), as_tensor(old)
    if exclusive and reusable(fine, new, old):
        return fine.add_(new).sub_(old)
    return (fine + new) - old


def evaluate(value: Latent, tensor_of: Callable[[Ref], torch.Tensor]) -> torch.Tensor:
    """The tensor ``value`` stands for, each named result looked up with ``tensor_of``: what
    the holder of the results runs (the same functions as a plan on tensors, so the same
    bits)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Ref):
        return tensor_of(value)
    if isinstance(value, Rectify):
        fine, own, slower = (tensor_of(ref) for ref in value.refs())
        return rectified(fine, own, slower, value.exclusive)
    fine, new, old = (tensor_of(ref) for ref in value.refs())
    return parareal(fine, new, old, value.exclusive)


class TaskLedger:
    """Bookkeeping every plan shares: task ids, the ready queue, hand-out and completion checks.

    A plan subclasses it and implements ``_on_results``; it calls ``_emit`` for new tasks and
    ``_publish`` for hits. After the plan is done, late completions of handed-out tasks are
    accepted and dropped (the broker may still have them in flight when a stop rule fires).
    """

    def __init__(self, steps: int, stop: StopRule | None) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidPlanConfig(f"steps must be an integer >= 1, got {steps!r}")
        if stop is not None and not callable(getattr(stop, "should_stop", None)):
            raise InvalidPlanConfig(f"stop must have should_stop(hits), got {stop!r}")
        self._steps = steps
        self._stop = stop
        self._next_id = 0
        self._fresh: list[Task] = []
        self._handed_out: dict[int, Task] = {}
        self._history = HitHistory(
            keep_latents=stop is not None and getattr(stop, "reads_latents", True)
        )
        self._returned: Hit | None = None
        self._latent_bytes = 0  # the first latent's size: the unit of retained_latents()
        # Chains (``follow``): by task, the follower handed out before its result exists; and
        # by follower, the task it follows.
        self._followed: dict[int, Task] = {}
        self._following: dict[int, int] = {}

    def rank(self, task: Task) -> int:
        """See ``Plan.rank``: a ledger that knows nothing more ranks every task alike."""
        return 0

    def goal(self) -> Mapping[tuple[int, int], Sequence[tuple[int, int]]] | None:
        """See ``Plan.goal``: a ledger that knows nothing more has no graph to offer."""
        return None

    def readers(self, task: Task) -> Mapping[int, Sequence[tuple[int, int]]]:
        """See ``Plan.readers``: a ledger that knows nothing more names none."""
        return {}

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def published(self) -> Sequence[tuple[int, int]]:
        return tuple(self._history.records)

    @property
    def done(self) -> bool:
        return self._returned is not None

    @property
    def returned(self) -> Hit | None:
        return self._returned

    @property
    def in_flight(self) -> int:
        """Tasks handed out and not completed yet."""
        return len(self._handed_out)

    def retained_bytes(self) -> int:
        """Bytes of the distinct tensor memory the plan holds: its stores, the tasks it handed
        out (their input latents) and the latest hits a stop rule may read."""
        return distinct_bytes(self.held_tensors())

    def _held(self) -> list[Latent]:
        values = [t.latent for t in (*self._fresh, *self._handed_out.values())]
        values += self._stored()
        values += [hit.latent for hit in self._history.held()]
        return values

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors the plan holds (its stores, its tasks' inputs, the hits a stop rule may
        read); fed names, only the initial latent while its task runs."""
        return [value for value in self._held() if isinstance(value, torch.Tensor)]

    def names(self) -> set[Ref]:
        """The results the plan will still read, by name: those its stores and the hits a stop
        rule reads hold (its handed-out tasks' inputs are the driver's once handed out). A
        driver that feeds names may drop every other result it keeps."""
        values = self._stored() + [hit.latent for hit in self._history.held()]
        values += [task.latent for task in self._fresh]
        return {ref for value in values for ref in refs_of(value)}

    @property
    def reads_latents(self) -> bool:
        """Does the plan read its hits' values (a stop rule that compares them)? Then it must
        be fed tensors, not names."""
        return self._history.keep_latents

    def retained_latents(self) -> int:
        """``retained_bytes`` in units of the initial latent's size, rounded up."""
        unit = max(1, self._latent_bytes)
        return -(-self.retained_bytes() // unit)

    def _stored(self) -> list[Latent]:
        """The latents the plan's own stores hold (each plan lists its own)."""
        return []

    def ready(self) -> list[Task]:
        if self.done:
            return []
        tasks, self._fresh = self._fresh, []
        for task in tasks:
            self._handed_out[task.id] = task
        return tasks

    def complete(self, task_id: int, results: Results, checked: bool = False) -> list[Hit]:
        """(``checked``: the caller has already run ``check_results`` on these results.)"""
        task = self._handed_out.get(task_id)
        if task is None:
            raise PlanProtocolError(f"task {task_id} was not handed out or is already complete")
        if not checked:
            check_results(task, results)
        del self._handed_out[task_id]
        if self.done:
            return []
        return self._on_results(task, results)

    def abandon(self, task_id: int) -> None:
        """Forget a handed-out task that will not be run: one the result the request returns
        does not depend on (``rank`` -1). The plan no longer holds its input latent, and
        completing it later is a protocol error."""
        self._handed_out.pop(task_id, None)

    def follow(self, task_id: int) -> Task | None:
        """See ``Plan.follow``: the next step of ``task_id``'s core as ``_follower`` describes
        it (each plan says which of its tasks a fine result alone readies)."""
        task = self._handed_out.get(task_id)
        if task is None or self.done or task_id in self._followed:
            return None
        nxt = self._follower(task)
        if nxt is None:
            return None
        core, step, targets = nxt
        follower = Task(self._next_id, core, step, task.round + 1, Ref(task_id, step), targets)
        if self.rank(follower) < 0:
            return None
        self._next_id += 1
        self._handed_out[follower.id] = follower
        self._followed[task_id] = follower
        self._following[follower.id] = task_id
        return follower

    def unfollow(self, task_id: int) -> bool:
        """See ``Plan.unfollow``."""
        parent = self._following.pop(task_id, None)
        if parent is None:
            return False
        del self._followed[parent]
        self._handed_out.pop(task_id, None)
        return True

    def _follower(self, task: Task) -> tuple[int, int, tuple[int, ...]] | None:
        """``(core, step, targets)`` of the task ``task``'s fine result (``Ref(task.id,
        task.step + 1)``) alone readies, if any; a plan that chains says (here: none)."""
        return None

    def _followed_by(self, task_id: int) -> bool:
        """Completing ``task_id``: was its fine successor handed out already (``follow``)?
        Then the plan does not ready it again; it is an ordinary task from now on."""
        follower = self._followed.pop(task_id, None)
        if follower is None:
            return False
        del self._following[follower.id]
        return True

    def _on_results(self, task: Task, results: Results) -> list[Hit]:
        raise NotImplementedError

    def _emit(
        self, core: int, step: int, round_: int, latent: Latent, targets: Sequence[int]
    ) -> None:
        if not self._latent_bytes and isinstance(latent, torch.Tensor):
            self._latent_bytes = latent.untyped_storage().nbytes()
        wanted = tuple(sorted(set(targets)))
        if not wanted or len(wanted) > MAX_TARGETS or wanted[0] <= step or wanted[-1] > self.steps:
            raise AssertionError(f"bad targets {wanted} for step {step} of {self.steps}")
        self._fresh.append(Task(self._next_id, core, step, round_, latent, wanted))
        self._next_id += 1

    def _publish(self, hit: Hit, closes_round: bool, last: bool) -> bool:
        """Append one hit, in the spec's order. True when the plan is done.

        The stop rule runs only once a round's hits are all appended (``closes_round``), and only
        if that round had a real core hit: a round's hits are the zero-th hit (if any) and then
        real cores, so the closing hit is real exactly when the round had one. ``last`` says no
        hit will ever follow, so the plan finishes with this one.
        """
        self._history.append(hit)
        if not closes_round:
            return False
        stop = self._stop
        if last or (hit.core > 0 and stop is not None and stop.should_stop(self._history)):
            self._returned = hit
            self._fresh.clear()
            self._history.clear_latents()
            self._release()
            return True
        return False

    def _release(self) -> None:
        """The plan is done: drop every stored latent (each plan clears its own stores)."""


def check_results(task: Task, results: object) -> None:
    """Every result a plan reads is checked first: one tensor per target, the latent's shape,
    a floating dtype; or, for a plan fed names, the name of each target's result. A mismatch is
    a ``PlanProtocolError`` and leaves the plan unchanged."""
    if not isinstance(results, Mapping) or set(results) != set(task.targets):
        got = sorted(results) if isinstance(results, Mapping) else type(results).__name__
        raise PlanProtocolError(f"task {task.id}: results for {got}, expected {list(task.targets)}")
    for target, tensor in results.items():
        if isinstance(tensor, Ref):
            if tensor != Ref(task.id, target):
                raise PlanProtocolError(f"task {task.id}: result for step {target} is {tensor}")
            continue
        shape = task.latent.shape if isinstance(task.latent, torch.Tensor) else None
        if not isinstance(tensor, torch.Tensor) or (shape is not None and tensor.shape != shape):
            got_shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise PlanProtocolError(
                f"task {task.id}: result for step {target} has shape {got_shape}, the latent "
                f"{tuple(shape or ())}"
            )
        if not tensor.is_floating_point():
            raise PlanProtocolError(
                f"task {task.id}: result for step {target} has dtype {tensor.dtype}"
            )
