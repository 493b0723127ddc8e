"""The Wan2.1 adapter: wraps a local ``WanPipeline``.

CHORDS needs a solver that uses one model output per step, so, as the paper's authors do, this
adapter does not use the pipeline's UniPC multistep update. It takes UniPC's own flow sigmas and
timesteps (the pipeline's ``scheduler.set_timesteps``) and integrates them with flow-matching
Euler (sigmas held as float32, the output kept in the model's dtype, exactly as
``FlowMatchEulerDiscreteScheduler.step`` does). So "sequential" for Wan means that Euler solve:
it equals the pipeline run with a FlowMatchEulerDiscreteScheduler on the same sigmas, not the
pipeline's default UniPC output. ``denoise`` is the loop's transformer call, CFG as two passes.
Wan 2.2's second transformer (boundary_ratio) and expand_timesteps are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import flow_match_euler
from chords_mq.workers.models.base import Prepared, pixels_to_uint8
from chords_mq.workers.models.pipeline_common import (
    checked_params,
    load_pipeline,
    number,
    private_scheduler,
    repeat_rows,
    row_timesteps,
    seeded,
    text,
)

ALLOWED = {
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "guidance_scale",
    "max_sequence_length",
}


@dataclass
class WanContext:
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None  # None: no CFG
    guidance_scale: float
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]


def euler_sigmas(scheduler: Any) -> torch.Tensor:
    """The scheduler's sigma grid (N + 1 values ending at 0) as float32."""
    sigmas: torch.Tensor = scheduler.sigmas.to(torch.float32)
    return sigmas


class WanAdapter:
    name = "wan"
    max_batch = 4
    pixel_space = False

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("WanPipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        config = self.pipe.config
        if getattr(config, "boundary_ratio", None) is not None or getattr(
            config, "expand_timesteps", False
        ):
            raise ValueError("wan: Wan 2.2 pipelines (two transformers) are not supported")
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = checked_params("wan", request.params, ALLOWED)
        pipe = self.pipe
        height = int(number("wan", params, "height", 480, 1))
        width = int(number("wan", params, "width", 832, 1))
        frames = int(number("wan", params, "num_frames", 81, 1))
        if height % 16 or width % 16:
            raise InvalidRequest("wan: height and width must be multiples of 16")
        if frames % pipe.vae_scale_factor_temporal != 1:
            raise InvalidRequest(
                f"wan: num_frames - 1 must be a multiple of {pipe.vae_scale_factor_temporal}"
            )
        guidance = number("wan", params, "guidance_scale", 5.0)
        cfg = guidance > 1
        device = pipe._execution_device
        embeds, negative = pipe.encode_prompt(
            prompt=params["prompt"],
            negative_prompt=text("wan", params, "negative_prompt"),
            do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1,
            max_sequence_length=int(number("wan", params, "max_sequence_length", 512, 1)),
            device=device,
        )
        dtype = pipe.transformer.dtype
        embeds = embeds.to(dtype)
        negative = negative.to(dtype) if cfg else None
        scheduler = private_scheduler(pipe)
        scheduler.set_timesteps(request.steps, device=device)
        latents = pipe.prepare_latents(
            1,
            pipe.transformer.config.in_channels,
            height,
            width,
            frames,
            torch.float32,
            device,
            seeded(request.seed),
            None,
        )
        context = WanContext(embeds, negative, guidance, scheduler.timesteps, tuple(latents.shape))
        solver = flow_match_euler(euler_sigmas(scheduler), keep_latent_dtype=False)
        return Prepared(x0=latents, solver=solver, context=context)

    def _forward(
        self, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self.pipe.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=repeat_rows(embeds, x.shape[0]),
            attention_kwargs=None,
            return_dict=False,
        )[0]
        return out

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, *context.latent_shape[1:]).to(self.pipe._execution_device)
        x = x.to(self.pipe.transformer.dtype)
        t = row_timesteps(context.timesteps, steps)
        timestep = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self._forward(x, timestep, context.prompt_embeds)
        if context.negative_embeds is not None:
            uncond = self._forward(x, timestep, context.negative_embeds)
            out = uncond + context.guidance_scale * (out - uncond)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Video frames (F, H, W, C) uint8, from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        vae = pipe.vae
        x = latent.reshape(context.latent_shape).to(pipe._execution_device, dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        video = vae.decode(x / std + mean, return_dict=False)[0]
        return pixels_to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])
