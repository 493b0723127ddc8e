"""Init sequences: where each core starts (CHORDS-SPEC section 7).

``theorem25_times`` is the paper's Theorem 2.5 recursion on [0, 1); ``init_sequence`` rounds it
onto a 0.96 N horizon, which reproduces the paper's K = 4 / 6 / 8 sequences exactly at N = 50,
and validates explicit sequences. A gap of 1 gives a core that adds no speed: that warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise
from typing import Any

from chords_mq.errors import DuplicateCoreWarning, InvalidInitSequence, InvalidPlanConfig

# s per K: 3, 4 and 6 are the paper's (K = 4, 6, 8); the others interpolate (CHORDS-SPEC 7).
DEFAULT_SPEEDUP = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}
HORIZON = Fraction(24, 25)  # 0.96: the paper's sequences live on a 48-step horizon at N = 50


def default_speedup(cores: int) -> int:
    return DEFAULT_SPEEDUP.get(cores, cores - 2)


def theorem25_times(cores: int, speedup: float | Fraction) -> list[Fraction] | list[float]:
    """Start times ``t^(1..K)`` in [0, 1) of the Theorem 2.5 recursion for target speedup s.

    ``t^(K) = (s-1)/s`` with a virtual ``t^(K+1) = 1``; going down, ``t^(k) = 2 t^(k+1) - t^(k+2)``
    while ``t^(k+1) > 2 t^(k+2) / 3``, else ``t^(k+1) / 2``; ``t^(1) = 0``. An int or Fraction
    speedup gives exact Fractions, a float gives floats.
    """
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise InvalidPlanConfig(f"cores must be an integer >= 1, got {cores!r}")
    if cores == 1:
        return [Fraction(0)]
    s: Fraction | float = Fraction(speedup) if isinstance(speedup, int) else speedup
    if not s > 1:
        raise InvalidPlanConfig(f"speedup must be > 1 for {cores} cores, got {speedup}")
    zero, one = (Fraction(0), Fraction(1)) if isinstance(s, Fraction) else (0.0, 1.0)
    t: list[Any] = [zero] * cores + [one]  # t[k - 1] is t^(k); t[K] is the virtual t^(K+1) = 1
    t[cores - 1] = (s - 1) / s
    for k in range(cores - 2, 0, -1):
        t[k] = 2 * t[k + 1] - t[k + 2] if t[k + 1] > 2 * t[k + 2] / 3 else t[k + 1] / 2
    return t[:cores]


def validate_init_sequence(sequence: Sequence[int], steps: int, *, warn: bool = True) -> list[int]:
    """Check ``0 = i_1 < i_2 < ... < i_K <= N - 1`` and return the sequence as a list of ints."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidPlanConfig(f"steps must be an integer >= 1, got {steps!r}")
    seq = list(sequence)
    if not seq:
        raise InvalidInitSequence("the init sequence is empty: it needs at least [0]")
    for value in seq:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInitSequence(f"init steps must be integers, got {value!r} in {seq}")
    if seq[0] != 0:
        raise InvalidInitSequence(f"the init sequence must start at step 0 (core 1), got {seq}")
    for a, b in pairwise(seq):
        if b <= a:
            raise InvalidInitSequence(f"the init sequence must be strictly increasing, got {seq}")
    if seq[-1] > steps - 1:
        raise InvalidInitSequence(
            f"the last core must start at a step <= N - 1 = {steps - 1}, got {seq[-1]} in {seq}"
        )
    if warn:
        duplicates = [k + 1 for k in range(1, len(seq)) if seq[k] - seq[k - 1] == 1]
        if duplicates:
            warnings.warn(
                f"init sequence {seq}: core(s) {duplicates} start one step after the slower core; "
                "such a core repeats it and adds no speed",
                DuplicateCoreWarning,
                stacklevel=2,
            )
    return seq


def init_sequence(
    cores: int | Sequence[int], steps: int, speedup: float | Fraction | None = None
) -> list[int]:
    """The init sequence for ``cores`` cores and ``steps`` steps, or an explicit one validated.

    ``cores`` may be an explicit sequence (then ``speedup`` must be None). Otherwise: the Theorem
    2.5 times for ``speedup`` (default ``default_speedup(cores)``), scaled to a ``0.96 N``
    horizon, rounded half up, then forced strictly increasing within ``[0, N - 1]``.
    """
    if not isinstance(cores, int):
        if speedup is not None:
            raise InvalidPlanConfig("give either an explicit sequence or a speedup, not both")
        return validate_init_sequence(cores, steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidPlanConfig(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(cores, bool) or cores < 1:
        raise InvalidPlanConfig(f"cores must be an integer >= 1, got {cores!r}")
    if cores > steps:
        raise InvalidPlanConfig(f"{cores} cores need at least {cores} steps, got {steps}")
    s = default_speedup(cores) if speedup is None else speedup
    horizon = HORIZON * steps
    seq = [math.floor(horizon * Fraction(t) + Fraction(1, 2)) for t in theorem25_times(cores, s)]
    seq[0] = 0
    for k in range(1, cores):
        seq[k] = max(seq[k], seq[k - 1] + 1)
    for k in range(cores - 1, 0, -1):
        seq[k] = min(seq[k], steps - 1 - (cores - 1 - k))
    return validate_init_sequence(seq, steps)
