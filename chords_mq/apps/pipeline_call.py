"""A ``ChordsPipeline`` call: how its diffusers arguments become a ``RequestSpec``
(``CallDefaults``), and what it returns (``ChordsPipelineOutput`` with every ``PipelineHit``).

No daemons here: ``chords_mq.apps.pipeline`` starts them and sends the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from chords_mq.client import ClientHit
from chords_mq.methods import method_for
from chords_mq.request import InvalidRequest, RequestSpec

# num_inference_steps when a call gives none: the pipeline class's own default in diffusers
# (tests/test_chords_pipeline.py checks it against the installed diffusers' signatures).
DEFAULT_STEPS = {"FluxPipeline": 28, "StableDiffusion3Pipeline": 28}
FALLBACK_STEPS = 50  # every other family's default, and the demo model's (chords run's)

# diffusers call arguments a request cannot carry, and what to do instead.
UNSUPPORTED = {
    "generator": "pass seed=S: the workers draw the initial noise as "
    "torch.Generator('cpu').manual_seed(S) does",
    "latents": "the workers draw the initial noise from seed=",
    "num_images_per_prompt": "one image per call: call again with another seed",
    "prompt_embeds": "pass the prompt: the workers encode it",
    "negative_prompt_embeds": "pass negative_prompt: the workers encode it",
    "callback_on_step_end": "pass on_hit=, called with each core's hit as it lands",
    "return_dict": "the output is always a ChordsPipelineOutput",
}

# The demo model's names for the diffusers arguments (the pipeline families use diffusers').
PARAM_NAMES = {"digits": {"guidance_scale": "guidance"}}

OUTPUT_TYPES = ("pil", "latent")


@dataclass(frozen=True)
class PipelineHit:
    """One core's output as it landed: ``core`` (0: the zero-th, coarse hit; 1: the sequential
    solve), ``round``, ``speedup`` (``steps / round``), ``elapsed_s`` since the request
    started, its decoded ``media`` (uint8: (H, W[, C]) or video (F, H, W, C)) and ``latent``
    (each when the call asked for it)."""

    core: int
    round: int
    steps: int
    elapsed_s: float
    media: torch.Tensor | None
    latent: torch.Tensor | None

    @classmethod
    def of(cls, hit: ClientHit) -> PipelineHit:
        return cls(hit.core, hit.round, hit.steps, hit.elapsed_s, hit.media, hit.latent)

    @property
    def speedup(self) -> float:
        return self.steps / self.round

    @property
    def is_video(self) -> bool:
        media = self.media if self.media is not None else self.latent
        return media is not None and media.dim() == (4 if self.media is not None else 5)

    @property
    def image(self) -> Any:
        """The picture as a ``PIL.Image`` (None for a video or without media)."""
        if self.media is None or self.is_video:
            return None
        return _pil(self.media)

    @property
    def frames(self) -> list[Any] | None:
        """A video's frames as ``PIL.Image``s (None for a picture or without media)."""
        if self.media is None or not self.is_video:
            return None
        return [_pil(frame) for frame in self.media]


def _pil(pixels: torch.Tensor) -> Any:
    from PIL import Image

    array = pixels.contiguous().numpy()
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


@dataclass
class ChordsPipelineOutput:
    """What a call returns, shaped like diffusers' outputs: ``images`` (a list of one
    ``PIL.Image``) for picture families, ``frames`` (a list of one list of frames) for video
    families, both from the request's returned hit; with ``output_type="latent"`` the returned
    latent instead, as diffusers gives it. ``hits`` holds every core's hit in the order they
    landed (the fastest first), ``returned`` the hit the request returns: with CHORDS' default
    stop (none) that is core 1, bitwise the sequential sampler, which lands last; with
    ``stop="core-index:1"`` it is the fastest core."""

    images: Any
    frames: Any
    hits: list[PipelineHit]
    returned: PipelineHit | None
    cores: int | None  # the K the broker granted
    stats: dict[str, Any] = field(default_factory=dict)  # the broker's (evaluations, wall_s ...)
    wall_s: float = 0.0  # the call, start to end
    first_hit_s: float | None = None  # the call's start to its first hit


@dataclass(frozen=True)
class CallDefaults:
    """How a call's arguments become a ``RequestSpec`` for the served ``model``: ``steps``
    (diffusers' default for the pipeline class) and ``cores`` when a call gives none, and the
    model's own names for diffusers arguments (``names``)."""

    model: str
    steps: int
    cores: int
    names: dict[str, str] = field(default_factory=dict)

    def spec(
        self,
        prompt: str | None = None,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        seed: int = 0,
        cores: int | None = None,
        method: str = "chords",
        stop: str | None = None,
        output_type: str = "pil",
        with_latents: bool = False,
        **params: Any,
    ) -> RequestSpec:
        """The request for a call: the diffusers arguments given (not None) become the
        model's params under their diffusers names (the demo model's where it has its own),
        None leaves the family's own default as diffusers does; ``output_type="pil"`` asks
        the workers to decode every hit (``with_latents``: and to send its latent too),
        ``"latent"`` for latents only. ``InvalidRequest`` if it cannot run."""
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequest(
                f"prompt must be one string, got {type(prompt).__name__}: one prompt per call"
            )
        for name in params:
            if name in UNSUPPORTED:
                raise InvalidRequest(f"{name} is not supported: {UNSUPPORTED[name]}")
        if output_type not in OUTPUT_TYPES:
            raise InvalidRequest(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        diffusers_args = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "num_frames": num_frames,
        }
        given = {
            self.names.get(name, name): value
            for name, value in diffusers_args.items()
            if value is not None  # None: the family's own default, as in diffusers
        }
        rules = method_for(method)  # refuses an unknown method
        k = (self.cores if cores is None else cores) if rules.takes_cores else cores
        output = "latent" if output_type == "latent" else ("both" if with_latents else "media")
        steps = self.steps if num_inference_steps is None else num_inference_steps
        return RequestSpec(
            model=self.model,
            method=method,
            steps=steps,
            cores=k,
            stop=stop,
            seed=seed,
            params={**given, **params},
            output=output,
        )


def shaped(hit: PipelineHit | None, output: str) -> tuple[Any, Any]:
    """(images, frames) as diffusers gives them for the returned hit: pictures as a list of one
    image, a video as a list of one list of frames; the latent itself for ``latent``."""
    if hit is None:
        return None, None
    if output == "latent":
        return (None, hit.latent) if hit.is_video else (hit.latent, None)
    if hit.is_video:
        return None, [hit.frames]
    return [hit.image], None
