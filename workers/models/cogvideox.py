"""The CogVideoX adapter: wraps a local ``CogVideoXPipeline`` (DDIM, v-prediction, trailing).

``prepare`` calls the pipeline's ``encode_prompt`` ([negative; positive] for CFG), its scheduler
set-up, ``prepare_latents`` (frames padded for CogVideoX 1.5's temporal patches, seeded CPU
generator) and its rotary embeddings. ``denoise`` is the loop's transformer call; the output is
upcast to float32 and CFG combined in float32, with the dynamic guidance schedule when asked.
The solver is DDIM in ``CogVideoXDDIMScheduler.step``'s own ``a x + b x0`` form, cast back to
the latent's dtype as the pipeline does (``latents.to(prompt_embeds.dtype)``).
"""

from __future__ import annotations

import math
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
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "guidance_scale",
    "use_dynamic_cfg",
    "max_sequence_length",
}


@dataclass
class CogVideoXContext:
    prompt_embeds: torch.Tensor  # [negative; positive] with CFG
    guidance_scale: float  # 1.0: no CFG
    dynamic_cfg: bool
    steps: int
    rotary: Any
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]
    padding_frames: int


class CogVideoXAdapter:
    name = "cogvideox"
    max_batch = 4
    pixel_space = False

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("CogVideoXPipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        params = checked_params("cogvideox", request.params, ALLOWED)
        pipe = self.pipe
        config = pipe.transformer.config
        height = int(
            number(
                "cogvideox",
                params,
                "height",
                config.sample_height * pipe.vae_scale_factor_spatial,
                1,
            )
        )
        width = int(
            number(
                "cogvideox", params, "width", config.sample_width * pipe.vae_scale_factor_spatial, 1
            )
        )
        frames = int(number("cogvideox", params, "num_frames", config.sample_frames, 1))
        if height % 8 or width % 8:
            raise InvalidRequest("cogvideox: height and width must be multiples of 8")
        guidance = number("cogvideox", params, "guidance_scale", 6.0)
        dynamic = params.get("use_dynamic_cfg", False)
        if not isinstance(dynamic, bool):
            raise InvalidRequest("cogvideox: use_dynamic_cfg must be true or false")
        cfg = guidance > 1
        device = pipe._execution_device
        embeds, negative = pipe.encode_prompt(
            params["prompt"],
            text("cogvideox", params, "negative_prompt"),
            cfg,
            num_videos_per_prompt=1,
            max_sequence_length=int(number("cogvideox", params, "max_sequence_length", 226, 1)),
            device=device,
        )
        if cfg:
            embeds = torch.cat([negative, embeds], dim=0)
        scheduler = private_scheduler(pipe)
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device)
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        padding = 0
        if config.patch_size_t is not None and latent_frames % config.patch_size_t:
            padding = config.patch_size_t - latent_frames % config.patch_size_t
            frames += padding * pipe.vae_scale_factor_temporal
        latents = pipe.prepare_latents(
            1,
            config.in_channels,
            frames,
            height,
            width,
            embeds.dtype,
            device,
            seeded(request.seed),
            None,
        )
        rotary = (
            pipe._prepare_rotary_positional_embeddings(height, width, latents.size(1), device)
            if config.use_rotary_positional_embeddings
            else None
        )
        context = CogVideoXContext(
            embeds,
            guidance if cfg else 1.0,
            dynamic,
            request.steps,
            rotary,
            timesteps,
            tuple(latents.shape),
            padding,
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
            encoder_hidden_states=repeat_rows(context.prompt_embeds, batch),
            timestep=timestep,
            image_rotary_emb=context.rotary,
            attention_kwargs=None,
            return_dict=False,
        )[0]
        out = out.float()
        if cfg:
            uncond, cond = out.chunk(2)
            scale = torch.tensor(
                [self._scale(context, int(context.timesteps[s])) for s in steps],
                dtype=torch.float64,
            )
            if batch == 1:
                out = uncond + float(scale[0]) * (cond - uncond)
            else:
                shape = (batch,) + (1,) * (out.dim() - 1)
                out = uncond + scale.to(out.dtype).reshape(shape) * (cond - uncond)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @staticmethod
    def _scale(context: CogVideoXContext, t: int) -> float:
        if not context.dynamic_cfg:
            return context.guidance_scale
        n = context.steps
        return 1 + context.guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Video frames (F, H, W, C) uint8, from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        x = latent.reshape(context.latent_shape).to(pipe._execution_device)
        video = pipe.decode_latents(x[:, context.padding_frames :])
        return pixels_to_uint8(
            pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
        )
