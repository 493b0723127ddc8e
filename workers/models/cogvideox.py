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
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import (
    cfg_inputs,
    guided_halves,
    repeat_rows,
)


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


class CogVideoXAdapter(DiffusersAdapter):
    name = "cogvideox"
    pipeline = "CogVideoXPipeline"
    allowed = frozenset(
        {
            "negative_prompt",
            "height",
            "width",
            "num_frames",
            "guidance_scale",
            "use_dynamic_cfg",
            "max_sequence_length",
        }
    )
    max_batch = 4
    published_scheduler = "CogVideoXDDIMScheduler (2B) or CogVideoXDPMScheduler (5B)"
    switch_scheduler = "CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)"

    def _default_size(self) -> tuple[int, int]:
        config = self.pipe.transformer.config
        spatial = self.pipe.vae_scale_factor_spatial
        return config.sample_height * spatial, config.sample_width * spatial

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        return self._timesteps(retrieve_timesteps, steps)

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = self._params(request)
        pipe = self.pipe
        config = pipe.transformer.config
        height, width = params.size(*self._default_size(), 8)
        frames = int(params.number("num_frames", config.sample_frames, 1))
        guidance = params.number("guidance_scale", 6.0)
        dynamic = params.get("use_dynamic_cfg", False)
        if not isinstance(dynamic, bool):
            raise InvalidRequest("cogvideox: use_dynamic_cfg must be true or false")
        cfg = guidance > 1
        device = pipe._execution_device
        embeds, negative = pipe.encode_prompt(
            params.prompt,
            params.text("negative_prompt"),
            cfg,
            num_videos_per_prompt=1,
            max_sequence_length=int(params.number("max_sequence_length", 226, 1)),
            device=device,
        )
        if cfg:
            embeds = torch.cat([negative, embeds], dim=0)
        _, timesteps, solver = self._schedule(request.steps, height, width)
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        padding = 0
        if config.patch_size_t is not None and latent_frames % config.patch_size_t:
            padding = config.patch_size_t - latent_frames % config.patch_size_t
            frames += padding * pipe.vae_scale_factor_temporal
        latents = self._initial_latents(
            request.seed, config.in_channels, frames, height, width, dtype=embeds.dtype
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
        return self._prepared(latents, solver, context)

    def _output_dtype(self) -> torch.dtype:
        return torch.float32  # _noise_pred upcasts the transformer's output, as the pipeline

    def _noise_pred(
        self, context: CogVideoXContext, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        batch = x.shape[0]
        cfg = context.guidance_scale != 1.0
        model_input, timestep = cfg_inputs(x, context.timesteps, steps, cfg)
        out: torch.Tensor = self.pipe.transformer(
            hidden_states=model_input,
            encoder_hidden_states=repeat_rows(context.prompt_embeds, batch),
            timestep=timestep,
            image_rotary_emb=context.rotary,
            attention_kwargs=None,
            return_dict=False,
        )[0]
        out = out.float()
        if not cfg:
            return out
        scale = torch.tensor(
            [self._scale(context, int(context.timesteps[s])) for s in steps],
            dtype=torch.float64,
        )
        if batch == 1:
            return guided_halves(out, float(scale[0]))
        shape = (batch,) + (1,) * (out.dim() - 1)
        return guided_halves(out, scale.to(out.dtype).reshape(shape))

    @staticmethod
    def _scale(context: CogVideoXContext, t: int) -> float:
        if not context.dynamic_cfg:
            return context.guidance_scale
        n = context.steps
        return 1 + context.guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)

    def _pixels(self, context: CogVideoXContext, x: torch.Tensor) -> Any:
        """Video frames (F, H, W, C), from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        video = pipe.decode_latents(x[:, context.padding_frames :])
        return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
