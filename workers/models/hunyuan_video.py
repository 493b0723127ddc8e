"""The HunyuanVideo adapter: wraps a local ``HunyuanVideoPipeline``.

``prepare`` calls the pipeline's ``encode_prompt`` (Llama + CLIP, with the prompt template; the
negative prompt only for true CFG), ``prepare_latents`` (float32, seeded CPU generator) and the
scheduler set-up with sigmas ``linspace(1, 0, N + 1)[:-1]``. ``denoise`` is the transformer call
of the loop: the guidance embedding (``guidance_scale * 1000``), the attention mask, and the
timestep cast to the latent's dtype as the pipeline casts it. Solver: flow-matching Euler that
keeps ``scheduler.step``'s output dtype (latents turn bfloat16 after the first step of a
bfloat16 model, exactly as in the pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


class HunyuanVideoAdapter:
    name = "hunyuan-video"
    max_batch = 4
    pixel_space = False

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        self.pipe = load_pipeline("HunyuanVideoPipeline", path, device, dtype)
        self.device = self.pipe._execution_device
        self.dtype = str(self.pipe.transformer.dtype).removeprefix("torch.")

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
            retrieve_timesteps,
        )

        params = checked_params("hunyuan-video", request.params, ALLOWED)
        pipe = self.pipe
        height = int(number("hunyuan-video", params, "height", 720, 1))
        width = int(number("hunyuan-video", params, "width", 1280, 1))
        frames = int(number("hunyuan-video", params, "num_frames", 129, 1))
        if height % 16 or width % 16:
            raise InvalidRequest("hunyuan-video: height and width must be multiples of 16")
        template = params.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
        if not isinstance(template, dict):
            raise InvalidRequest("hunyuan-video: prompt_template must be a map")
        length = int(number("hunyuan-video", params, "max_sequence_length", 256, 1))
        true_cfg = number("hunyuan-video", params, "true_cfg_scale", 1.0)
        cond = self._encode(
            params["prompt"], text("hunyuan-video", params, "prompt_2"), template, length
        )
        negative = None
        if true_cfg > 1 and params.get("negative_prompt") is not None:
            negative = self._encode(
                str(params["negative_prompt"]),
                text("hunyuan-video", params, "negative_prompt_2"),
                template,
                length,
            )
        device = pipe._execution_device
        scheduler = private_scheduler(pipe)
        sigmas = np.linspace(1.0, 0.0, request.steps + 1)[:-1]
        timesteps, _ = retrieve_timesteps(scheduler, request.steps, device, sigmas=sigmas)
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
        scale = number("hunyuan-video", params, "guidance_scale", 6.0)
        guidance = torch.tensor([scale], dtype=pipe.transformer.dtype, device=device) * 1000.0
        context = HunyuanContext(
            cond, negative, true_cfg, guidance, timesteps, tuple(latents.shape)
        )
        solver = flow_match_euler(scheduler.sigmas, keep_latent_dtype=False)
        return Prepared(x0=latents, solver=solver, context=context)

    def _forward(
        self, context: HunyuanContext, cond: _Text, x: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor:
        batch = x.shape[0]
        out: torch.Tensor = self.pipe.transformer(
            hidden_states=x.to(self.pipe.transformer.dtype),
            timestep=timestep,
            encoder_hidden_states=repeat_rows(cond.embeds, batch),
            encoder_attention_mask=repeat_rows(cond.mask, batch),
            pooled_projections=repeat_rows(cond.pooled, batch),
            guidance=context.guidance.expand(batch),
            attention_kwargs=None,
            return_dict=False,
        )[0]
        return out

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, *context.latent_shape[1:]).to(self.pipe._execution_device)
        t = row_timesteps(context.timesteps, steps)
        timestep = (t.expand(x.shape[0]) if t.dim() == 0 else t).to(x.dtype)
        out = self._forward(context, context.cond, x, timestep)
        if context.negative is not None:
            negative = self._forward(context, context.negative, x, timestep)
            out = negative + context.true_cfg_scale * (out - negative)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Video frames (F, H, W, C) uint8, from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        x = latent.reshape(context.latent_shape).to(pipe._execution_device)
        x = x.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        video = pipe.vae.decode(x, return_dict=False)[0]
        return pixels_to_uint8(pipe.video_processor.postprocess_video(video, output_type="np")[0])
