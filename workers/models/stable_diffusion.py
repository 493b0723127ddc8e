"""The Stable Diffusion adapter: wraps a local ``StableDiffusionPipeline`` and its pieces.

``prepare`` runs the pipeline's ``encode_prompt`` (prompt and negative prompt, once per request),
its scheduler set-up (``retrieve_timesteps`` on a private copy of the scheduler) and its
``prepare_latents`` with a seeded CPU generator. ``denoise`` is the UNet call of the pipeline's
loop with classifier-free guidance in one batch of 2. The solver is DDIM (eta = 0) in
``DDIMScheduler.step``'s own form, bitwise equal to it, so the sequential output equals
``pipe(..., output_type="latent")`` bit for bit. Other schedulers are refused: CHORDS needs a
one-output solver.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_for_scheduler
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

ALLOWED = {"negative_prompt", "height", "width", "guidance_scale"}


@dataclass
class SDContext:
    prompt_embeds: torch.Tensor  # [negative; positive] when guidance is on, else positive
    guidance_scale: float
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds and time_ids, same rows


class StableDiffusionAdapter:
    name = "stable-diffusion"
    max_batch = 8
    pixel_space = False

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("StableDiffusionPipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        self.dtype = str(self.pipe.unet.dtype).removeprefix("torch.")
        solver_for_scheduler(_configured(self.pipe.scheduler, 2))  # refuse non-DDIM at load

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            retrieve_timesteps,
        )

        family = "stable-diffusion"
        params = checked_params(family, request.params, ALLOWED)
        pipe = self.pipe
        size = pipe.unet.config.sample_size
        default = (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor
        height = int(number(family, params, "height", default, 1))
        width = int(number(family, params, "width", default, 1))
        if height % 8 or width % 8:
            raise InvalidRequest(f"{family}: height and width must be multiples of 8")
        guidance = number(family, params, "guidance_scale", 7.5)
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        device = pipe._execution_device
        positive, negative = pipe.encode_prompt(
            params["prompt"], device, 1, cfg, text(family, params, "negative_prompt")
        )
        embeds = torch.cat([negative, positive]) if cfg else positive
        scheduler = private_scheduler(pipe)
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device)
        latents = pipe.prepare_latents(
            1,
            pipe.unet.config.in_channels,
            height,
            width,
            embeds.dtype,
            device,
            seeded(request.seed),
            None,
        )
        context = SDContext(
            embeds, float(guidance) if cfg else 1.0, timesteps, tuple(latents.shape)
        )
        return Prepared(x0=latents, solver=solver_for_scheduler(scheduler), context=context)

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, *context.latent_shape[1:]).to(self.pipe._execution_device)
        batch = x.shape[0]
        cfg = context.guidance_scale != 1.0
        t = row_timesteps(context.timesteps, steps)  # one task: the pipeline's own 0-dim t
        if t.dim() == 1 and cfg:
            t = torch.cat([t, t])
        embeds = repeat_rows(context.prompt_embeds, batch)
        model_input = torch.cat([x] * 2) if cfg else x
        added = None
        if context.added is not None:
            added = {k: repeat_rows(v, batch) for k, v in context.added.items()}
        out: torch.Tensor = self.pipe.unet(
            model_input,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + context.guidance_scale * (text - uncond)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        x = latent.reshape(context.latent_shape).to(pipe._execution_device)
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
        return pixels_to_uint8(pixels[0])


def _configured(scheduler: Any, steps: int) -> Any:
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    return probe


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """``StableDiffusionXLPipeline``: two text encoders, pooled text embeddings and the size and
    crop "time ids" as added conditioning, both prepared by the pipeline's own methods."""

    name = "stable-diffusion-xl"

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("StableDiffusionXLPipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        self.dtype = str(self.pipe.unet.dtype).removeprefix("torch.")
        solver_for_scheduler(_configured(self.pipe.scheduler, 2))  # refuse non-DDIM at load

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
            retrieve_timesteps,
        )

        family = "stable-diffusion-xl"
        params = checked_params(
            family,
            request.params,
            {
                "prompt_2",
                "negative_prompt",
                "negative_prompt_2",
                "height",
                "width",
                "guidance_scale",
            },
        )
        pipe = self.pipe
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height = int(number(family, params, "height", default, 1))
        width = int(number(family, params, "width", default, 1))
        if height % 8 or width % 8:
            raise InvalidRequest(f"{family}: height and width must be multiples of 8")
        guidance = number(family, params, "guidance_scale", 5.0)
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        device = pipe._execution_device
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=params["prompt"],
            prompt_2=text(family, params, "prompt_2"),
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=text(family, params, "negative_prompt"),
            negative_prompt_2=text(family, params, "negative_prompt_2"),
        )
        scheduler = private_scheduler(pipe)
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device)
        latents = pipe.prepare_latents(
            1,
            pipe.unet.config.in_channels,
            height,
            width,
            embeds.dtype,
            device,
            seeded(request.seed),
            None,
        )
        projection = (
            int(pooled.shape[-1])
            if pipe.text_encoder_2 is None
            else pipe.text_encoder_2.config.projection_dim
        )
        time_ids = pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=embeds.dtype,
            text_encoder_projection_dim=projection,
        )
        if cfg:
            embeds = torch.cat([negative, embeds], dim=0)
            pooled = torch.cat([negative_pooled, pooled], dim=0)
            time_ids = torch.cat([time_ids, time_ids], dim=0)
        added = {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device)}
        context = SDContext(
            embeds.to(device), guidance if cfg else 1.0, timesteps, tuple(latents.shape), added
        )
        return Prepared(x0=latents, solver=solver_for_scheduler(scheduler), context=context)

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        vae = pipe.vae
        x = latent.reshape(context.latent_shape).to(pipe._execution_device)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(x.device, x.dtype)
            std_t = torch.tensor(std).view(1, 4, 1, 1).to(x.device, x.dtype)
            x = x * std_t / vae.config.scaling_factor + mean_t
        else:
            x = x / vae.config.scaling_factor
        image = vae.decode(x, return_dict=False)[0]
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pixels_to_uint8(pipe.image_processor.postprocess(image, output_type="np")[0])
