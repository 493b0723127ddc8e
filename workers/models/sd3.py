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
from typing import Any

import torch

from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import (
    cfg_inputs,
    guided_halves,
    repeat_rows,
)


@dataclass
class SD3Context:
    prompt_embeds: torch.Tensor  # [negative; positive] with CFG
    pooled: torch.Tensor
    guidance_scale: float  # 1.0: no CFG
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]


class SD3Adapter(DiffusersAdapter):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    allowed = frozenset(
        {
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
    )
    max_batch = 8

    def _default_size(self) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return default, default

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        """The shift ``mu`` for the latent's patch count when the scheduler shifts dynamically
        (``latents.shape[2:]`` in ``__call__``: the size over the VAE's factor)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        pipe = self.pipe
        config = pipe.scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            factor = pipe.vae_scale_factor  # prepare_latents' latent height and width
            kwargs["mu"] = calculate_shift(
                (height // factor // patch) * (width // factor // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return self._timesteps(retrieve_timesteps, steps, **kwargs)

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = self._params(request)
        pipe = self.pipe
        height, width = params.size(*self._default_size(), pipe.vae_scale_factor * pipe.patch_size)
        guidance = params.number("guidance_scale", 7.0)
        cfg = guidance > 1
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=params.prompt,
            prompt_2=params.text("prompt_2"),
            prompt_3=params.text("prompt_3"),
            negative_prompt=params.text("negative_prompt"),
            negative_prompt_2=params.text("negative_prompt_2"),
            negative_prompt_3=params.text("negative_prompt_3"),
            do_classifier_free_guidance=cfg,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=int(params.number("max_sequence_length", 256, 1)),
        )
        if cfg:
            embeds = torch.cat([negative, embeds], dim=0)
            pooled = torch.cat([negative_pooled, pooled], dim=0)
        latents = self._initial_latents(
            request.seed, pipe.transformer.config.in_channels, height, width, dtype=embeds.dtype
        )
        _, timesteps, solver = self._schedule(request.steps, height, width)
        context = SD3Context(
            embeds, pooled, guidance if cfg else 1.0, timesteps, tuple(latents.shape)
        )
        return self._prepared(latents, solver, context)

    def _noise_pred(
        self, context: SD3Context, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        batch = x.shape[0]
        cfg = context.guidance_scale != 1.0
        model_input, timestep = cfg_inputs(x, context.timesteps, steps, cfg)
        out: torch.Tensor = self.pipe.transformer(
            hidden_states=model_input,
            timestep=timestep,
            encoder_hidden_states=repeat_rows(context.prompt_embeds, batch),
            pooled_projections=repeat_rows(context.pooled, batch),
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]
        return guided_halves(out, context.guidance_scale) if cfg else out

    def _pixels(self, context: SD3Context, x: torch.Tensor) -> Any:
        pipe = self.pipe
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(x, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")[0]
