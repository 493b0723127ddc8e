"""How far apart two results are, for verification across device classes
(``broker.tolerance`` says what the numbers mean and when they agree): the worker that holds
one result and fetched the other computes them, in float32, a bounded chunk at a time, so what
it allocates stays small whatever the latent's size. No I/O."""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 16  # elements compared at a time
EPS = 1e-12  # keeps two all-zero results 0 apart


def distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max_rel, rms_rel)`` of ``a`` from ``b``: max |a - b| over the larger max |.| of the
    two, and rms(a - b) over the larger rms; symmetric in ``a`` and ``b``. Different shapes, or
    a NaN or Inf in either, are infinitely far apart."""
    if a.shape != b.shape:
        return math.inf, math.inf
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    n = flat_a.numel()
    if n == 0:
        return 0.0, 0.0
    max_diff = max_a = max_b = 0.0
    sq_diff = sq_a = sq_b = 0.0
    for start in range(0, n, CHUNK):
        ca = flat_a[start : start + CHUNK].to(torch.float32)
        cb = flat_b[start : start + CHUNK].to(torch.float32)
        diff = ca - cb
        max_diff = max(max_diff, float(diff.abs().max()))
        max_a = max(max_a, float(ca.abs().max()))
        max_b = max(max_b, float(cb.abs().max()))
        sq_diff += float(diff.double().square().sum())
        sq_a += float(ca.double().square().sum())
        sq_b += float(cb.double().square().sum())
    values = (max_diff, max_a, max_b, sq_diff, sq_a, sq_b)
    if not all(math.isfinite(value) for value in values):
        return math.inf, math.inf
    max_rel = max_diff / (max(max_a, max_b) + EPS)
    rms_rel = math.sqrt(sq_diff / n) / (math.sqrt(max(sq_a, sq_b) / n) + EPS)
    return max_rel, rms_rel
