"""Stop rules of the CHORDS reference code (CHORDS-SPEC section 4), as small value objects.

Both run only after a round in which a real core hit, on the hits so far (zero-th included).
``parse_stop`` reads the CLI / wire spelling ``core-index:M``, ``residual:TAU`` or
``residual-cores:TAU`` (the residual rule that ignores the zero-th hit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from chords_mq.algorithms.base import HitHistory, as_tensor
from chords_mq.errors import InvalidPlanConfig


@dataclass(frozen=True)
class CoreIndex:
    """Stop at the m-th real hit, i.e. return the m-th fastest core (m <= 0 acts as 1).

    The authors' test is ``len(hits) - 1 >= m``; the zero-th hit always precedes the first real
    hit, so it counts real hits. With ties the whole round is appended first.
    """

    index: int = 1
    reads_latents = False

    def should_stop(self, hits: HitHistory) -> bool:
        return hits.count - 1 >= self.index

    def __str__(self) -> str:
        return f"core-index:{self.index}"


@dataclass(frozen=True)
class Residual:
    """Stop when ``||hits[-1] - hits[-2]||_2 / numel < threshold`` (the authors' exact formula).

    The norm is taken in the latents' own dtype and divided by the element count, so the
    threshold depends on the resolution (an RMSE threshold ``r`` is ``r / sqrt(numel)`` here).
    """

    threshold: float
    # True ("residual-cores:T"): compare the last two real cores' outputs, never the zero-th
    # hit. Pipelined SRDS uses it: with K cores on [0, B, ..., (K-1)B] and (K-1)B = N-1, core K's
    # output is the zero-th hit itself, and the plain rule would stop on that coarse guess.
    cores_only: bool = False
    reads_latents = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold <= 0:
            raise InvalidPlanConfig(f"residual threshold must be > 0, got {self.threshold}")

    def should_stop(self, hits: HitHistory) -> bool:
        latest = hits.latest(cores_only=self.cores_only)
        if len(latest) < 2:
            return False
        before, last = as_tensor(latest[0].latent), as_tensor(latest[1].latent)
        diff = float(torch.linalg.vector_norm(last - before).double().item()) / last.numel()
        return diff < self.threshold

    def __str__(self) -> str:
        return f"{'residual-cores' if self.cores_only else 'residual'}:{self.threshold:g}"


def parse_stop(text: str | None) -> CoreIndex | Residual | None:
    """Read ``none``, ``core-index:M`` or ``residual:T`` (None means no rule)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    kind, sep, value = text.strip().partition(":")
    kind = kind.strip().lower().replace("_", "-")
    try:
        if sep and kind == "core-index":
            return CoreIndex(int(value))
        if sep and kind in ("residual", "residual-cores"):
            return Residual(float(value), cores_only=kind == "residual-cores")
    except ValueError as exc:
        raise InvalidPlanConfig(f"bad stop rule {text!r}: {exc}") from None
    raise InvalidPlanConfig(
        f"bad stop rule {text!r}: expected 'none', 'core-index:M', 'residual:TAU' or "
        "'residual-cores:TAU'"
    )
