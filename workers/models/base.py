"""The adapter protocol a worker drives: prepare once per request, denoise per task, decode.

An adapter owns the model on one device. ``prepare`` does the once-per-request work (encode the
conditioning, make the seeded initial latent exactly as the pipeline would, set up the schedule)
and returns it with the solver of its scheduler. ``denoise`` is one network evaluation for a
batch of latents, each at its own step, returned on the adapter's device. ``evaluate`` is what
a worker does with a task: the forward, then every solver result the task targets, on the same
device and in the model's dtype, exactly as the pipeline's own loop would compute its step.
Adapters raise ``InvalidRequest`` for bad params.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from chords_mq.request import RequestSpec
from chords_mq.solvers import Solver, solve_targets


@dataclass
class Prepared:
    """What PREPARE yields: the initial latent, the solver, and the adapter's cached context.

    ``x0`` is kept on the CPU, where plans run (the broker's, or ``chords_mq.local``'s), however
    the adapter drew it: a pipeline on a GPU draws its noise on the CPU generator and moves it to
    the device, and moving it back is exact. ``result_dtype``: the dtype every task's results
    have, where the adapter knows it before running one (PREPARED declares it, and the broker
    holds every result to it); None leaves it to the first result.
    """

    x0: torch.Tensor
    solver: Solver
    context: Any
    result_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.x0 = self.x0.detach().to("cpu")


class ModelAdapter(Protocol):
    name: str
    dtype: str
    max_batch: int
    device: torch.device

    def prepare(self, request: RequestSpec) -> Prepared: ...

    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        """Model outputs for ``latents`` (batch on dim 0), row b evaluated at ``steps[b]``, on
        the adapter's device."""
        ...

    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Decoded media (uint8) for one final latent."""
        ...


def evaluate(
    adapter: ModelAdapter,
    context: Any,
    solver: Solver,
    latents: Sequence[torch.Tensor],
    steps: Sequence[int],
    targets: Sequence[Sequence[int]],
) -> list[dict[int, torch.Tensor]]:
    """Tasks run the way a worker runs them: one forward for all ``latents`` (usually one, in
    the pipeline's own batch shape), then ``S(x_b, v_b, steps[b], j)`` for each of task b's
    ``targets``, on the adapter's device, and the results copied to the CPU for the wire.
    The forward's output is this evaluation's own: with one task, its last target is computed
    in that memory where the solver can (``solve_targets``' ``spare_out``; the same bits)."""
    batch = latents[0].unsqueeze(0) if len(latents) == 1 else torch.stack(list(latents))
    on_cpu = adapter.device.type == "cpu"
    x = batch if on_cpu else batch.to(adapter.device)
    out = adapter.denoise(context, x, steps)
    spare = len(latents) == 1  # (a row of a larger batch would be kept as a copy)
    results = []
    for row, (step, wanted) in enumerate(zip(steps, targets)):
        solved = solve_targets(solver, x[row], out[row], step, wanted, spare)
        results.append(solved if on_cpu else {j: r.to("cpu") for j, r in solved.items()})
    return results


def pixels_to_uint8(images: Any) -> torch.Tensor:
    """A pipeline's ``output_type="np"`` images (floats in [0, 1], ..., H, W, C) as uint8,
    rounded exactly as diffusers' ``numpy_to_pil`` does, so PNGs match the pipeline's own."""
    import numpy as np

    array = np.asarray(images)
    return torch.from_numpy((array * 255).round().astype("uint8"))


def in_process(adapter: ModelAdapter, prepared: Prepared) -> Any:
    """An ``Evaluate`` for ``chords_mq.local.run_tasks``: each task exactly as a worker runs it
    (``evaluate`` with a batch of one), in this process."""

    def run(x: torch.Tensor, step: int, targets: tuple[int, ...]) -> dict[int, torch.Tensor]:
        return evaluate(adapter, prepared.context, prepared.solver, [x], [step], [targets])[0]

    return run
