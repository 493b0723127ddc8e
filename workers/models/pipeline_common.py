"""What the diffusers pipeline adapters share: loading, parameter checks, per-row timesteps.

Each adapter calls its pipeline's own ``encode_prompt``, ``prepare_latents`` and scheduler
set-up; this module only holds the plumbing they would otherwise each repeat.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chords_mq.request import InvalidRequest


def load_pipeline(class_name: str, path: str | Path, device: str, dtype: torch.dtype | None) -> Any:
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(str(path), torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checked_params(family: str, params: dict[str, Any], allowed: set[str]) -> dict[str, Any]:
    unknown = set(params) - allowed - {"prompt"}
    if unknown:
        raise InvalidRequest(f"{family}: unknown params {sorted(unknown)}")
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest(f"{family}: a prompt is required")
    return dict(params)


def number(
    family: str, params: dict[str, Any], key: str, default: float, low: float = 0.0
) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{family}: {key} must be a number")
    if not math.isfinite(value) or value < low:
        raise InvalidRequest(f"{family}: {key} must be >= {low}")
    return float(value)


def text(family: str, params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{family}: {key} must be a string")
    return value


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


def repeat_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Conditioning for ``batch`` latents (the tensor itself for a batch of one)."""
    return tensor if batch == 1 else tensor.repeat_interleave(batch, dim=0)


def cfg_inputs(x: torch.Tensor, t: torch.Tensor, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input and timesteps for a classifier-free-guidance batch ``[x; x]`` (or ``x``),
    built as the SD3 and CogVideoX loops build them: one task's 0-dim ``t`` expanded to the
    batch, or one ``t`` per row, repeated for the second half."""
    model_input = torch.cat([x] * 2) if cfg else x
    if t.dim() == 0:
        return model_input, t.expand(model_input.shape[0])
    return model_input, torch.cat([t, t]) if cfg else t
