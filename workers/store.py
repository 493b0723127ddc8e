"""The results a worker keeps, by request and name (``Ref``), so latents stay where they were
made. Every byte is counted: results live on the worker's device up to a budget, older ones move
to host memory past it, and a hard bound refuses more (``StoreFull``). A plan's operation over
held results (``Rectify``, ``Parareal``) is computed here, on the device, with the plan's own
arithmetic (``algorithms.base.evaluate``), so the bits are the plan's. Thread-safe: the compute
thread puts and evaluates while the data server's thread reads.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from chords_mq.algorithms.base import Latent, Parareal, Rectify, Ref, evaluate, refs_of
from chords_mq.errors import ChordsError

Tier = Literal["device", "host"]


class StoreError(ChordsError):
    """A result the worker's store cannot keep or give."""


class StoreFull(StoreError, MemoryError):
    """Keeping one more result would pass the store's hard bound (``limit_bytes``)."""

    def __init__(self, needed: int, held: int, limit: int) -> None:
        super().__init__(
            f"a result of {needed} bytes would pass the store's bound: {held} of {limit} held"
        )
        self.needed, self.held, self.limit = needed, held, limit


class NotHeld(StoreError, LookupError):
    """A result this store does not hold (never computed here, or dropped)."""

    def __init__(self, request: str, refs: tuple[Ref, ...], text: str = "") -> None:
        names = ", ".join(f"{ref.task}:{ref.target}" for ref in refs[:8])
        super().__init__(text or f"request {request}: {names} not held here")
        self.request, self.refs = request, refs


class UnknownRequest(NotHeld):
    """Nothing of this request is held here."""

    def __init__(self, request: str) -> None:
        super().__init__(request, (), f"request {request}: nothing of it is held here")


@dataclass
class _Held:
    tensor: torch.Tensor
    nbytes: int
    tier: Tier


def nbytes_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class LatentStore:
    """Results of every request this worker computed, on ``device`` up to ``device_budget_bytes``
    (the oldest move to host memory past it) and at most ``limit_bytes`` in all.

    On a CPU worker the host tier is the same memory: only the accounting moves, so the tier
    logic is the same code and is tested without a GPU.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        device_budget_bytes: int = 1 << 30,
        limit_bytes: int = 4 << 30,
        host: torch.device | str = "cpu",
    ) -> None:
        if device_budget_bytes < 0 or limit_bytes < 0:
            raise ValueError("the store's budgets must be >= 0 bytes")
        self.device = torch.device(device)
        self.host = torch.device(host)
        self.device_budget_bytes = device_budget_bytes
        self.limit_bytes = limit_bytes
        self._lock = threading.RLock()
        self._held: dict[str, dict[Ref, _Held]] = {}
        self._on_device: OrderedDict[tuple[str, Ref], None] = OrderedDict()  # oldest first
        self._bytes = {"device": 0, "host": 0}

    # -- what is held ------------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        return self._bytes["device"] + self._bytes["host"]

    @property
    def device_bytes(self) -> int:
        return self._bytes["device"]

    @property
    def host_bytes(self) -> int:
        return self._bytes["host"]

    def requests(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def refs(self, request: str) -> list[Ref]:
        with self._lock:
            return list(self._held.get(request, ()))

    def holds(self, request: str, ref: Ref) -> bool:
        with self._lock:
            return ref in self._held.get(request, {})

    def tier(self, request: str, ref: Ref) -> Tier:
        with self._lock:
            return self._entry(request, ref).tier

    def request_bytes(self, request: str) -> int:
        with self._lock:
            return sum(held.nbytes for held in self._held.get(request, {}).values())

    # -- keeping and letting go --------------------------------------------------------------

    def put(self, request: str, ref: Ref, tensor: torch.Tensor) -> Tier:
        """Keep ``tensor`` as ``ref`` of ``request`` (a result put again replaces the old one);
        returns the tier it landed in. Raises ``StoreFull`` (nothing changed) past the bound.
        A view of a larger buffer is copied first, so the store holds exactly its bytes."""
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise StoreError(f"{ref}: only dense tensors are kept, got {type(tensor).__name__}")
        size = nbytes_of(tensor)
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != size:
            tensor = tensor.contiguous().clone()
        tensor = tensor.detach()
        with self._lock:
            old = self._held.get(request, {}).get(ref)
            freed = old.nbytes if old is not None else 0
            if self.held_bytes - freed + size > self.limit_bytes:
                raise StoreFull(size, self.held_bytes, self.limit_bytes)
            if old is not None:
                self._forget(request, ref)
            if size > self.device_budget_bytes:
                tier: Tier = "host"
                tensor = tensor.to(self.host)
            else:
                self._spill_until_free(size)
                tier = "device"
                tensor = tensor.to(self.device)
            self._held.setdefault(request, {})[ref] = _Held(tensor, size, tier)
            self._bytes[tier] += size
            if tier == "device":
                self._on_device[(request, ref)] = None
            return tier

    def _spill_until_free(self, size: int) -> None:
        """Move the oldest device results to host memory until ``size`` more bytes fit."""
        while self._bytes["device"] + size > self.device_budget_bytes and self._on_device:
            request, ref = next(iter(self._on_device))
            del self._on_device[(request, ref)]
            held = self._held[request][ref]
            held.tensor = held.tensor.to(self.host)
            held.tier = "host"
            self._bytes["device"] -= held.nbytes
            self._bytes["host"] += held.nbytes

    def drop(self, request: str, refs: Iterable[Ref]) -> int:
        """Let go of ``refs`` of ``request`` (those not held are ignored); returns bytes freed."""
        freed = 0
        with self._lock:
            for ref in refs:
                if ref in self._held.get(request, {}):
                    freed += self._forget(request, ref)
        return freed

    def release(self, request: str) -> int:
        """Let go of everything of ``request``; returns bytes freed."""
        with self._lock:
            return self.drop(request, list(self._held.get(request, ())))

    def _forget(self, request: str, ref: Ref) -> int:
        held = self._held[request].pop(ref)
        if not self._held[request]:
            del self._held[request]
        self._bytes[held.tier] -= held.nbytes
        self._on_device.pop((request, ref), None)
        return held.nbytes

    # -- reading -----------------------------------------------------------------------------

    def _entry(self, request: str, ref: Ref) -> _Held:
        results = self._held.get(request)
        if results is None:
            raise UnknownRequest(request)
        held = results.get(ref)
        if held is None:
            raise NotHeld(request, (ref,))
        return held

    def get(self, request: str, ref: Ref) -> torch.Tensor:
        """The held tensor (on its tier's device). Callers must not modify it."""
        with self._lock:
            return self._entry(request, ref).tensor

    def get_many(self, request: str, refs: Iterable[Ref]) -> list[torch.Tensor]:
        """Every one of ``refs`` at once, or ``UnknownRequest`` / ``NotHeld`` naming all the
        missing ones."""
        with self._lock:
            results = self._held.get(request)
            if results is None:
                raise UnknownRequest(request)
            wanted = list(refs)
            missing = tuple(ref for ref in wanted if ref not in results)
            if missing:
                raise NotHeld(request, missing)
            return [results[ref].tensor for ref in wanted]

    def evaluate(self, request: str, value: Latent) -> torch.Tensor:
        """The tensor ``value`` stands for, computed on the store's device from held results
        with the plan's arithmetic (``algorithms.base.evaluate``; same bits). Held results are
        never modified: an operation the plan marks ``exclusive`` (in place on its first
        operand) is computed out of place, which rounds identically, because a peer may be
        reading that result at the same moment. A bare ``Ref`` is the held tensor itself (no
        copy on the device tier): use it, do not modify it."""
        if isinstance(value, Rectify | Parareal) and value.exclusive:
            value = dataclasses.replace(value, exclusive=False)
        refs = refs_of(value)
        if not refs:
            return evaluate(value, lambda ref: self.get(request, ref))
        with self._lock:
            tensors = dict(zip(refs, self.get_many(request, refs)))
        return evaluate(value, lambda ref: tensors[ref].to(self.device))


class PushRefused(StoreError):
    """A pushed copy not kept: ``reason`` is a ``RefusalReason`` value (``wire.data``)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class PushedCopies:
    """Results other workers pushed here (issue 25: a producer sends a result to the worker
    bound to the core that reads it, as soon as it exists), kept apart from the store: the
    broker does not count them as holders, nothing serves them on, and recovery by lineage is
    unchanged. Only for a request this worker prepared (``expect``: the latent's dtype and
    shape, which every copy must have), at most ``budget_bytes`` and ``max_copies`` (the
    oldest go first past them; one copy larger than the budget is refused). A copy is freed
    when the EVAL reading it takes it (``take``), by DROP (``discard``), and with its request
    (``forget``). Thread-safe: the data server's thread puts, the compute thread takes and
    waits (bounded) for a copy on its way."""

    MAX_REQUESTS = 64  # requests expected at once (the worker's prepared cache is smaller)
    MAX_GONE = 4096  # copies remembered as read or refused: a later wait for one ends at once

    def __init__(self, budget_bytes: int = 256 << 20, max_copies: int = 64) -> None:
        if budget_bytes < 0 or max_copies < 1:
            raise ValueError("the pushed copies' budget must be >= 0 bytes and >= 1 copy")
        self.budget_bytes = budget_bytes
        self.max_copies = max_copies
        self._cond = threading.Condition()
        self._specs: OrderedDict[str, tuple[torch.dtype, tuple[int, ...]]] = OrderedDict()
        # (request, ref) -> (tensor, the sender's CURVE key or None), oldest first
        self._copies: OrderedDict[tuple[str, Ref], tuple[torch.Tensor, str | None]] = OrderedDict()
        self._gone: OrderedDict[tuple[str, Ref], None] = OrderedDict()
        self.held_bytes = 0
        self.kept = 0
        self.used = 0
        self.evicted = 0

    def expect(self, request: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Copies of ``request`` may come: each of ``dtype`` and ``shape``."""
        with self._cond:
            self._specs[request] = (dtype, tuple(shape))
            self._specs.move_to_end(request)
            while len(self._specs) > self.MAX_REQUESTS:
                oldest = next(iter(self._specs))
                self._forget(oldest)

    def forget(self, request: str) -> int:
        """Let go of everything of ``request`` (RELEASE, its context evicted); bytes freed."""
        with self._cond:
            return self._forget(request)

    def _forget(self, request: str) -> int:
        self._specs.pop(request, None)
        freed = 0
        for key in [key for key in self._copies if key[0] == request]:
            freed += self._free(key)
        for key in [key for key in self._gone if key[0] == request]:
            del self._gone[key]
        self._cond.notify_all()
        return freed

    def _free(self, key: tuple[str, Ref]) -> int:
        tensor, _ = self._copies.pop(key)
        size = nbytes_of(tensor)
        self.held_bytes -= size
        return size

    def put(self, request: str, ref: Ref, tensor: torch.Tensor, sender: str | None) -> None:
        """Keep a pushed copy, or ``PushRefused`` (nothing kept): an unknown request, a copy
        that is not the request's latent, one already read or given up on, or past the
        budget."""
        self.put_many(request, ((ref, tensor),), sender)

    def put_many(
        self, request: str, copies: Iterable[tuple[Ref, torch.Tensor]], sender: str | None
    ) -> None:
        """Keep every copy of one PUT, or none: the first copy refused (as ``put`` refuses)
        raises ``PushRefused`` before any is kept, so a refused PUT (its REFUSED names all its
        refs) leaves nothing behind that its sender believes refused."""
        items = list(copies)
        with self._cond:
            spec = self._specs.get(request)
            if spec is None:
                raise PushRefused("unknown_request", f"request {request} is not prepared here")
            for ref, tensor in items:
                self._check(request, ref, tensor, spec)
            for ref, tensor in items:
                self._keep((request, ref), tensor, sender)
            self._cond.notify_all()

    def _check(
        self,
        request: str,
        ref: Ref,
        tensor: torch.Tensor,
        spec: tuple[torch.dtype, tuple[int, ...]],
    ) -> None:
        key = (request, ref)
        if (tensor.dtype, tuple(tensor.shape)) != spec:
            self._mark_gone(key)  # a wait for it ends now: the reader pulls
            self._cond.notify_all()
            raise PushRefused(
                "mismatch",
                f"{ref.task}:{ref.target} is {tensor.dtype}{list(tensor.shape)}, the request's "
                f"latent {spec[0]}{list(spec[1])}",
            )
        if key in self._gone:
            raise PushRefused("unwanted", f"{ref.task}:{ref.target} was read or given up here")
        size = nbytes_of(tensor)
        if size > self.budget_bytes:
            self._mark_gone(key)
            self._cond.notify_all()
            raise PushRefused(
                "no_room", f"{size} bytes > the pushed copies' budget {self.budget_bytes}"
            )

    def _keep(self, key: tuple[str, Ref], tensor: torch.Tensor, sender: str | None) -> None:
        size = nbytes_of(tensor)
        if key in self._copies:
            self._free(key)
        while self._copies and (
            self.held_bytes + size > self.budget_bytes or len(self._copies) >= self.max_copies
        ):
            oldest = next(iter(self._copies))  # the oldest first
            self._free(oldest)
            self._mark_gone(oldest)  # its reader, waiting or not, pulls it now
            self.evicted += 1
        self._copies[key] = (tensor, sender)
        self.held_bytes += size
        self.kept += 1

    def give_up(self, request: str, ref: Ref) -> None:
        """A copy refused on its way (or never to come): a wait for it ends now."""
        with self._cond:
            self._mark_gone((request, ref))
            self._cond.notify_all()

    def _mark_gone(self, key: tuple[str, Ref]) -> None:
        self._gone[key] = None
        self._gone.move_to_end(key)
        while len(self._gone) > self.MAX_GONE:
            self._gone.popitem(last=False)

    def take(
        self, request: str, ref: Ref, wait_s: float = 0.0
    ) -> tuple[torch.Tensor, str | None] | None:
        """The pushed copy of ``ref`` and its sender's key, waiting up to ``wait_s`` for one
        on its way; None if none came (read or refused already, its request forgotten, or not
        in time). A taken copy is no longer held here (the caller reads it once)."""
        key = (request, ref)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while key not in self._copies:
                left = deadline - time.monotonic()
                if request not in self._specs:  # nothing remembered: a later PREPARE starts anew
                    return None
                if key in self._gone or left <= 0:
                    self._mark_gone(key)
                    return None
                self._cond.wait(left)
            tensor, sender = self._copies.pop(key)
            self.held_bytes -= nbytes_of(tensor)
            self.used += 1
            self._mark_gone(key)
            return tensor, sender

    def discard(self, request: str, refs: Iterable[Ref]) -> int:
        """Let go of the copies of ``refs`` (DROP: nothing reads them any more); bytes freed.
        Of a prepared request they are remembered as gone: a copy still on its way when the
        DROP came is refused (``unwanted``) instead of held for nothing until RELEASE."""
        freed = 0
        with self._cond:
            known = request in self._specs
            for ref in refs:
                if (request, ref) in self._copies:
                    freed += self._free((request, ref))
                if known:
                    self._mark_gone((request, ref))
            self._cond.notify_all()
        return freed

    def holds(self, request: str, ref: Ref) -> bool:
        with self._cond:
            return (request, ref) in self._copies
