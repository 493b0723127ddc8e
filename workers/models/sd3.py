"""The Stable Diffusion 3 / 3.5 adapter: wraps a local ``StableDiffusion3Pipeline``.

``prepare`` calls the pipeline's ``encode_prompt`` (three text encoders, negative prompt for
CFG), ``prepare_latents`` with a seeded CPU generator, and its scheduler set-up (dynamic shift
``mu`` when configured) on a private scheduler copy. ``denoise`` is the transformer call of the
pipeline's loop with CFG in one batch of 2. Solver: flow-matching Euler, bitwise equal to
``scheduler.step``. Skip-layer guidance is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_for_scheduler
from chords_mq.workers.models.base import Prepared, pixels_to_uint8
from chords_mq.workers.models.pipeline_common import (
    cfg_inputs,
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
    "prompt_2",
    "prompt_3",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
    "height",
    "width",
    "guidance_scale",
    "max_sequence_length",
}


@dataclass
class SD3Context:
    prompt_embeds: torch.Tensor  # [negative; positive] with CFG
    pooled: torch.Tensor
    guidance_scale: float  # 1.0: no CFG
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]


class SD3Adapter:
    name = "sd3"
    max_batch = 8
    pixel_space = False

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("StableDiffusion3Pipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        params = checked_params("sd3", request.params, ALLOWED)
        pipe = self.pipe
        default = pipe.default_sample_size * pipe.vae_scale_factor
        height = int(number("sd3", params, "height", default, 1))
        width = int(number("sd3", params, "width", default, 1))
        multiple = pipe.vae_scale_factor * pipe.patch_size
        if height % multiple or width % multiple:
            raise InvalidRequest(f"sd3: height and width must be multiples of {multiple}")
        guidance = number("sd3", params, "guidance_scale", 7.0)
        cfg = guidance > 1
        device = pipe._execution_device
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=params["prompt"],
            prompt_2=text("sd3", params, "prompt_2"),
            prompt_3=text("sd3", params, "prompt_3"),
            negative_prompt=text("sd3", params, "negative_prompt"),
            negative_prompt_2=text("sd3", params, "negative_prompt_2"),
            negative_prompt_3=text("sd3", params, "negative_prompt_3"),
            do_classifier_free_guidance=cfg,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=int(number("sd3", params, "max_sequence_length", 256, 1)),
        )
        if cfg:
            embeds = torch.cat([negative, embeds], dim=0)
            pooled = torch.cat([negative_pooled, pooled], dim=0)
        latents = pipe.prepare_latents(
            1,
            pipe.transformer.config.in_channels,
            height,
            width,
            embeds.dtype,
            device,
            seeded(request.seed),
            None,
        )
        scheduler = private_scheduler(pipe)
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device, **kwargs)
        context = SD3Context(
            embeds, pooled, guidance if cfg else 1.0, timesteps, tuple(latents.shape)
        )
        return Prepared(x0=latents, solver=solver_for_scheduler(scheduler), context=context)

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, *context.latent_shape[1:]).to(self.pipe._execution_device)
        batch = x.shape[0]
        cfg = context.guidance_scale != 1.0
        model_input, timestep = cfg_inputs(x, row_timesteps(context.timesteps, steps), cfg)
        out: torch.Tensor = self.pipe.transformer(
            hidden_states=model_input,
            timestep=timestep,
            encoder_hidden_states=repeat_rows(context.prompt_embeds, batch),
            pooled_projections=repeat_rows(context.pooled, batch),
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + context.guidance_scale * (cond - uncond)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        pipe = self.pipe
        x = latent.reshape(context.latent_shape).to(pipe._execution_device)
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(x, return_dict=False)[0]
        return pixels_to_uint8(pipe.image_processor.postprocess(image, output_type="np")[0])
