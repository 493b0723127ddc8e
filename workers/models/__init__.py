"""Model adapters: each wraps one model family behind prepare / denoise / decode."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.models.base import ModelAdapter, Prepared

__all__ = ["ModelAdapter", "ModelEntry", "Prepared", "load_adapter", "resolve", "served_name"]

# model_index.json "_class_name" -> (module, adapter class), for --model PATH
PIPELINE_FAMILIES = {
    "FluxPipeline": ("workers.models.flux", "FluxAdapter"),
    "StableDiffusionPipeline": ("workers.models.stable_diffusion", "StableDiffusionAdapter"),
    "StableDiffusionXLPipeline": ("workers.models.stable_diffusion", "StableDiffusionXLAdapter"),
    "StableDiffusion3Pipeline": ("workers.models.sd3", "SD3Adapter"),
    "HunyuanVideoPipeline": ("workers.models.hunyuan_video", "HunyuanVideoAdapter"),
    "CogVideoXPipeline": ("workers.models.cogvideox", "CogVideoXAdapter"),
    "WanPipeline": ("workers.models.wan", "WanAdapter"),
}


# --family short names
FAMILY_NAMES = {
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "stable-diffusion": "StableDiffusionPipeline",
    "stable-diffusion-xl": "StableDiffusionXLPipeline",
    "hunyuan-video": "HunyuanVideoPipeline",
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
}


@dataclass(frozen=True)
class ModelEntry:
    """Where a served model comes from: a spec or folder, and optionally its family and dtype."""

    name: str
    source: str
    family: str | None = None
    dtype: str | None = None


def read_registry(path: str | Path) -> dict[str, ModelEntry]:
    """A JSON registry ``{"flux-dev": {"path": "/models/FLUX.1-dev", "family": "flux",
    "dtype": "bfloat16"}, ...}``; bad files raise ValueError with the reason."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model registry {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model registry {path}: expected a JSON object of models")
    entries = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f'model registry {path}: {name!r} needs a "path"')
        family = entry.get("family")
        if family is not None and family not in FAMILY_NAMES:
            raise ValueError(f"model registry {path}: {name!r} has unknown family {family!r}")
        entries[name] = ModelEntry(name, entry["path"], family, entry.get("dtype"))
    return entries


def resolve(model: str, registry: str | Path | None = None) -> ModelEntry:
    """``model`` as a registry name (when a registry is given and lists it) or as a spec/folder."""
    if registry is not None:
        entries = read_registry(registry)
        if model in entries:
            return entries[model]
    return ModelEntry(served_name(model), model)


def served_name(model: str) -> str:
    """The name a worker serves ``model`` under by default: a folder's base name, else the spec."""
    path = Path(model)
    if (path / "model_index.json").exists():
        return path.resolve().name
    return model


def load_adapter(
    model: str,
    device: str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    **options: Any,
) -> ModelAdapter:
    """The adapter for ``synthetic``, ``digits[:PATH]`` or a local diffusers pipeline folder.

    Unknown specs and unsupported pipelines raise ValueError.
    """
    if model == "synthetic":
        from workers.models.synthetic import SyntheticAdapter

        return SyntheticAdapter(device=device, **options)
    if model == "digits" or model.startswith("digits:"):
        from workers.models.digits import DigitsAdapter

        path = model.partition(":")[2] or None  # digits:/path/to/retrained/model
        return DigitsAdapter(device=device, path=path, **options)
    folder = Path(model)
    index = folder / "model_index.json"
    if index.exists():
        if family is not None and family not in FAMILY_NAMES:
            raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILY_NAMES)})")
        pipeline = (
            FAMILY_NAMES[family]
            if family is not None
            else json.loads(index.read_text()).get("_class_name")
        )
        if pipeline not in PIPELINE_FAMILIES:
            raise ValueError(
                f"{folder}: pipeline {pipeline} has no adapter yet (supported: "
                f"{', '.join(sorted(PIPELINE_FAMILIES))})"
            )
        module, name = PIPELINE_FAMILIES[pipeline]
        adapter_class = getattr(importlib.import_module(module), name)
        adapter: ModelAdapter = adapter_class(folder, device=device, dtype=dtype)
        return adapter
    raise ValueError(
        f"unknown model {model!r}: use synthetic, digits[:PATH] or a diffusers pipeline folder"
    )
