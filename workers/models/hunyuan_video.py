"""The HunyuanVideo adapter: wraps a local ``HunyuanVideoPipeline``.

``prepare`` calls the pipeline's ``encode_prompt`` (Llama + CLIP, with the prompt template; the
negative prompt only for true CFG), ``prepare_latents`` (float32, seeded CPU generator) and the
scheduler set-up with sigmas ``linspace(1, 0, N + 1)[:-1]``. ``denoise`` is the transformer call
of the loop: the guidance embedding (``guidance_scale * 1000``), the attention mask, and the
timestep cast to the latent's dtype as the pipeline casts it. Solver: flow-matching Euler that
keeps ``scheduler.step``'s output dtype (latents turn bfloat16 after the first step of a
bfloat16 model, exactly as in the pipeline). A scheduler that takes no custom sigmas (DDIM,
DPM-Solver, UniPC without flow sigmas) is refused at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import Solver
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import (
    expanded_timesteps,
    guided_passes,
    repeat_rows,
    video_flow_solver,
)


@dataclass
class _Text:
    embeds: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor


@dataclass
class HunyuanContext:
    cond: _Text
    negative: _Text | None
    true_cfg_scale: float
    guidance: torch.Tensor  # (1,), guidance_scale * 1000 in the transformer's dtype
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]


class HunyuanVideoAdapter(DiffusersAdapter):
    name = "hunyuan-video"
    pipeline = "HunyuanVideoPipeline"
    allowed = frozenset(
        {
            "prompt_2",
            "negative_prompt",
            "negative_prompt_2",
            "height",
            "width",
            "num_frames",
            "guidance_scale",
            "true_cfg_scale",
            "max_sequence_length",
            "prompt_template",
        }
    )
    max_batch = 4

    def _default_size(self) -> tuple[int, int]:
        return 720, 1280

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        """Sigmas ``linspace(1, 0, N + 1)[:-1]``, whatever the size."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import retrieve_timesteps

        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        return self._timesteps(retrieve_timesteps, steps, sigmas=sigmas)

    def _solver(self, scheduler: Any) -> Solver:
        return video_flow_solver(scheduler)

    def _encode(self, prompt: str, prompt_2: str | None, template: Any, length: int) -> _Text:
        pipe = self.pipe
        dtype = pipe.transformer.dtype
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_template=template,
            num_videos_per_prompt=1,
            device=pipe._execution_device,
            max_sequence_length=length,
        )
        return _Text(embeds.to(dtype), pooled.to(dtype), mask.to(dtype))

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
            DEFAULT_PROMPT_TEMPLATE,
        )

        params = self._params(request)
        pipe = self.pipe
        height, width = params.size(*self._default_size(), 16)
        frames = int(params.number("num_frames", 129, 1))
        template = params.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
        if not isinstance(template, dict):
            raise InvalidRequest("hunyuan-video: prompt_template must be a map")
        length = int(params.number("max_sequence_length", 256, 1))
        true_cfg = params.number("true_cfg_scale", 1.0)
        cond = self._encode(params.prompt, params.text("prompt_2"), template, length)
        negative = None
        if true_cfg > 1 and params.get("negative_prompt") is not None:
            negative = self._encode(
                str(params.get("negative_prompt")),
                params.text("negative_prompt_2"),
                template,
                length,
            )
        _, timesteps, solver = self._schedule(request.steps, height, width)
        latents = self._initial_latents(
            request.seed,
            pipe.transformer.config.in_channels,
            height,
            width,
            frames,
            dtype=torch.float32,
        )
        scale = params.number("guidance_scale", 6.0)
        device = pipe._execution_device
        guidance = torch.tensor([scale], dtype=pipe.transformer.dtype, device=device) * 1000.0
        context = HunyuanContext(
            cond, negative, true_cfg, guidance, timesteps, tuple(latents.shape)
        )
        return self._prepared(latents, solver, context)

    def _noise_pred(
        self, context: HunyuanContext, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        batch = x.shape[0]
        timestep = expanded_timesteps(context.timesteps, steps, batch).to(x.dtype)
        transformer = self.pipe.transformer

        def forward(cond: _Text) -> torch.Tensor:
            out: torch.Tensor = transformer(
                hidden_states=x.to(transformer.dtype),
                timestep=timestep,
                encoder_hidden_states=repeat_rows(cond.embeds, batch),
                encoder_attention_mask=repeat_rows(cond.mask, batch),
                pooled_projections=repeat_rows(cond.pooled, batch),
                guidance=context.guidance.expand(batch),
                attention_kwargs=None,
                return_dict=False,
            )[0]
            return out

        return guided_passes(forward, context.cond, context.negative, context.true_cfg_scale)

    def _pixels(self, context: HunyuanContext, x: torch.Tensor) -> Any:
        """Video frames (F, H, W, C), from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        x = x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        video = pipe.vae.decode(x, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]
