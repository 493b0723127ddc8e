"""The synthetic adapter: a deterministic analytic velocity field, for tests and benchmarks.

No weights. The latent shape and dtype come from the request's params (``shape``, ``dtype``);
``latency_ms`` sleeps in each forward to emulate a GPU step of that length (the forward's own
compute counts towards it); ``fault`` makes every
forward return NaN, Inf or zeros, as a broken GPU does (the broker's result checks are tested
against it). The field is
elementwise, so a batched forward gives the same bits as one latent at a time.

``params["field"] = "linear"`` picks ``(sigma - 0.3) x`` instead: one pass over the latent, for
transport benchmarks where a few host cores stand in for many GPUs and the analytic field's
host-CPU cost (about 20 ms per 16 MiB) would be measured instead of the links.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import flow_match_euler
from chords_mq.workers.models.base import Prepared

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_SHAPE = (4, 16, 16)
MAX_ELEMENTS = 1 << 28
# A faulty GPU, emulated: every model output becomes this value (the initial latent is honest).
# "hang": every forward blocks (for up to HANG_S), while the worker's heartbeats go on.
FAULTS: dict[str | None, float] = {
    None: 0.0,
    "nan": math.nan,
    "inf": math.inf,
    "zeros": 0.0,
    "hang": 0.0,
}
HANG_S = 600.0


@dataclass(frozen=True)
class SyntheticContext:
    sigmas: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    field: str = "analytic"


FIELDS = ("analytic", "linear")


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``tanh(2x) sigma - 0.3 x + 0.1 sin(3x)``, in float32, cast back to the latent's dtype."""
    x32 = x.to(torch.float32)
    return (torch.tanh(2 * x32) * sigma - 0.3 * x32 + 0.1 * torch.sin(3 * x32)).to(x.dtype)


def linear_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(sigma - 0.3) x``, in the latent's dtype: the cheap field."""
    return x * (sigma - 0.3).to(x.dtype)


class SyntheticAdapter:
    name = "synthetic"
    max_batch = 64

    def __init__(
        self, device: str = "cpu", latency_ms: float = 0.0, fault: str | None = None
    ) -> None:
        if latency_ms < 0 or not math.isfinite(latency_ms):
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(f for f in FAULTS if f)}, got {fault}")
        self.fault = fault
        self.device = torch.device(device)
        self.latency_s = latency_ms / 1000.0
        self.dtype = "float32"

    def prepare(self, request: RequestSpec) -> Prepared:
        params = dict(request.params)
        shape = params.pop("shape", list(DEFAULT_SHAPE))
        dtype_name = params.pop("dtype", "float32")
        field = params.pop("field", "analytic")
        if params:
            raise InvalidRequest(f"synthetic model: unknown params {sorted(params)}")
        sizes_ok = isinstance(shape, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
        )
        if not sizes_ok or not 1 <= len(shape) <= 6:
            raise InvalidRequest(
                f"synthetic model: shape must be 1 to 6 positive ints, got {shape}"
            )
        if math.prod(shape) > MAX_ELEMENTS:
            raise InvalidRequest(f"synthetic model: shape {shape} is too large")
        if dtype_name not in DTYPES:
            raise InvalidRequest(f"synthetic model: dtype must be one of {sorted(DTYPES)}")
        if field not in FIELDS:
            raise InvalidRequest(f"synthetic model: field must be one of {list(FIELDS)}")
        dtype = DTYPES[dtype_name]
        generator = torch.Generator().manual_seed(request.seed)
        x0 = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
        sigmas = torch.linspace(1.0, 0.0, request.steps + 1, dtype=torch.float32)
        context = SyntheticContext(sigmas=sigmas, shape=tuple(shape), dtype=dtype, field=field)
        # The field and the solver keep the latent's dtype: so do the results.
        return Prepared(x0=x0, solver=flow_match_euler(sigmas), context=context, result_dtype=dtype)

    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        started = time.perf_counter()
        sigma = context.sigmas[list(steps)].reshape(-1, *([1] * (latents.dim() - 1)))
        field = linear_velocity if context.field == "linear" else velocity
        out = field(latents.to(self.device), sigma.to(self.device))
        if self.fault == "hang":
            time.sleep(HANG_S)  # a GPU kernel that never returns; heartbeats continue
        elif self.fault is not None:
            out = torch.full_like(out, FAULTS[self.fault])
        remaining = self.latency_s - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        return out

    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        scaled = (latent.to(torch.float32).clamp(-1, 1) + 1) * 127.5
        return scaled.round().to(torch.uint8)
