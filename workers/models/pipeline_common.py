"""What the diffusers pipeline adapters share besides their base class: request parameters,
the private scheduler copy, per-row timesteps and conditioning, classifier-free guidance.

Each adapter calls its pipeline's own ``encode_prompt``, ``prepare_latents`` and scheduler
set-up (``pipeline_base.DiffusersAdapter``); this module only holds the plumbing they would
otherwise each repeat.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

import torch

from chords_mq.request import InvalidRequest
from chords_mq.solvers import Solver, first_order_swap, flow_match_euler, solver_for_scheduler

C = TypeVar("C")


def load_pipeline(class_name: str, path: str | Path, device: str, dtype: torch.dtype | None) -> Any:
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(str(path), torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Params:
    """A request's params for one family: only ``allowed`` keys and a non-empty ``prompt``, read
    through accessors that raise ``InvalidRequest`` naming the family."""

    def __init__(self, family: str, params: dict[str, Any], allowed: AbstractSet[str]) -> None:
        unknown = set(params) - allowed - {"prompt"}
        if unknown:
            raise InvalidRequest(f"{family}: unknown params {sorted(unknown)}")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest(f"{family}: a prompt is required")
        self.family = family
        self.prompt: str = prompt
        self.values = dict(params)

    def get(self, key: str, default: Any = None) -> Any:
        """The value as given (unchecked), or ``default``."""
        return self.values.get(key, default)

    def number(self, key: str, default: float, low: float = 0.0) -> float:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(f"{self.family}: {key} must be a number")
        if not math.isfinite(value) or value < low:
            raise InvalidRequest(f"{self.family}: {key} must be >= {low}")
        return float(value)

    def text(self, key: str) -> str | None:
        value = self.values.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{self.family}: {key} must be a string")
        return value

    def size(self, height: float, width: float, multiple: int) -> tuple[int, int]:
        """``height`` and ``width`` (defaults as given), each a positive multiple of
        ``multiple``."""
        h = int(self.number("height", height, 1))
        w = int(self.number("width", width, 1))
        if h % multiple or w % multiple:
            raise InvalidRequest(f"{self.family}: height and width must be multiples of {multiple}")
        return h, w


def first_order_scheduler(scheduler: Any) -> Any:
    """The first-order member of ``scheduler``'s family (``solvers.first_order_swap``) made from
    its config, or ``scheduler`` itself when it needs no swap."""
    swap = first_order_swap(scheduler)
    if swap is None:
        return scheduler
    import diffusers

    name, overrides = swap
    return getattr(diffusers, name).from_config(scheduler.config, **overrides)


def video_flow_solver(scheduler: Any) -> Solver:
    """The solver of the video families that keep ``scheduler.step``'s output dtype (Wan,
    HunyuanVideo): flow-matching Euler on the sigmas of a FlowMatch Euler scheduler or of UniPC
    on flow sigmas (as the CHORDS authors run Wan), with the step's output dtype kept; any
    other scheduler's own step otherwise (for example DPM-Solver++ on flow sigmas in its
    first-order form)."""
    name = type(scheduler).__name__
    if name == "FlowMatchEulerDiscreteScheduler" or (
        name == "UniPCMultistepScheduler" and getattr(scheduler.config, "use_flow_sigmas", False)
    ):
        return flow_match_euler(scheduler.sigmas.to(torch.float32), keep_latent_dtype=False)
    return solver_for_scheduler(scheduler)


def private_scheduler(pipe: Any) -> Any:
    """A copy of the pipeline's scheduler, so concurrent requests never share timestep state."""
    return copy.deepcopy(pipe.scheduler)


def seeded(seed: int) -> torch.Generator:
    """The generator a user would pass: on the CPU, seeded with the request's seed."""
    return torch.Generator(device="cpu").manual_seed(seed)


def row_timesteps(timesteps: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    """Timesteps for a batch of tasks: exactly ``timesteps[i]`` (0-dim) for one task, as the
    pipeline's loop indexes it, and one entry per row for several."""
    return timesteps[steps[0]] if len(steps) == 1 else timesteps[list(steps)]


def expanded_timesteps(timesteps: torch.Tensor, steps: Sequence[int], batch: int) -> torch.Tensor:
    """One timestep per row: one task's ``t.expand(batch)``, as the video pipelines' loops
    expand it, or one entry per task."""
    t = row_timesteps(timesteps, steps)
    return t.expand(batch) if t.dim() == 0 else t


def repeat_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Conditioning for ``batch`` latents (the tensor itself for a batch of one)."""
    return tensor if batch == 1 else tensor.repeat_interleave(batch, dim=0)


def cfg_inputs(
    x: torch.Tensor, timesteps: torch.Tensor, steps: Sequence[int], cfg: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input and timesteps for a classifier-free-guidance batch ``[x; x]`` (or ``x``),
    built as the SD3 and CogVideoX loops build them: one task's 0-dim ``t`` expanded to the
    batch, or one ``t`` per row, repeated for the second half."""
    model_input = torch.cat([x] * 2) if cfg else x
    t = row_timesteps(timesteps, steps)
    if t.dim() == 0:
        return model_input, t.expand(model_input.shape[0])
    return model_input, torch.cat([t, t]) if cfg else t


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance as every family's pipeline writes it, operation for operation:
    ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guided_halves(out: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """CFG in one batch ``[uncond; cond]`` (SD, SDXL, SD3, CogVideoX): its halves, guided."""
    uncond, cond = out.chunk(2)
    return guided(uncond, cond, scale)


def guided_passes(
    forward: Callable[[C], torch.Tensor], cond: C, negative: C | None, scale: float
) -> torch.Tensor:
    """CFG as two forwards (Flux and HunyuanVideo's true CFG, Wan): the conditional one, then,
    when there is a negative conditioning, the unconditional one and the two guided."""
    out = forward(cond)
    if negative is None:
        return out
    return guided(forward(negative), out, scale)
