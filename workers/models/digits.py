"""The digits adapter: the shipped demo model, a class-conditional rectified flow on 8x8 digits.

It works in pixel space: the latent is the image itself in [-1, 1], shape (1, 1, 8, 8). A
prompt such as ``"7"``, ``"a handwritten 7"`` or ``"seven"`` picks the class. Sampling is
``FlowMatchEulerDiscreteScheduler(shift=1)`` with ``timestep = 1000 sigma``; ``sample_sequential``
is the plain sampler that CHORDS' core 1 must reproduce bit for bit. Optional classifier-free
guidance (``guidance`` > 1) evaluates the null class and the digit in one batch of 2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_for_scheduler
from chords_mq.workers.models.base import Prepared

MODEL_DIR = Path(__file__).resolve().parent / "digits_model"
NULL_CLASS = 10
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_PROMPT = "a handwritten 7"


def digit_of(prompt: str) -> int:
    """The class a prompt asks for: the first digit or number word in it."""
    text = prompt.lower()
    match = re.search(r"\d", text)
    words = [(text.find(word), value) for value, word in enumerate(WORDS) if word in text]
    candidates = ([(match.start(), int(match.group()))] if match else []) + words
    if not candidates:
        raise InvalidRequest(f"digits model: no digit 0-9 in prompt {prompt!r}")
    return min(candidates)[1]


def to_image(latent: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """uint8 picture (H*scale, W*scale) of a (.., H, W) latent in [-1, 1], nearest-neighbour."""
    image = latent.reshape(latent.shape[-2:]).to(torch.float32)
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


@dataclass(frozen=True)
class DigitsContext:
    label: int
    guidance: float
    timesteps: torch.Tensor  # scheduler.timesteps, timesteps[i] is step i's network input
    scheduler_config: Any


class DigitsAdapter:
    name = "digits"
    pixel_space = True  # the latent is the picture: decode needs no model
    max_batch = 64
    dtype = "float32"

    def __init__(self, device: str = "cpu", path: str | Path | None = None) -> None:
        directory = Path(path) if path is not None else MODEL_DIR
        if not (directory / "config.json").exists():
            raise ValueError(f"digits model not found in {directory}")
        self.device = torch.device(device)
        self.unet = UNet2DModel.from_pretrained(directory, low_cpu_mem_usage=False)
        self.unet = self.unet.to(self.device).eval()
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(directory)

    def _scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return scheduler

    def prepare(self, request: RequestSpec) -> Prepared:
        params = dict(request.params)
        prompt = params.pop("prompt", DEFAULT_PROMPT)
        guidance = params.pop("guidance", 1.0)
        if params:
            raise InvalidRequest(f"digits model: unknown params {sorted(params)}")
        if not isinstance(prompt, (str, int)) or isinstance(prompt, bool):
            raise InvalidRequest("digits model: prompt must be a string such as 'a handwritten 7'")
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise InvalidRequest("digits model: guidance must be a number >= 0")
        label = digit_of(str(prompt))
        scheduler = self._scheduler(request.steps)
        generator = torch.Generator().manual_seed(request.seed)
        x0 = torch.randn((1, 1, 8, 8), generator=generator, dtype=torch.float32)
        context = DigitsContext(
            label, float(guidance), scheduler.timesteps.clone(), self.scheduler_config
        )
        # float32 throughout (the model, x0, the scheduler): so are the results.
        return Prepared(
            x0=x0,
            solver=solver_for_scheduler(scheduler),
            context=context,
            result_dtype=torch.float32,
        )

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, 1, 8, 8).to(self.device)
        out: torch.Tensor
        t = context.timesteps[list(steps)].to(self.device)
        labels = torch.full((len(steps),), context.label, device=self.device)
        if context.guidance == 1.0:
            out = self.unet(x, t, class_labels=labels).sample
        else:
            null = torch.full_like(labels, NULL_CLASS)
            both = self.unet(
                torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([null, labels])
            ).sample
            uncond, cond = both.chunk(2)
            out = uncond + context.guidance * (cond - uncond)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        return to_image(latent)

    def sample_sequential(self, request: RequestSpec) -> torch.Tensor:
        """The plain sampler: ``scheduler.step`` N times. CHORDS' core 1 must equal it bitwise."""
        prepared = self.prepare(request)
        scheduler = self._scheduler(request.steps)
        x = prepared.x0
        for i, t in enumerate(scheduler.timesteps):
            out = self.denoise(prepared.context, x.unsqueeze(0), [i])[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
        return x
