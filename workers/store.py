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
