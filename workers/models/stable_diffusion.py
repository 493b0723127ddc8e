"""The Stable Diffusion adapter: wraps a local ``StableDiffusionPipeline`` and its pieces.

``prepare`` runs the pipeline's ``encode_prompt`` (prompt and negative prompt, once per request),
its scheduler set-up (``retrieve_timesteps`` on a private copy of the scheduler) and its
``prepare_latents`` with a seeded CPU generator. ``denoise`` is the UNet call of the pipeline's
loop with classifier-free guidance in one batch of 2 (the input scaled as Euler discrete's
``scale_model_input`` says). The solver repeats the step of the scheduler the worker runs (DDIM,
Euler discrete, or a multistep scheduler's first-order form: ``solvers.solver_for_scheduler``),
so the sequential output equals ``pipe(..., output_type="latent")`` with that scheduler bit for
bit. A scheduler CHORDS cannot solve with, or one whose timestep set-up fails, is refused at load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import (
    Params,
    guided_halves,
    repeat_rows,
    row_timesteps,
)


@dataclass
class SDContext:
    prompt_embeds: torch.Tensor  # [negative; positive] when guidance is on, else positive
    guidance_scale: float
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds and time_ids, same rows
    # the scheduler's scale_model_input as the solver does it (Euler discrete); None: identity
    scale: Callable[[torch.Tensor, Sequence[int]], torch.Tensor] | None = None


class StableDiffusionAdapter(DiffusersAdapter):
    name = "stable-diffusion"
    pipeline = "StableDiffusionPipeline"
    allowed = frozenset({"negative_prompt", "height", "width", "guidance_scale"})
    max_batch = 8
    default_guidance = 7.5
    scales_model_input = True  # Euler discrete's input scaling, in _noise_pred
    published_scheduler = "PNDMScheduler (1.x) or EulerDiscreteScheduler (2.x)"
    switch_scheduler = "EulerDiscreteScheduler.from_config(pipe.scheduler.config)"

    @property
    def denoiser(self) -> Any:
        return self.pipe.unet

    def _default_size(self) -> tuple[int, int]:
        size = self.pipe.unet.config.sample_size
        default = int((size if isinstance(size, int) else size[0]) * self.pipe.vae_scale_factor)
        return default, default

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        # SDXL's retrieve_timesteps is a copy of this one ("Copied from" in diffusers)
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            retrieve_timesteps,
        )

        return self._timesteps(retrieve_timesteps, steps)

    def _encode(
        self, params: Params, cfg: bool, height: int, width: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet's text conditioning ([negative; positive] with CFG) and added conditioning."""
        positive, negative = self.pipe.encode_prompt(
            params.prompt, self.pipe._execution_device, 1, cfg, params.text("negative_prompt")
        )
        return (torch.cat([negative, positive]) if cfg else positive), None

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = self._params(request)
        pipe = self.pipe
        height, width = params.size(*self._default_size(), 8)
        guidance = params.number("guidance_scale", self.default_guidance)
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        embeds, added = self._encode(params, cfg, height, width)
        scheduler, timesteps, solver = self._schedule(request.steps, height, width)
        latents = self._initial_latents(
            request.seed,
            pipe.unet.config.in_channels,
            height,
            width,
            dtype=embeds.dtype,
            scheduler=scheduler,
        )
        context = SDContext(
            embeds,
            guidance if cfg else 1.0,
            timesteps,
            tuple(latents.shape),
            added,
            getattr(solver, "scale_model_input", None),
        )
        return self._prepared(latents, solver, context)

    def _noise_pred(
        self, context: SDContext, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        batch = x.shape[0]
        cfg = context.guidance_scale != 1.0
        t = row_timesteps(context.timesteps, steps)  # one task: the pipeline's own 0-dim t
        if t.dim() == 1 and cfg:
            t = torch.cat([t, t])
        embeds = repeat_rows(context.prompt_embeds, batch)
        model_input = torch.cat([x] * 2) if cfg else x
        if context.scale is not None:
            model_input = context.scale(model_input, steps)
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
        return guided_halves(out, context.guidance_scale) if cfg else out

    def _pixels(self, context: SDContext, x: torch.Tensor) -> Any:
        pipe = self.pipe
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])[0]


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """``StableDiffusionXLPipeline``: two text encoders, pooled text embeddings and the size and
    crop "time ids" as added conditioning, both prepared by the pipeline's own methods."""

    name = "stable-diffusion-xl"
    pipeline = "StableDiffusionXLPipeline"
    allowed = frozenset(
        {"prompt_2", "negative_prompt", "negative_prompt_2", "height", "width", "guidance_scale"}
    )
    default_guidance = 5.0
    published_scheduler = "EulerDiscreteScheduler"

    def _default_size(self) -> tuple[int, int]:
        default = int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)
        return default, default

    def _encode(
        self, params: Params, cfg: bool, height: int, width: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pipe = self.pipe
        device = pipe._execution_device
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=params.prompt,
            prompt_2=params.text("prompt_2"),
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=params.text("negative_prompt"),
            negative_prompt_2=params.text("negative_prompt_2"),
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
        return embeds.to(device), added

    def _pixels(self, context: SDContext, x: torch.Tensor) -> Any:
        pipe = self.pipe
        vae = pipe.vae
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
        return pipe.image_processor.postprocess(image, output_type="np")[0]
