"""``POST /v1/images/generations``: the body read into ``RequestSpec``s (one per seed), each
request run through the client, and its hits turned into PNGs and OpenAI's stream events.

OpenAI's own fields are ``model``, ``prompt``, ``n``, ``size``, ``response_format``, ``stream``
and ``partial_images``; ``output_format`` must be png; ``quality``, ``style``, ``background``,
``moderation``, ``output_compression``, ``user`` and ``safety_identifier`` are accepted and
ignored. CHORDS' extensions are ``steps``, ``cores``, ``method``, ``seed``, ``stop``, ``init``,
``guidance_scale``, ``negative_prompt`` and ``params`` (more model parameters). Any other field
is a 400 naming it.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from chords_mq.client import AsyncClient, ClientHit
from chords_mq.gateway.errors import ApiError, invalid
from chords_mq.request import InvalidRequest, RequestSpec

OPENAI_FIELDS = frozenset(
    {"model", "prompt", "n", "size", "response_format", "stream", "partial_images"}
)
IGNORED_FIELDS = frozenset(
    {
        "quality",
        "style",
        "background",
        "moderation",
        "output_compression",
        "user",
        "safety_identifier",
    }
)
EXTENSIONS = frozenset(
    {
        "steps",
        "cores",
        "method",
        "seed",
        "stop",
        "init",
        "guidance_scale",
        "negative_prompt",
        "params",
    }
)
# What a model calls OpenAI's guidance_scale, where it is not guidance_scale.
MODEL_PARAM_NAMES = {"digits": {"guidance_scale": "guidance"}}
MAX_PARTIAL_IMAGES = 16
MAX_SIDE = 8192
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


@dataclass(frozen=True)
class ImageRequest:
    """One validated ``/v1/images/generations`` body: a spec per image (seeds ``seed`` ..
    ``seed + n - 1``) and how to answer."""

    specs: tuple[RequestSpec, ...]
    size: tuple[int, int] | None  # (width, height) asked for; None: the model's own
    response_format: str
    stream: bool
    partial_images: int

    @property
    def model(self) -> str:
        return self.specs[0].model


def _integer(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"{name} must be in {low}..{high}, got {value}", name)
    return value


def _text(body: dict[str, Any], name: str, limit: int, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"{name} is required", name, "missing_required_parameter")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise invalid(f"{name} must be a non-empty string", name, "invalid_type")
    if len(value) > limit:
        raise invalid(f"{name} is {len(value)} characters; at most {limit}", name, "too_long")
    return value


def parse_size(value: Any) -> tuple[int, int] | None:
    """``"WxH"`` as (width, height); None or ``"auto"``: the model's own size."""
    if value is None or value == "auto":
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise invalid(f"size must be 'WIDTHxHEIGHT' such as '512x512', got {value!r}", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if width > MAX_SIDE or height > MAX_SIDE:
        raise invalid(f"size: each side must be at most {MAX_SIDE}", "size")
    return width, height


def parse_init(value: Any) -> tuple[int, ...] | None:
    """``init``: a list of step indices, or the CLI's ``"0,2,4,8"``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            text = f"init must be step indices such as [0, 2, 4], got {value!r}"
            raise invalid(text, "init") from None
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise invalid(f"init must be a list of step indices, got {value!r}", "init")
    if len(value) > 1024:
        raise invalid("init: at most 1024 steps", "init")
    return tuple(value)


def model_params(
    body: dict[str, Any], model: str, prompt: str, size: tuple[int, int] | None, limit: int
) -> dict[str, Any]:
    """The model's parameters: ``params``, then prompt, negative prompt, guidance and size."""
    extra = body.get("params")
    if extra is not None and not isinstance(extra, dict):
        raise invalid("params must be an object of model parameters", "params", "invalid_type")
    params: dict[str, Any] = dict(extra or {})
    params["prompt"] = prompt
    negative = _text(body, "negative_prompt", limit)
    if negative is not None:
        params["negative_prompt"] = negative
    guidance = body.get("guidance_scale")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise invalid("guidance_scale must be a number", "guidance_scale", "invalid_type")
        names = MODEL_PARAM_NAMES.get(model, {})
        params[names.get("guidance_scale", "guidance_scale")] = guidance
    if size is not None:
        params["width"], params["height"] = size
    return params


def _choose_seed() -> int:
    return secrets.randbelow(1 << 31)


def parse_image_request(
    body: Any, *, max_n: int, max_prompt_chars: int, output: str = "media"
) -> ImageRequest:
    """Validate a body; a bad field is a 400 naming it (``ApiError``)."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - OPENAI_FIELDS - IGNORED_FIELDS - EXTENSIONS - {"output_format"})
    if unknown:
        raise invalid(f"unknown parameter: {unknown[0]!r}", unknown[0], "unknown_parameter")
    model = _text(body, "model", 200, required=True)
    prompt = _text(body, "prompt", max_prompt_chars, required=True)
    assert model is not None and prompt is not None
    n = _integer(body, "n", 1, max_n, 1)
    size = parse_size(body.get("size"))
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise invalid(
            f"response_format must be 'b64_json' (this gateway serves no files), "
            f"got {response_format!r}",
            "response_format",
        )
    if body.get("output_format") not in (None, "png"):
        raise invalid("output_format must be 'png'", "output_format")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream", "invalid_type")
    partial = _integer(body, "partial_images", 0, MAX_PARTIAL_IMAGES, 0)
    if stream and n != 1:
        raise invalid("stream: true needs n = 1", "n")
    seed = _integer(body, "seed", 0, (1 << 63) - n, -1)
    if seed < 0:
        seed = _choose_seed()
    method = body.get("method", "chords")
    if not isinstance(method, str):
        raise invalid("method must be a string", "method", "invalid_type")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        raise invalid("stop must be a string such as 'core-index:1'", "stop", "invalid_type")
    steps = body.get("steps", 50)
    cores = body.get("cores")
    for name, value in (("steps", steps), ("cores", cores)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    params = model_params(body, model, prompt, size, max_prompt_chars)
    try:
        first = RequestSpec(
            model=model,
            method=method,
            steps=steps,
            cores=cores,
            init_sequence=parse_init(body.get("init")),
            stop=stop,
            seed=seed,
            params=params,
            output=output,
        )
    except InvalidRequest as exc:
        raise invalid(str(exc)) from None
    specs = tuple(replace(first, seed=seed + i) for i in range(n))
    return ImageRequest(specs, size, "b64_json", stream, partial)


# -- hits as pictures ------------------------------------------------------------------------------


def png_of(media: torch.Tensor) -> tuple[bytes, str]:
    """A decoded hit (uint8 (H, W), (H, W, C) or video frames (F, H, W, C): the first) as PNG
    bytes and its ``"WxH"``."""
    from PIL import Image

    image = media[0] if media.dim() == 4 else media
    if image.dim() == 3 and image.shape[-1] == 1:
        image = image.squeeze(-1)
    picture = Image.fromarray(image.contiguous().numpy())
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue(), f"{picture.width}x{picture.height}"


def b64_png(media: torch.Tensor) -> tuple[str, str]:
    data, size = png_of(media)
    return base64.b64encode(data).decode("ascii"), size


def hit_fields(hit: ClientHit) -> dict[str, Any]:
    """The extra fields of an event: which core, at which round, with which round-speedup."""
    return {"core": hit.core, "round": hit.round, "round_speedup": round(hit.speedup, 4)}


USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def event(kind: str, hit: ClientHit, **extra: Any) -> dict[str, Any]:
    """One stream event's data in OpenAI's shape (``image_generation.partial_image`` or
    ``image_generation.completed``), with the hit's core, round and round-speedup."""
    if hit.media is None:
        raise ApiError(502, "a hit came without its picture", code="no_media")
    b64, size = b64_png(hit.media)
    return {
        "type": kind,
        "b64_json": b64,
        "created_at": int(time.time()),
        "size": size,
        "quality": "auto",
        "background": "opaque",
        "output_format": "png",
        **extra,
        **hit_fields(hit),
    }


@dataclass
class Outcome:
    """A finished request: its returned hit, and how many hits came."""

    returned: ClientHit
    hits: int
    seed: int


def returned_hit(hits: dict[int, ClientHit], stats: dict[str, Any] | None) -> ClientHit:
    """The hit the request returns (its stop rule's, else core 1's: the broker says which)."""
    chosen = (stats or {}).get("returned") or {}
    core = chosen.get("core") if isinstance(chosen, dict) else None
    if core in hits:
        return hits[core]
    if not hits:
        raise ApiError(502, "the request finished without a hit", code="no_hit")
    return max(hits.values(), key=lambda hit: (hit.round, -hit.core))


async def run_to_end(
    client: AsyncClient,
    spec: RequestSpec,
    request_id: str,
    timeout: float,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Run one request to its end; its returned hit."""
    stream = client.submit(spec, request_id=request_id, timeout=timeout, on_progress=on_progress)
    hits: dict[int, ClientHit] = {}
    async for hit in stream:
        hits[hit.core] = hit
    return Outcome(returned_hit(hits, stream.stats), len(hits), spec.seed)


async def stream_events(
    client: AsyncClient, spec: RequestSpec, request_id: str, timeout: float, partials: int
) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """``(event, data)`` pairs: up to ``partials`` partial images, one per hit as it lands,
    then the completed image (the returned hit). Closing it early cancels the request."""
    stream = client.submit(spec, request_id=request_id, timeout=timeout)
    hits: dict[int, ClientHit] = {}
    iterator = stream.__aiter__()
    try:
        async for hit in iterator:
            hits[hit.core] = hit
            if len(hits) <= partials:
                kind = "image_generation.partial_image"
                yield kind, event(kind, hit, partial_image_index=len(hits) - 1)
        kind = "image_generation.completed"
        final = returned_hit(hits, stream.stats)
        yield kind, event(kind, final, usage=USAGE, seed=spec.seed)
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
