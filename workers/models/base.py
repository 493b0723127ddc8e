"""The adapter protocol a worker drives: prepare once per request, denoise per task, decode.

An adapter owns the model on one device. ``prepare`` does the once-per-request work (encode the
conditioning, make the seeded initial latent exactly as the pipeline would, set up the schedule)
and returns it with the solver the plan must use. ``denoise`` is one network evaluation for a
batch of latents, each at its own step. Adapters raise ``InvalidRequest`` for bad params.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from chords_mq.request import RequestSpec
from chords_mq.solvers import Solver


@dataclass
class Prepared:
    """What PREPARE yields: the initial latent, the solver, and the adapter's cached context.

    ``x0`` is kept on the CPU, where plans run (the broker's, or ``chords_mq.local``'s), however
    the adapter drew it: a pipeline on a GPU draws its noise on the CPU generator and moves it to
    the device, and moving it back is exact.
    """

    x0: torch.Tensor
    solver: Solver
    context: Any

    def __post_init__(self) -> None:
        self.x0 = self.x0.detach().to("cpu")


class ModelAdapter(Protocol):
    name: str
    dtype: str
    max_batch: int

    def prepare(self, request: RequestSpec) -> Prepared: ...

    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        """Model outputs for ``latents`` (batch on dim 0), row b evaluated at ``steps[b]``."""
        ...

    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Decoded media (uint8) for one final latent."""
        ...


def pixels_to_uint8(images: Any) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` images (floats in [0, 1], ..., H, W, C) as uint8,
    rounded exactly as diffusers' ``numpy_to_pil`` does, so PNGs match the pipeline's own."""
    import numpy as np

    array = np.asarray(images)
    return torch.from_numpy((array * 255).round().astype("uint8"))
