"""The Flux adapter: wraps a local ``FluxPipeline`` and calls its own pieces.

``prepare`` runs the pipeline's ``encode_prompt`` (and the negative prompt for true CFG), its
``prepare_latents`` with a seeded CPU generator (packed latents and image ids), and its
scheduler set-up (``np.linspace(1, 1/N, N)`` sigmas, the resolution-dependent ``mu`` shift,
``retrieve_timesteps``) on a private copy of the scheduler. ``denoise`` is the transformer call
of the pipeline's loop, guidance embedding and true CFG included. The solver is flow-matching
Euler on the same sigmas, bitwise equal to ``scheduler.step``; so the sequential output equals
``pipe(..., output_type="latent")`` bit for bit (tested on a tiny pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import guided_passes, repeat_rows


@dataclass
class _Conditioning:
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor


@dataclass
class FluxContext:
    cond: _Conditioning
    negative: _Conditioning | None
    true_cfg_scale: float
    guidance: torch.Tensor | None  # per-sample guidance embedding input, batch 1
    image_ids: torch.Tensor
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]
    height: int
    width: int


class FluxAdapter(DiffusersAdapter):
    name = "flux"
    pipeline = "FluxPipeline"
    allowed = frozenset(
        {
            "prompt",
            "prompt_2",
            "negative_prompt",
            "negative_prompt_2",
            "height",
            "width",
            "guidance_scale",
            "true_cfg_scale",
            "max_sequence_length",
        }
    )
    max_batch = 8

    def _default_size(self) -> tuple[int, int]:
        default = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return default, default

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        """``np.linspace(1, 1/N, N)`` sigmas (none with flow sigmas) and the shift ``mu`` for
        the image's packed sequence length (``latents.shape[1]`` in ``__call__``)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        config = self.pipe.scheduler.config
        sigmas: Any = np.linspace(1.0, 1 / steps, steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        packed = self.pipe.vae_scale_factor * 2  # prepare_latents' packing of 2x2 patches
        mu = calculate_shift(
            (height // packed) * (width // packed),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return self._timesteps(retrieve_timesteps, steps, sigmas=sigmas, mu=mu)

    def _encode(self, prompt: Any, prompt_2: Any, length: int) -> _Conditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=length,
        )
        return _Conditioning(embeds, pooled, text_ids)

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = self._params(request)
        pipe = self.pipe
        height, width = params.size(*self._default_size(), pipe.vae_scale_factor * 2)
        length = int(params.number("max_sequence_length", 512, 1))
        true_cfg = params.number("true_cfg_scale", 1.0)
        cond = self._encode(params.prompt, params.text("prompt_2"), length)
        negative = None
        if true_cfg > 1 and params.get("negative_prompt") is not None:
            negative = self._encode(
                params.get("negative_prompt"), params.get("negative_prompt_2"), length
            )
        latents, image_ids = self._initial_latents(
            request.seed,
            pipe.transformer.config.in_channels // 4,
            height,
            width,
            dtype=cond.prompt_embeds.dtype,
        )
        _, timesteps, solver = self._schedule(request.steps, height, width)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            scale = params.number("guidance_scale", 3.5)
            guidance = torch.full([1], scale, device=pipe._execution_device, dtype=torch.float32)
        context = FluxContext(
            cond,
            negative,
            true_cfg,
            guidance,
            image_ids,
            timesteps,
            tuple(latents.shape),
            height,
            width,
        )
        return self._prepared(latents, solver, context)

    def _noise_pred(
        self, context: FluxContext, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        # as the pipeline does: t.expand(batch).to(latents.dtype), one t per row here
        timestep = context.timesteps[list(steps)].to(x.dtype)
        batch = x.shape[0]
        guidance = None if context.guidance is None else context.guidance.expand(batch)

        def forward(cond: _Conditioning) -> torch.Tensor:
            out: torch.Tensor = self.pipe.transformer(
                hidden_states=x,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=repeat_rows(cond.pooled, batch),
                encoder_hidden_states=repeat_rows(cond.prompt_embeds, batch),
                txt_ids=cond.text_ids,
                img_ids=context.image_ids,
                joint_attention_kwargs={},
                return_dict=False,
            )[0]
            return out

        return guided_passes(forward, context.cond, context.negative, context.true_cfg_scale)

    def _pixels(self, context: FluxContext, x: torch.Tensor) -> Any:
        """The pipeline's own decode: unpack, unscale and shift, VAE, postprocess."""
        pipe = self.pipe
        x = pipe._unpack_latents(x, context.height, context.width, pipe.vae_scale_factor)
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(x, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")[0]
