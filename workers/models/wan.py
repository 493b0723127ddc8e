"""The Wan2.1 adapter: wraps a local ``WanPipeline``.

CHORDS needs a solver that uses one model output per step, so, as the paper's authors do, this
adapter does not use the pipeline's UniPC multistep update. It takes UniPC's own flow sigmas and
timesteps (the pipeline's ``scheduler.set_timesteps``) and integrates them with flow-matching
Euler (sigmas held as float32, the output kept in the model's dtype, exactly as
``FlowMatchEulerDiscreteScheduler.step`` does). So "sequential" for Wan means that Euler solve:
it equals the pipeline run with a FlowMatchEulerDiscreteScheduler on the same sigmas, not the
pipeline's default UniPC output. A folder saved with another scheduler runs that scheduler's own
step (``solvers.solver_for_scheduler``), for example DPM-Solver++ on flow sigmas (Wan's "dpm++"
sampler) in its first-order form. ``denoise`` is the loop's transformer call, CFG as two passes.
Wan 2.2's second transformer (boundary_ratio) and expand_timesteps are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import Solver
from chords_mq.workers.models.base import Prepared
from chords_mq.workers.models.pipeline_base import DiffusersAdapter, Schedule
from chords_mq.workers.models.pipeline_common import (
    expanded_timesteps,
    guided_passes,
    private_scheduler,
    repeat_rows,
    video_flow_solver,
)


@dataclass
class WanContext:
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None  # None: no CFG
    guidance_scale: float
    timesteps: torch.Tensor
    latent_shape: tuple[int, ...]


class WanAdapter(DiffusersAdapter):
    name = "wan"
    pipeline = "WanPipeline"
    allowed = frozenset(
        {
            "negative_prompt",
            "height",
            "width",
            "num_frames",
            "guidance_scale",
            "max_sequence_length",
        }
    )
    max_batch = 4
    published_scheduler = "UniPCMultistepScheduler on flow sigmas"
    switch_scheduler = (
        "UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True, "
        "prediction_type='flow_prediction', flow_shift=3.0)"
    )

    def _check_loaded(self, path: str | Path) -> None:
        config = self.pipe.config
        if getattr(config, "boundary_ratio", None) is not None or getattr(
            config, "expand_timesteps", False
        ):
            raise ValueError("wan: Wan 2.2 pipelines (two transformers) are not supported")

    def _default_size(self) -> tuple[int, int]:
        return 480, 832

    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        """The scheduler's own ``set_timesteps(N)``, as ``WanPipeline.__call__`` calls it."""
        scheduler = private_scheduler(self.pipe)
        scheduler.set_timesteps(steps, device=self.pipe._execution_device)
        return Schedule(scheduler, scheduler.timesteps, self._solver(scheduler))

    def _solver(self, scheduler: Any) -> Solver:
        return video_flow_solver(scheduler)

    @torch.no_grad()
    def prepare(self, request: RequestSpec) -> Prepared:
        params = self._params(request)
        pipe = self.pipe
        height, width = params.size(*self._default_size(), 16)
        frames = int(params.number("num_frames", 81, 1))
        if frames % pipe.vae_scale_factor_temporal != 1:
            raise InvalidRequest(
                f"wan: num_frames - 1 must be a multiple of {pipe.vae_scale_factor_temporal}"
            )
        guidance = params.number("guidance_scale", 5.0)
        cfg = guidance > 1
        device = pipe._execution_device
        embeds, negative = pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=params.text("negative_prompt"),
            do_classifier_free_guidance=cfg,
            num_videos_per_prompt=1,
            max_sequence_length=int(params.number("max_sequence_length", 512, 1)),
            device=device,
        )
        dtype = pipe.transformer.dtype
        embeds = embeds.to(dtype)
        negative = negative.to(dtype) if cfg else None
        _, timesteps, solver = self._schedule(request.steps, height, width)
        latents = self._initial_latents(
            request.seed,
            pipe.transformer.config.in_channels,
            height,
            width,
            frames,
            dtype=torch.float32,
        )
        context = WanContext(embeds, negative, guidance, timesteps, tuple(latents.shape))
        return self._prepared(latents, solver, context)

    def _noise_pred(
        self, context: WanContext, x: torch.Tensor, steps: Sequence[int]
    ) -> torch.Tensor:
        x = x.to(self.pipe.transformer.dtype)
        timestep = expanded_timesteps(context.timesteps, steps, x.shape[0])

        def forward(embeds: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.pipe.transformer(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=repeat_rows(embeds, x.shape[0]),
                attention_kwargs=None,
                return_dict=False,
            )[0]
            return out

        return guided_passes(
            forward, context.prompt_embeds, context.negative_embeds, context.guidance_scale
        )

    def _pixels(self, context: WanContext, x: torch.Tensor) -> Any:
        """Video frames (F, H, W, C), from the pipeline's own VAE and postprocess."""
        pipe = self.pipe
        vae = pipe.vae
        x = x.to(dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        video = vae.decode(x / std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]
