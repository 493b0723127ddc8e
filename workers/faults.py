"""Faults a worker emulates for tests and benchmarks (``chords-worker --fault SPEC``): a broken
GPU, a dishonest peer, a worker that goes quiet. Each faulty result looks honest otherwise (the
right tasks, ids and shape), so what catches it is the broker's checks and verification.

The model's own faults (``nan``, ``inf``, ``zeros``, ``hang``) live in the synthetic adapter;
``scale:F`` wraps the adapter's forward; ``cast:DTYPE`` and ``bitflip:P`` change the results the
worker sends and keeps (``FaultyResults``), and ``silent-prepare`` is the worker's own.
``serve:zeros`` keeps and reports honest results but serves zeros of the same dtype and shape to
the workers that fetch them from its data endpoint (what catches it: the fetcher's digest check).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chords_mq.workers.models.base import ModelAdapter, Prepared

# The synthetic adapter's faults (every model output NaN, Inf or zeros; a forward that hangs).
ADAPTER_FAULTS = ("nan", "inf", "zeros", "hang")
CAST_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
FAULT_SPECS = (
    *ADAPTER_FAULTS,
    "scale:F",
    "cast:DTYPE",
    "bitflip:P[:SEED]",
    "silent-prepare",
    "serve:zeros",
)
# Integer views of each width, for a bit flip.
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class FaultSpecError(ValueError):
    """A ``--fault`` that does not parse."""


@dataclass(frozen=True)
class Fault:
    """One parsed ``--fault``: its kind and its argument."""

    kind: str  # nan, inf, zeros, hang, scale, cast, bitflip, silent-prepare or serve
    factor: float = 1.0  # scale
    dtype: torch.dtype | None = None  # cast
    probability: float = 0.0  # bitflip
    seed: int = 0  # bitflip

    @property
    def adapter_fault(self) -> str | None:
        """The synthetic adapter's ``fault`` argument, if it is one of the adapter's."""
        return self.kind if self.kind in ADAPTER_FAULTS else None

    @property
    def silent_prepare(self) -> bool:
        return self.kind == "silent-prepare"

    @property
    def serve_zeros(self) -> bool:
        return self.kind == "serve"

    @property
    def changes_results(self) -> bool:
        return self.kind in ("cast", "bitflip")


def parse_fault(text: str) -> Fault:
    """``text`` as a ``Fault``; ``FaultSpecError`` naming what is wrong and what is allowed."""
    kind, _, argument = text.partition(":")
    allowed = f"one of {', '.join(FAULT_SPECS)}"
    if kind in ADAPTER_FAULTS or kind == "silent-prepare":
        if argument:
            raise FaultSpecError(f"{kind} takes no argument, got {text!r}")
        return Fault(kind)
    if kind == "scale":
        factor = _number(argument, text)
        if not math.isfinite(factor):
            raise FaultSpecError(f"scale:F needs a finite factor F, got {text!r}")
        return Fault("scale", factor=factor)
    if kind == "cast":
        dtype = CAST_DTYPES.get(argument)
        if dtype is None:
            raise FaultSpecError(
                f"cast:DTYPE needs DTYPE in {', '.join(CAST_DTYPES)}, got {argument!r}"
            )
        return Fault("cast", dtype=dtype)
    if kind == "serve":
        if argument != "zeros":
            raise FaultSpecError(f"serve:zeros is the only serve fault, got {text!r}")
        return Fault("serve")
    if kind == "bitflip":
        probability, _, seed_text = argument.partition(":")
        p = _number(probability, text)
        if not 0.0 <= p <= 1.0:
            raise FaultSpecError(f"bitflip:P needs 0 <= P <= 1, got {text!r}")
        seed = 0
        if seed_text:
            if not seed_text.isdigit():
                raise FaultSpecError(f"bitflip:P:SEED needs a non-negative integer SEED: {text!r}")
            seed = int(seed_text)
        return Fault("bitflip", probability=p, seed=seed)
    raise FaultSpecError(f"unknown fault {text!r}: {allowed}")


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FaultSpecError(f"{spec!r}: {text!r} is not a number") from None


class ScaledOutputs:
    """An adapter whose every model output is multiplied by ``factor`` (in the output's dtype):
    a GPU that computes slightly wrong, finite numbers."""

    def __init__(self, adapter: ModelAdapter, factor: float) -> None:
        self.inner = adapter
        self.factor = factor
        self.name, self.dtype = adapter.name, adapter.dtype
        self.max_batch, self.device = adapter.max_batch, adapter.device
        self.solver_note = getattr(adapter, "solver_note", None)

    def prepare(self, request: Any) -> Prepared:
        return self.inner.prepare(request)

    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        out = self.inner.denoise(context, latents, steps)
        return out * torch.tensor(self.factor, dtype=out.dtype, device=out.device)

    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(context, latent)


def with_fault(adapter: ModelAdapter, fault: Fault | None) -> ModelAdapter:
    """The adapter a worker with ``fault`` runs (``scale``: its outputs scaled)."""
    if fault is not None and fault.kind == "scale":
        return ScaledOutputs(adapter, fault.factor)
    return adapter


class FaultyResults:
    """What ``cast`` and ``bitflip`` do to one task's results before the worker sends or keeps
    them. A bit flip is decided per result from a hash of (seed, request, task, attempt,
    target), so a run is reproducible whatever order the tasks come in."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.flipped = 0  # results changed by a bit flip so far

    def apply(
        self, request: str, task: int, attempt: int, results: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        fault = self.fault
        if fault.kind == "cast":
            assert fault.dtype is not None
            return {target: r.to(fault.dtype) for target, r in results.items()}
        if fault.kind != "bitflip":
            return results
        out = {}
        for target, result in results.items():
            key = f"{fault.seed}/{request}/{task}/{attempt}/{target}".encode()
            draw = hashlib.sha256(key).digest()
            chance = int.from_bytes(draw[:8], "big") / 2**64
            if chance < fault.probability and result.numel():
                result = flip_bit(result, int.from_bytes(draw[8:16], "big"))
                self.flipped += 1
            out[target] = result
        return out


def flip_bit(tensor: torch.Tensor, draw: int) -> torch.Tensor:
    """A copy of ``tensor`` with one bit flipped: element ``draw mod numel``, bit ``draw //
    numel mod width``."""
    flipped = tensor.detach().clone().contiguous()
    bits = flipped.view(_INT_OF_WIDTH[flipped.element_size()]).reshape(-1)
    width = 8 * flipped.element_size()
    index, bit = draw % bits.numel(), (draw // bits.numel()) % width
    mask = 1 << bit
    if bits.dtype != torch.uint8 and mask >= 1 << (width - 1):
        mask -= 1 << width  # the sign bit of a signed view, in two's complement
    bits[index] ^= mask
    return flipped
